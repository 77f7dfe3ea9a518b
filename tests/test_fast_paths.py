"""Optimized paths (fused train step, cached/Toeplitz inference, ``branch_norm='scale'``) against plain references."""

import copy
import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mrconvnext import MRConv, MRConv2d
from mrconvnext.layers import deploy_form
from mrconvnext.layers.branch_norm import branch_bn_conv
from mrconvnext.layers.fft_conv import (
    channel_chunk,
    conv_buffer,
    fft_conv,
    fft_conv_spectrum,
    fft_length,
    kernel_spectrum,
    toeplitz_kernel,
)

from .reference import (
    branch_bn_autograd,
    check_fused_train_step,
    direct_conv,
    grads,
    random_mrconv,
    randomize_,
    rel_err,
)

fft_conv_module = importlib.import_module("mrconvnext.layers.fft_conv")  # the package exports the function fft_conv

SEQ_LEN = 96
KERNEL_SIZE = 6


def make_pair(kernel_type="fourier", bidirectional=True, dim=5, seed=0, **kwargs):
    """Two identical float64 layers in train mode with random parameters and running statistics."""
    layer = random_mrconv(
        dim, SEQ_LEN, KERNEL_SIZE, seed, kernel_type=kernel_type, bidirectional=bidirectional, **kwargs
    )
    layer = layer.double().train()
    return layer, copy.deepcopy(layer)


