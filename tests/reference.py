"""Independent references for the tests: direct ``conv1d`` in float64, no FFTs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def direct_conv(u: torch.Tensor, k: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """``y[t] = sum_j kc[j] u[t-j] + sum_j ka[j] u[t+1+j]`` with ``conv1d`` (cross-correlation)."""
    u = u.double()
    k = k.double()
    seq_len, dim = u.shape[-1], u.shape[1]
    causal = k[0] if bidirectional else k
    width = causal.shape[-1]
    y = F.conv1d(F.pad(u, (width - 1, 0)), causal.flip(-1).unsqueeze(1), groups=dim)
    if bidirectional:
        anti = k[1]
        taps = anti.shape[-1]
        weight = F.pad(anti, (1, 0)).unsqueeze(1)  # w[m] = ka[m - 1]
        y = y + F.conv1d(F.pad(u, (0, taps)), weight, groups=dim)
    return y[..., :seq_len]


def branch_reference(layer, u: torch.Tensor) -> torch.Tensor:
    """Eval-mode Eq. 12 computed branch by branch with ``direct_conv`` and explicit BN."""
    out = 0
    kernels = layer.kernel()
    for i, k in enumerate(kernels):
        c = direct_conv(u, k if layer.bidirectional else k[0], layer.bidirectional)
        mean = layer.norm.running_mean[i].double()[:, None]
        var = layer.norm.running_var[i].double()[:, None]
        gamma = layer.norm.weight[i].double()[:, None]
        beta = layer.norm.bias[i].double()[:, None]
        normed = (c - mean) / torch.sqrt(var + layer.norm.eps) * gamma + beta
        out = out + layer.alpha[i].double()[:, None] * normed
    return out


def randomize_(layer) -> None:
    """Random, non-trivial parameters and BN statistics (never zeros or identity)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.ndim >= 1:
                p.copy_(torch.randn_like(p) * 0.5 + (0.7 if "scale" in name or "alpha" in name else 0.0))
        if hasattr(layer, "norm"):
            layer.norm.weight.copy_(torch.rand_like(layer.norm.weight) * 1.5 + 0.25)
            layer.norm.running_mean.normal_(0.0, 0.5)
            layer.norm.running_var.uniform_(0.3, 3.0)


def random_mrconv(dim: int, seq_len: int, kernel_size: int, seed: int = 0, **kwargs):
    """``MRConv(dim, seq_len, kernel_size, **kwargs)`` with :func:`randomize_` parameters and statistics, seeded."""
    from mrconvnext import MRConv

    torch.manual_seed(seed)
    layer = MRConv(dim, seq_len, kernel_size, **kwargs)
    randomize_(layer)
    return layer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def branch_bn_autograd(layer, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
    """Eq. 12 with plain autograd in ``x``'s dtype: all branches ``c_i = k_i * u`` at once by zero-padded
    FFTs (power-of-two length, no wrap-around), ``F.batch_norm`` over them with the layer's statistics
    (in training: batch statistics, running averages updated in place), then ``sum_i alpha_i BN_i(c_i)``.

    The reference for the fused training step and its gradients (and the benchmark's plain-autograd
    layer); the sub-kernels come from ``layer.kernel(rate)``, which the oracle tests check separately.
    """
    norm = layer.norm
    batch, dim, seq_len = x.shape
    kernels = layer.kernel(rate)
    taps = max(k.shape[-1] for k in kernels)
    n = 1 << (seq_len + taps - 1).bit_length()  # >= L + K: positive lags end before the anti-causal block
    buffers = []
    for k in kernels:
        k, gap = k.to(x.dtype), n - k.shape[-1]
        buffer = F.pad(k[0], (0, gap))  # lag j at position j
        if layer.bidirectional:  # lag -(j + 1) at position n - 1 - j
            buffer = buffer + F.pad(k[1].flip(-1), (gap, 0))
        buffers.append(buffer)
    spectra = torch.fft.rfft(x, n=n).unsqueeze(1) * torch.fft.rfft(torch.stack(buffers), n=n)  # (B, N, D, F)
    branches = torch.fft.irfft(spectra, n=n)[..., :seq_len]
    if norm.training:
        norm.num_batches_tracked.add_(1)
    momentum = norm.momentum if norm.momentum is not None else 1.0 / int(norm.num_batches_tracked)
    normed = F.batch_norm(
        branches.reshape(batch, -1, seq_len),
        norm.running_mean.view(-1),
        norm.running_var.view(-1),
        norm.weight.reshape(-1).to(x.dtype),
        norm.bias.reshape(-1).to(x.dtype),
        training=norm.training,
        momentum=momentum,
        eps=norm.eps,
    )
    return torch.einsum("bndl,nd->bdl", normed.view_as(branches), layer.alpha.to(x.dtype))


def grads(layer, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of ``x`` and of ``layer``'s parameters, in the order of their names."""
    return [x.grad] + [p.grad for _, p in sorted(layer.named_parameters())]


def check_fused_train_step(fast, ref, seq_lens: tuple[int, ...] = (96, 70), device: str = "cpu") -> None:
    """Training steps of ``fast`` (the fused BN form) against :func:`branch_bn_autograd` on its copy ``ref``, one
    per length in ``seq_lens`` (running statistics accumulate; another length takes another FFT length), float64:
    outputs, the input's and every parameter's gradient, running statistics."""
    dim = fast.dim
    for seq_len in seq_lens:
        x = (torch.randn(3, dim, seq_len, dtype=torch.float64, device=device) * 2 + 0.5).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        weight = torch.randn(3, dim, seq_len, dtype=torch.float64, device=device)
        y, y_ref = fast(x), branch_bn_autograd(ref, x_ref)
        assert y.device == x.device
        assert rel_err(y, y_ref) < 1e-10
        (y * weight).sum().backward()
        (y_ref * weight).sum().backward()
        for g, g_ref in zip(grads(fast, x), grads(ref, x_ref), strict=True):
            assert g_ref.abs().sum() > 0
            assert rel_err(g, g_ref) < 1e-9
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(fast.norm, name), getattr(ref.norm, name), rtol=1e-10, atol=1e-12)
