import io

import pytest
import torch

from mrconvnext import KERNEL_TYPES, MRConv, MRConv2d, resolution_lengths

from .reference import branch_reference, direct_conv, randomize_, rel_err

SEQ_LEN = 96
KERNEL_SIZE = 6


def make_layer(kernel_type="fourier", bidirectional=True, combine="sum", dim=5, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = MRConv(
        dim, SEQ_LEN, KERNEL_SIZE, kernel_type=kernel_type, bidirectional=bidirectional, combine=combine, **kwargs
    )
    randomize_(layer)
    return layer.eval()


def test_resolution_lengths():
    assert resolution_lengths(3136, 196) == ([196, 392, 784, 1568, 3136], [196, 392, 784, 1568, 3136])
    assert resolution_lengths(196, 28, max_resolutions=5) == ([28, 56, 112, 196], [28, 56, 112, 224])
    assert resolution_lengths(49, 28) == ([28, 49], [28, 56])
    assert resolution_lengths(3136, 196, max_resolutions=3)[0] == [196, 392, 784]
    assert resolution_lengths(100, 100) == ([100], [100])
    assert resolution_lengths(16384, 64, combine="concat")[0] == [64 * 2 ** max(i - 1, 0) for i in range(9)]


@pytest.mark.parametrize("kernel_type", sorted(KERNEL_TYPES))
def test_equal_parameter_count_per_resolution(kernel_type):
    layer = MRConv(4, 256, 8, kernel_type=kernel_type, bidirectional=True)
    num_kernel_params = sum(p.numel() for p in layer.kernel.parameters())
    num_res = len(layer.lengths)
    per_res = num_kernel_params / (num_res * 2 * 4)
    if kernel_type == "dense":
        assert num_kernel_params == sum(layer.lengths) * 2 * 4
    elif kernel_type == "fourier":
        assert per_res == 8  # 4 complex modes
    elif kernel_type == "fourier_sparse":
        assert per_res == 8 + 8 + 2  # fourier + sparse + their two scales
    else:
        assert per_res == 8


@pytest.mark.parametrize("kernel_type", sorted(KERNEL_TYPES))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_train_form_matches_branchwise_direct_conv(kernel_type, bidirectional):
    layer = make_layer(kernel_type, bidirectional)
    x = torch.randn(3, 5, SEQ_LEN)
    with torch.no_grad():
        assert rel_err(layer(x), branch_reference(layer, x)) < 1e-5


@pytest.mark.parametrize("kernel_type", sorted(KERNEL_TYPES))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_reparameterize_matches_train_form(kernel_type, bidirectional, combine):
    layer = make_layer(kernel_type, bidirectional, combine)
    inputs = [torch.randn(2, 5, n) for n in (SEQ_LEN, 37, 150)]
    with torch.no_grad():
        expected = [layer(x) for x in inputs]
        kernel, bias = layer.merged_kernel()
        layer.reparameterize()
        layer.reparameterize()  # idempotent
        assert layer.deploy
        names = {n for n, _ in layer.named_parameters()}
        assert names == {"weight", "bias"}
        assert not any(n.startswith(("kernel", "norm")) for n, _ in layer.named_buffers())
        for x, y in zip(inputs, expected, strict=True):
            assert rel_err(layer(x), y) < 1e-5
            # independent check of the merged kernel: direct conv1d in float64
            ref = direct_conv(x, kernel[..., : x.shape[-1]], bidirectional) + bias.double()[:, None]
            assert rel_err(layer(x), ref) < 1e-5
    expected_shape = (2, 5, layer.deploy_kernel_len) if bidirectional else (5, layer.deploy_kernel_len)
    assert tuple(layer.weight.shape) == expected_shape


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_deploy_state_dict_loads_strictly(combine):
    layer = make_layer("fourier_sparse", True, combine)
    layer.reparameterize()
    fresh = MRConv(5, SEQ_LEN, KERNEL_SIZE, kernel_type="fourier_sparse", combine=combine, deploy=True)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 5, SEQ_LEN)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x))


@pytest.mark.parametrize("kernel_type", sorted(KERNEL_TYPES))
@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_gradients_reach_every_parameter(kernel_type, combine):
    layer = make_layer(kernel_type, True, combine).train()
    x = torch.randn(4, 5, SEQ_LEN, requires_grad=True)
    (layer(x) * torch.randn(4, 5, SEQ_LEN)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_train_mode_uses_batch_statistics_and_updates_running_stats():
    layer = make_layer("fourier", True).train()
    before = layer.norm.running_mean.clone()
    x = torch.randn(4, 5, SEQ_LEN) * 3 + 1
    y = layer(x)
    assert not torch.allclose(layer.norm.running_mean, before)
    assert int(layer.norm.num_batches_tracked) == 1
    # reference: per-branch batch norm with batch statistics
    out = 0
    with torch.no_grad():
        for i, k in enumerate(layer.kernel()):
            c = direct_conv(x, k, True)
            mean = c.mean(dim=(0, 2), keepdim=True)
            var = c.var(dim=(0, 2), unbiased=False, keepdim=True)
            normed = (c - mean) / torch.sqrt(var + layer.norm.eps)
            normed = normed * layer.norm.weight[i].double()[:, None] + layer.norm.bias[i].double()[:, None]
            out = out + layer.alpha[i].double()[:, None] * normed
    assert rel_err(y.detach(), out) < 1e-5


@pytest.mark.parametrize("kernel_type", ["sparse", "fourier_sparse"])
def test_sparse_positions_survive_save_load(kernel_type):
    layer = make_layer(kernel_type, True, seed=1)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(12345)  # different random positions in the fresh layer
    fresh = MRConv(5, SEQ_LEN, KERNEL_SIZE, kernel_type=kernel_type).eval()
    positions = fresh.kernel.positions if kernel_type == "sparse" else fresh.kernel.sparse.positions
    saved = layer.kernel.positions if kernel_type == "sparse" else layer.kernel.sparse.positions
    assert not torch.equal(positions, saved)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(positions, saved)
    x = torch.randn(2, 5, SEQ_LEN)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x))


