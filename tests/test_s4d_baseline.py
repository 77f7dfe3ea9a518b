"""The S4D baseline of the sequence benchmark against the state-space recurrence it discretises."""

import torch

from benchmarks.s4d import S4DConv


def test_s4d_convolution_matches_the_discretised_recurrence():
    torch.manual_seed(0)
    layer = S4DConv(3, d_state=8, dt_min=0.01, dt_max=0.5).double()
    with torch.no_grad():
        layer.log_A_real.add_(0.3 * torch.randn_like(layer.log_A_real))
    x = torch.randn(2, 3, 40, dtype=torch.float64)
    dt = layer.log_dt.exp().detach()
    A = (-layer.log_A_real.exp() + 1j * layer.A_imag).detach()
    B = (torch.exp(dt[:, None] * A) - 1) / A  # zero-order hold with B = 1
    C = torch.view_as_complex(layer.C.detach().contiguous())
    state = torch.zeros(2, 3, A.shape[1], dtype=torch.complex128)
    expected = []
    for t in range(x.shape[-1]):  # x_{t} = exp(dt A) x_{t-1} + B u_t, y_t = 2 Re(C x_t) (conjugate pairs)
        state = torch.exp(dt[:, None] * A) * state + B * x[..., t, None]
        expected.append(2 * (C * state).sum(-1).real)
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got, torch.stack(expected, dim=-1), atol=1e-10)


def test_cached_kernel_gives_the_same_output_in_eval_mode():
    torch.manual_seed(0)
    layer = S4DConv(4, d_state=6)
    cached = S4DConv(4, d_state=6, cache_kernel=True).eval()
    cached.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 30)
    with torch.no_grad():
        assert torch.allclose(cached(x), layer(x), atol=1e-6) and cached._spectrum is not None
        assert torch.allclose(cached(x[..., :20]), layer(x[..., :20]), atol=1e-6)  # a new length, a new kernel