@pytest.mark.parametrize("kernel_type", ["fourier", "fourier_sparse", "dilated", "dense"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_train_step_matches_reference(kernel_type, bidirectional, momentum):
    check_fused_train_step(*make_pair(kernel_type, bidirectional, bn_momentum=momentum), (SEQ_LEN, 70))


def test_fused_train_step_float32_and_no_grad():
    fast, ref = make_pair("fourier_sparse", True)
    fast, ref = fast.float(), ref.float()
    x = torch.randn(4, 5, SEQ_LEN)
    with torch.no_grad():
        assert rel_err(fast(x), branch_bn_autograd(ref, x)) < 1e-5
    torch.testing.assert_close(fast.norm.running_var, ref.norm.running_var)
    with pytest.raises(ValueError, match="more than 1 value"):
        fast(torch.randn(1, 5, 1))


def test_branch_storage_reused_only_when_no_graph_holds_it():
    """The saved branch outputs live in a per-layer workspace: reused after backward, never while a
    graph still needs them (two forwards before one backward, as in gradient accumulation)."""
    fast, ref = make_pair("fourier_sparse", True, seed=6)
    xs = [torch.randn(3, 5, SEQ_LEN, dtype=torch.float64) * 2 + 0.5 for _ in range(3)]
    weights = [torch.randn(3, 5, SEQ_LEN, dtype=torch.float64) for _ in range(3)]
    (fast(xs[0]) * weights[0]).sum().backward()
    first = fast.norm.workspace.storage
    assert first is not None
    # two graphs alive at once: the second forward must not overwrite the first one's branches
    losses = [(fast(x) * w).sum() for x, w in zip(xs[1:], weights[1:], strict=True)]
    assert fast.norm.workspace.storage.data_ptr() != first.data_ptr()
    sum(losses).backward()
    for x, w in zip(xs, weights, strict=True):
        (branch_bn_autograd(ref, x) * w).sum().backward()
    for g, g_ref in zip(grads(fast, xs[0]), grads(ref, xs[0]), strict=True):
        if g is not None:  # the inputs do not require grad here
            assert rel_err(g, g_ref) < 1e-9
    # after backward the storage is free again: the next step reuses it
    held = fast.norm.workspace.storage
    (fast(xs[0]) * weights[0]).sum().backward()
    assert fast.norm.workspace.storage.data_ptr() == held.data_ptr()
    assert copy.deepcopy(fast).norm.workspace.storage is None
    fast.eval()
    assert fast.norm.workspace.storage is None


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_fused_train_step_float32_with_offset_inputs(offset):
    """Branch means come from the spectra (Parseval) and the saved branches are centred: with inputs
    whose mean dwarfs their spread, float32 outputs, gradients and running statistics still match
    the float64 reference to float32 accuracy."""
    fast, ref = make_pair("fourier_sparse", True, seed=5)
    fast = fast.float()
    x = torch.randn(4, 5, SEQ_LEN, dtype=torch.float64) * 0.1 + offset
    x_fast, x_ref = x.float().requires_grad_(), x.clone().requires_grad_()
    weight = torch.randn(4, 5, SEQ_LEN, dtype=torch.float64)
    y, y_ref = fast(x_fast), branch_bn_autograd(ref, x_ref)
    assert rel_err(y.double(), y_ref) < 2e-5
    (y.double() * weight).sum().backward()
    (y_ref * weight).sum().backward()
    for g, g_ref in zip(grads(fast, x_fast), grads(ref, x_ref), strict=True):
        assert rel_err(g.double(), g_ref) < 2e-4
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(fast.norm, name).double(), getattr(ref.norm, name)) < 2e-5


@pytest.mark.parametrize("bidirectional", [False, True])
def test_eval_train_form_merges_branches_exactly(bidirectional):
    fast, ref = make_pair("fourier_sparse", bidirectional)
    fast.eval(), ref.eval()
    x = torch.randn(2, 5, 80, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fast(x), branch_bn_autograd(ref, x_ref)
    assert rel_err(y, y_ref) < 1e-10
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    for g, g_ref in zip(grads(fast, x), grads(ref, x_ref), strict=True):
        if g_ref is None:  # BN statistics are constants in eval mode
            continue
        assert rel_err(g, g_ref) < 1e-9


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("seq_len", [1, 49, 128, 129, 200])
def test_toeplitz_kernel_matches_direct_conv(bidirectional, seq_len):
    torch.manual_seed(seq_len)
    u = torch.randn(3, 4, seq_len, dtype=torch.float64)
    k = torch.randn((2, 4, 150) if bidirectional else (4, 150), dtype=torch.float64)
    y = torch.bmm(u.transpose(0, 1), toeplitz_kernel(k, seq_len, bidirectional)).transpose(0, 1)
    assert rel_err(y, direct_conv(u, k[..., :seq_len], bidirectional)) < 1e-12


def test_spectrum_bias_rides_in_dc_bin():
    torch.manual_seed(0)
    u = torch.randn(2, 3, 40, dtype=torch.float64)
    k = torch.randn(2, 3, 40, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    n = fft_length(40, 40, True)
    y = fft_conv_spectrum(u, kernel_spectrum(k, 40, n, True), n, bias)
    assert rel_err(y, direct_conv(u, k, True) + bias[:, None]) < 1e-12


@pytest.mark.parametrize("seq_len", [49, 150])  # Toeplitz and FFT inference paths
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cached_deploy_path_matches_and_invalidates(seq_len, bidirectional):
    torch.manual_seed(0)
    layer = MRConv(5, 150, 10, kernel_type="fourier_sparse", bidirectional=bidirectional)
    randomize_(layer)
    layer = layer.double().eval()
    layer.reparameterize()
    x = torch.randn(2, 5, seq_len, dtype=torch.float64)

    def expected():
        return direct_conv(x, layer.weight.detach()[..., :seq_len], bidirectional) + layer.bias.detach()[:, None]

    with torch.no_grad():
        assert rel_err(layer(x), expected()) < 1e-12
        assert rel_err(layer(x), expected()) < 1e-12  # served from the cache
        layer.weight.mul_(-0.5)  # in-place update (optimizer step) invalidates
        layer.bias.add_(1.0)
        assert rel_err(layer(x), expected()) < 1e-12
        state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        assert rel_err(layer(x), expected()) < 1e-12
        y32 = layer.float()(x.float())
        assert y32.dtype == torch.float32 and rel_err(y32, expected()) < 1e-5
    # with gradients the plain differentiable path runs and agrees
    y = layer.double()(x)
    assert rel_err(y, expected()) < 1e-12
    y.sum().backward()
    assert layer.weight.grad is not None


def test_cached_path_keeps_mrconv2d_layout():
    torch.manual_seed(0)
    layer = MRConv2d(4, 7 * 7, 5).eval()
    randomize_(layer)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        ref = layer(x)
        layer.reparameterize()
        assert rel_err(layer(x), ref) < 1e-5
        assert rel_err(layer(x.bfloat16()).float(), ref) < 2e-2


@pytest.mark.parametrize("size, batch, toeplitz", [(7, 3, True), (14, 100, False)])
def test_channels_last_deploy_input_matches_direct_conv(size, batch, toeplitz, monkeypatch):
    """Channels-last maps (ConvNeXt's residual stream) are read in blocks of whole cache lines of
    channels (more channels than the cache-sized block) and copied for the Toeplitz batched matmul."""
    monkeypatch.setattr(deploy_form, "toeplitz_is_faster", lambda *args: toeplitz)
    monkeypatch.setattr(fft_conv_module, "cpu_cache", lambda: (1 << 20, 64))  # 1 MiB L2, 64-byte lines
    torch.manual_seed(0)
    layer = MRConv2d(40, size * size, 9, kernel_type="fourier_sparse").double().eval()
    randomize_(layer)
    layer.reparameterize()
    x = torch.randn(batch, 40, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    flat = x.reshape(batch, 40, -1)
    if size == 14:  # the cache-sized block would hold 3 channels, a cache line holds 8 float64 ones
        assert channel_chunk(flat, fft_length(196, 196, True)) == 8
    expected = direct_conv(flat, layer.weight.detach(), True) + layer.bias.detach()[:, None]
    with torch.no_grad():
        assert rel_err(layer(x).reshape(batch, 40, -1), expected) < 1e-12


def test_deploy_form_is_chosen_by_timing_each_input_shape(monkeypatch):
    """The first inference call of a shape times the Toeplitz and the FFT form and keeps the faster; matrices
    beyond TOEPLITZ_MAX_BYTES and non-CPU inputs are not timed."""
    timed = []

    def fake_fastest(fn, repeats=7):  # the Toeplitz form runs first: it "takes" 1 s at L = 20, 3 s at L = 30
        timed.append(fn)
        return {20: 1.0, 30: 3.0}[shape[-1]] if len(timed) % 2 else 2.0

    monkeypatch.setattr(deploy_form, "fastest", fake_fastest)
    monkeypatch.setattr(deploy_form, "_FASTER", {})
    weight, bias = torch.randn(2, 4, 30, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for shape, toeplitz in (((2, 4, 20), True), ((2, 4, 30), False), ((2, 4, 20), True)):
        assert deploy_form.toeplitz_is_faster(torch.randn(shape, dtype=torch.float64), weight, bias, True) == toeplitz
    assert len(timed) == 4  # the repeated shape is not timed again
    monkeypatch.setattr(deploy_form, "TOEPLITZ_MAX_BYTES", 4 * 30 * 30 * 8 - 1)
    assert not deploy_form.toeplitz_is_faster(torch.randn(2, 4, 30, dtype=torch.float64), weight, bias, False)
    assert len(timed) == 4
    with FlopCounterMode(display=False):  # counted ops are the FFT form's on every machine, nothing timed
        assert not deploy_form.toeplitz_is_faster(torch.randn(2, 4, 25, dtype=torch.float64), weight, bias, True)
    assert len(timed) == 4
    layer = MRConv2d(4, 25, 5).double().eval()
    layer.reparameterize()
    monkeypatch.setattr(deploy_form, "fastest", lambda fn, repeats=7: fn() is None)  # runs both forms for real
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = direct_conv(x.flatten(2), layer.weight, True) + layer.bias[:, None]
        assert rel_err(layer(x).flatten(2), expected) < 1e-12


# ----------------------------------------------------------------------------- branch_norm='scale'
@pytest.mark.parametrize("kernel_type", ["fourier", "fourier_sparse", "sparse", "dilated"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_scale_norm_matches_reference_and_reparameterizes(kernel_type, bidirectional):
    torch.manual_seed(0)
    layer = MRConv(5, SEQ_LEN, KERNEL_SIZE, kernel_type=kernel_type, bidirectional=bidirectional, branch_norm="scale")
    # normalised at construction: every sub-kernel has unit norm per direction and channel
    with torch.no_grad():
        for i, k in enumerate(layer.kernel()):
            torch.testing.assert_close((k / layer.kernel_norm[i]).norm(dim=-1), torch.ones(k.shape[:-1]))
    randomize_(layer)
    layer = layer.double()
    x = torch.randn(3, 5, SEQ_LEN, dtype=torch.float64)
    ref = sum(
        layer.alpha[i].detach()[:, None]
        * direct_conv(
            x, (k / layer.kernel_norm[i]).detach() if bidirectional else (k / layer.kernel_norm[i])[0], bidirectional
        )
        for i, k in enumerate(layer.kernel())
    )
    y = layer(x)
    assert rel_err(y, ref) < 1e-10
    y.pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        layer.reparameterize()
        assert rel_err(layer(x), ref) < 1e-10
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias"}
    assert not dict(layer.named_buffers())


@pytest.mark.parametrize(
    "kernel_type, rate",
    [("fourier", 1.0), ("fourier", 2.0), ("fourier", 0.5), ("fourier_sparse", 1.0), ("sparse", 1.0)],
)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_kernel_merge_matches_padded_sum_of_sub_kernels(kernel_type, rate, bidirectional):
    """``SubKernels.merge`` (cached Fourier bases, sparse scatter_add) vs Eq. 7 on the sub-kernel list."""
    torch.manual_seed(0)
    # seq_len 100 with l_0 = 6: the last resolution (nominal 192) is cut to 100 taps
    layer = MRConv(4, 100, KERNEL_SIZE, kernel_type=kernel_type, bidirectional=bidirectional).double()
    randomize_(layer)
    kernel = layer.kernel
    weights = torch.randn(layer.num_resolutions, layer.num_directions, 4, 1, dtype=torch.float64, requires_grad=True)
    merged = kernel.merge(weights, rate)
    subs = kernel(rate)
    length = subs[-1].shape[-1]
    ref = sum(w * torch.nn.functional.pad(k, (0, length - k.shape[-1])) for w, k in zip(weights, subs, strict=True))
    assert merged.shape == ref.shape
    assert rel_err(merged, ref) < 1e-12
    out_grad = torch.randn_like(ref)
    inputs = [weights, *kernel.parameters()]
    for g, g_ref in zip(
        torch.autograd.grad(merged, inputs, out_grad), torch.autograd.grad(ref, inputs, out_grad), strict=True
    ):
        assert g_ref.abs().sum() > 0
        assert rel_err(g, g_ref) < 1e-12


def test_fourier_bases_first_built_in_inference_mode_still_train():
    torch.manual_seed(0)
    layer = MRConv(4, 57, 7, branch_norm="scale")  # a sampling plan no other test uses: built fresh here
    x = torch.randn(2, 4, 57)
    with torch.inference_mode():
        expected = layer(x)
    y = layer(x)
    y.sum().backward()  # the cached bases must be usable by autograd
    assert layer.alpha.grad.abs().sum() > 0
    torch.testing.assert_close(y.detach(), expected)


def test_scale_norm_state_dict_and_bad_options():
    torch.manual_seed(0)
    layer = MRConv(4, 64, 8, branch_norm="scale")
    assert layer.kernel_norm.shape == (len(layer.lengths), 2, 4, 1)
    assert {"kernel_norm", "alpha"} <= set(layer.state_dict())
    assert not hasattr(layer, "norm")
    torch.manual_seed(1)
    fresh = MRConv(4, 64, 8, branch_norm="scale")
    assert not torch.equal(fresh.kernel_norm, layer.kernel_norm)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 4, 64)
    torch.testing.assert_close(fresh(x), layer(x))
    with pytest.raises(ValueError, match="unknown branch_norm 'layer'"):
        MRConv(4, 64, 8, branch_norm="layer")
    with pytest.raises(ValueError, match="needs combine='sum'"):
        MRConv(4, 64, 8, branch_norm="scale", combine="concat")


def test_fft_conv_still_matches_after_refactor():
    torch.manual_seed(0)
    u = torch.randn(2, 3, 33, dtype=torch.float64)
    k = torch.randn(2, 3, 50, dtype=torch.float64)
    assert rel_err(fft_conv(u, k, True), direct_conv(u, k[..., :33], True)) < 1e-12


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fft_conv_gradients_match_direct_conv(bidirectional):
    """``fft_conv``'s hand-written backward against autograd through ``conv1d`` (float64)."""
    torch.manual_seed(3)
    u = torch.randn(3, 4, 45, dtype=torch.float64, requires_grad=True)
    k = torch.randn((2, 4, 60) if bidirectional else (4, 60), dtype=torch.float64, requires_grad=True)
    u_ref = u.detach().clone().requires_grad_()
    k_ref = k.detach().clone().requires_grad_()
    weight = torch.randn(3, 4, 45, dtype=torch.float64)
    (fft_conv(u, k, bidirectional) * weight).sum().backward()
    (direct_conv(u_ref, k_ref[..., :45], bidirectional) * weight).sum().backward()
    assert rel_err(u.grad, u_ref.grad) < 1e-12
    assert rel_err(k.grad, k_ref.grad) < 1e-12


def test_fused_functions_pass_gradcheck():
    torch.manual_seed(4)
    u = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    kb = torch.randn(2, 3, 20, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, k, b: conv_buffer(u, k[0], b), (u, kb, bias))
    gamma, beta, alpha = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *args: branch_bn_conv(*args, 1e-5)[0], (u, kb, gamma, beta, alpha))


def test_deploy_layer_built_in_inference_mode_is_not_cached():
    """Inference tensors have no version counter: the layer still runs, recomputing its spectrum."""
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = MRConv(4, 150, 10).eval()
        layer.reparameterize()
        x = torch.randn(2, 4, 150)
        y = layer(x)
        layer.weight.mul_(2.0)
        assert rel_err(layer(x), 2 * y - layer.bias[:, None]) < 1e-5
        assert not layer._deploy_cache


@pytest.mark.parametrize("form", ["deploy", "batch", "scale"])
def test_torch_compile_traces_without_recompiling(form):
    """Dynamo (``backend='eager'``: tracing only, no C++ compiler) matches eager mode and compiles once.

    The deploy form's spectrum cache and the cached Fourier bases are Python state; under
    ``torch.compile`` they are bypassed so guards do not change between calls.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MRConv2d(6, 64, 8, branch_norm="scale" if form == "scale" else "batch", max_resolutions=3)
    randomize_(layer)
    if form == "deploy":
        layer.eval().reparameterize()
    reference = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    x = torch.randn(3, 6, 8, 8)

    def check_no_grad():  # the deploy form's cached inference path
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)

    def check_grad():
        x_c, x_r = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = compiled(x_c), reference(x_r)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        y.pow(2).sum().backward()
        y_ref.pow(2).sum().backward()
        torch.testing.assert_close(x_c.grad, x_r.grad, rtol=1e-4, atol=1e-5)

    for check in (check_no_grad, check_grad):  # one compilation per grad mode, then none
        check()
        with torch._dynamo.config.patch(error_on_recompile=True):
            check()
            check()
    for (name, p), p_ref in zip(layer.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)