def test_sparse_positions_distinct_and_in_range():
    layer = MRConv(3, 200, 10, kernel_type="sparse")
    for i, length in enumerate(layer.lengths):
        pos = layer.kernel.positions[i]
        assert pos.min() >= 0 and pos.max() < length
        assert all(len(set(row.tolist())) == 10 for row in pos.reshape(-1, 10))


def test_concat_norm_buffer_has_fixed_shape_and_loads_into_fresh_layer():
    layer = make_layer("fourier", True, "concat")
    assert layer.kernel_norm.shape == (2, 5, 1)
    assert "kernel_norm" in layer.state_dict()
    fresh = MRConv(5, SEQ_LEN, KERNEL_SIZE, combine="concat")
    fresh.load_state_dict(layer.state_dict(), strict=True)
    torch.testing.assert_close(fresh.kernel_norm, layer.kernel_norm)


def test_concat_kernel_has_unit_norm_at_construction_and_decays():
    torch.manual_seed(0)
    layer = MRConv(4, 256, 8, kernel_type="dilated", combine="concat", decay=0.5)
    kernel = layer.merged_kernel()[0]
    torch.testing.assert_close(kernel.norm(dim=-1), torch.ones(2, 4))
    assert kernel.shape[-1] == 256


def test_fourier_resampling_is_band_limited_and_scaled():
    torch.manual_seed(0)
    layer = MRConv(3, 128, 8, kernel_type="fourier").eval()
    full = layer.kernel(rate=1)
    half = layer.kernel(rate=2)
    coeffs = layer.kernel.coefficients().detach()
    for i, (k_full, k_half) in enumerate(zip(full, half, strict=True)):
        n = k_full.shape[-1]
        assert k_half.shape[-1] == n // 2
        # modes at or above the new Nyquist frequency are dropped (no aliasing) ...
        keep = min(layer.kernel.num_modes, (n // 2 + 1) // 2)
        assert keep < layer.kernel.num_modes if i == 0 else keep == layer.kernel.num_modes
        low_pass = torch.fft.irfft(coeffs[i, ..., :keep], n=n, norm="forward")
        # ... and the rest is every second sample of the continuous kernel, scaled by the rate
        torch.testing.assert_close(k_half, 2 * low_pass[..., ::2], atol=1e-5, rtol=1e-4)
    x = torch.randn(2, 3, 64)
    assert layer(x, rate=2).shape == x.shape


def test_resampling_unsupported_kernels_raise():
    for kernel_type in ("dilated", "sparse", "fourier_sparse", "dense"):
        layer = MRConv(3, 64, 4, kernel_type=kernel_type)
        with pytest.raises(ValueError, match="cannot be resampled"):
            layer(torch.randn(1, 3, 32), rate=2)
    layer = MRConv(3, 64, 4).eval()
    layer.reparameterize()
    with pytest.raises(ValueError, match="reparameterize"):
        layer(torch.randn(1, 3, 32), rate=2)


def test_mrconv2d_flattens_row_major():
    torch.manual_seed(0)
    layer2d = MRConv2d(4, 6 * 8, 6, kernel_type="fourier").eval()
    randomize_(layer2d)
    x = torch.randn(2, 4, 6, 8)
    with torch.no_grad():
        y = layer2d(x)
        y_seq = MRConv.forward(layer2d, x.flatten(2))
    torch.testing.assert_close(y, y_seq.view_as(y))
    layer2d.reparameterize()
    with torch.no_grad():
        assert rel_err(layer2d(x), y) < 1e-5
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        layer2d(x.flatten(2))


def test_autocast_keeps_fft_in_float32():
    layer = make_layer("fourier", True)
    x = torch.randn(2, 5, SEQ_LEN)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.float32
        assert rel_err(y, ref) < 1e-5
        y16 = layer(x.bfloat16())
        assert y16.dtype == torch.bfloat16
        assert rel_err(y16, ref) < 2e-2


def test_bad_inputs_raise_clear_errors():
    layer = MRConv(4, 32, 4)
    with pytest.raises(ValueError, match=r"\(B, dim, L\)"):
        layer(torch.randn(4, 32))
    with pytest.raises(ValueError, match="expects 4 channels"):
        layer(torch.randn(2, 3, 32))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="kernel_size"):
        MRConv(4, 32, 0)
    with pytest.raises(ValueError, match="kernel_size"):
        MRConv(4, 32, 33)
    with pytest.raises(ValueError, match="unknown kernel_type 'gaussian'"):
        MRConv(4, 32, 4, kernel_type="gaussian")
    with pytest.raises(ValueError, match="unknown combine 'mean'"):
        MRConv(4, 32, 4, combine="mean")
