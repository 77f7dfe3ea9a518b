"""The layer's numerical equivalences on every available device, and shapes on ``meta``.

Parametrised over ``cpu`` and ``cuda`` (skipped where no CUDA device is present; ``make gpu-check``
runs this file on one): the fused training step against the plain-autograd reference (outputs,
gradients, running statistics), every form against the oracle kernels and the deploy form against
the train form, ``fft_conv`` and its gradients against ``conv1d``, the half-precision policy and the
deploy form's inference cache. On ``meta`` (lazy or empty-weight construction, as ``torch.device('meta')``
and accelerate's ``init_empty_weights`` do it) every form traces shapes, forward and backward.
The CPU-measured tuning (branch workspace, Toeplitz inference) stays on the CPU.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext import MRConv, MRConv2d, fft_conv
from mrconvnext.layers import deploy_form

from .reference import check_fused_train_step, direct_conv, random_mrconv, randomize_, rel_err
from .test_kernel_oracles import oracle_output

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
FORMS = [("sum", "batch"), ("sum", "scale"), ("concat", "batch")]
DIM, SEQ_LEN, KERNEL_SIZE = 5, 96, 6


def make_layer(device, kernel_type="fourier_sparse", bidirectional=True, combine="sum", branch_norm="batch", seed=0):
    layer = random_mrconv(
        DIM, SEQ_LEN, KERNEL_SIZE, seed, kernel_type=kernel_type, bidirectional=bidirectional, combine=combine,
        branch_norm=branch_norm,
    )  # fmt: skip
    return layer.double().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel_type", ["fourier_sparse", "dilated"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_train_step_matches_reference(device, kernel_type, bidirectional):
    fast = make_layer(device, kernel_type, bidirectional).train()
    check_fused_train_step(fast, copy.deepcopy(fast), (SEQ_LEN, 70), device)
    # the saved-branch workspace was measured on the CPU only; elsewhere every step allocates anew
    assert (fast.norm.workspace.storage is not None) == (torch.device(device).type == "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel_type", ["fourier", "fourier_sparse", "sparse", "dilated", "dense"])
@pytest.mark.parametrize("combine, norm", FORMS)
def test_every_form_matches_oracle_and_deploy_matches_train(device, kernel_type, combine, norm):
    layer = make_layer(device, kernel_type, True, combine, norm)
    cpu_layer = copy.deepcopy(layer).cpu()
    x = torch.randn(3, DIM, SEQ_LEN, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        trained = copy.deepcopy(layer).train()  # a training step updates the running statistics
        assert rel_err(trained(x.to(device)).cpu(), oracle_output(cpu_layer.train(), x)) < 1e-10
        layer.eval(), cpu_layer.eval()
        inputs = [x, x[..., :37]]  # 37: below the CPU's Toeplitz threshold
        expected = [oracle_output(cpu_layer, u) for u in inputs]
        for u, y in zip(inputs, expected, strict=True):
            assert rel_err(layer(u.to(device)).cpu(), y) < 1e-10
        layer.reparameterize()
        for u, y in zip(inputs, expected, strict=True):
            assert rel_err(layer(u.to(device)).cpu(), y) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fft_conv_and_gradients_match_direct_conv(device, bidirectional):
    torch.manual_seed(3)
    u = torch.randn(3, 4, 45, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn((2, 4, 60) if bidirectional else (4, 60), dtype=torch.float64, device=device, requires_grad=True)
    u_ref, k_ref = (t.detach().cpu().requires_grad_() for t in (u, k))
    weight = torch.randn(3, 4, 45, dtype=torch.float64)
    y = fft_conv(u, k, bidirectional)
    y_ref = direct_conv(u_ref, k_ref[..., :45], bidirectional)
    assert rel_err(y.cpu(), y_ref) < 1e-12
    (y * weight.to(device)).sum().backward()
    (y_ref * weight).sum().backward()
    assert rel_err(u.grad.cpu(), u_ref.grad) < 1e-12
    assert rel_err(k.grad.cpu(), k_ref.grad) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["train", "eval", "deploy"])
def test_half_precision_computes_in_float32(device, form):
    layer = make_layer(device).float()
    layer.train(form == "train")
    if form == "deploy":
        layer.reparameterize()
    x = torch.randn(4, DIM, SEQ_LEN, device=device)
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        expected = reference(x)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.float32 and rel_err(y, expected) < 1e-5
        y16 = copy.deepcopy(reference)(x.bfloat16())
        assert y16.dtype == torch.bfloat16 and rel_err(y16, expected) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seq_len", [49, 150])
@pytest.mark.parametrize("toeplitz", [True, False])  # the form the first call's timing picks (the CPU only)
def test_deploy_inference_cache_matches_and_invalidates(device, seq_len, toeplitz, monkeypatch):
    monkeypatch.setattr(deploy_form, "toeplitz_is_faster", lambda u, *args: toeplitz and u.device.type == "cpu")
    torch.manual_seed(0)
    layer = MRConv(DIM, 150, 10, kernel_type="fourier_sparse")
    randomize_(layer)
    layer = layer.double().eval().to(device)
    layer.reparameterize()
    x = torch.randn(2, DIM, seq_len, dtype=torch.float64, device=device)

    def expected():
        kernel, bias = (t.detach().cpu() for t in (layer.weight, layer.bias))
        return direct_conv(x.cpu(), kernel[..., :seq_len], True) + bias[:, None]

    with torch.no_grad():
        assert rel_err(layer(x).cpu(), expected()) < 1e-12
        assert rel_err(layer(x).cpu(), expected()) < 1e-12  # served from the cache
        (kernel,) = [kernel for _, kernel in layer._deploy_cache.values()]
        assert (kernel.ndim == 3 and not kernel.is_complex()) == (toeplitz and torch.device(device).type == "cpu")
        layer.weight.mul_(-0.5)  # an in-place update (optimizer step) invalidates
        layer.bias.add_(1.0)
        assert rel_err(layer(x).cpu(), expected()) < 1e-12


@pytest.mark.parametrize("kernel_type", ["fourier", "fourier_sparse", "sparse", "dilated", "dense"])
@pytest.mark.parametrize("combine, norm", FORMS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_meta_device_traces_shapes_in_every_form(kernel_type, combine, norm, bidirectional):
    with torch.device("meta"):
        layer = MRConv2d(
            DIM, 6 * 8, 4, kernel_type=kernel_type, combine=combine, branch_norm=norm, bidirectional=bidirectional
        )
    for form in ("train", "eval", "deploy"):
        layer.train(form == "train")
        if form == "deploy":
            layer.reparameterize()
        x = torch.empty(2, DIM, 6, 8, device="meta", requires_grad=True)
        y = layer(x)
        assert (y.shape, y.device, y.dtype) == (x.shape, x.device, x.dtype)
        y.sum().backward()
        assert x.grad.shape == x.shape
        with torch.no_grad():
            assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_meta_device_model_construction_traces_shapes():
    """timm-style lazy construction and accelerate's empty weights (buffers included, as BatchNorm
    models need) trace the model's output shape in train, eval and deploy form."""
    from accelerate import init_empty_weights

    for context in (torch.device("meta"), init_empty_weights(include_buffers=True)):
        with context:
            model = timm.create_model("mrconvnext_atto", num_classes=7)
        x = torch.empty(2, 3, 64, 64, device="meta")
        assert model.train()(x).shape == (2, 7)
        assert model.eval()(x).shape == (2, 7)
        model.reparameterize()
        assert model(x).shape == (2, 7)


def test_caches_are_per_layer_and_follow_to():
    """The Fourier bases and the deploy form's inference kernels live on the layer, not in process-global
    state, and are dropped when the layer is moved or cast."""
    torch.manual_seed(0)
    first, second = MRConv(4, 64, 8).eval(), MRConv(4, 64, 8).eval()
    x = torch.randn(2, 4, 64)
    with torch.no_grad():
        first(x)
        assert first.kernel._bases and not second.kernel._bases
        first.double()
        assert not first.kernel._bases
        first(x.double())
        assert {b.dtype for bases in first.kernel._bases.values() for _, b in bases} == {torch.float64}
        assert not copy.deepcopy(first).kernel._bases and first.kernel._bases
        first.reparameterize()
        first(x.double())
        assert first._deploy_cache
        assert not copy.deepcopy(first)._deploy_cache and first._deploy_cache
        first.float()
        assert not first._deploy_cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: make gpu-check runs for real")
def test_make_gpu_check_refuses_to_run_without_cuda():
    """Without a CUDA device the command stops at once with the reason, rather than skipping its point."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "gpu-check", f"PY={sys.executable}"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "make gpu-check needs a CUDA device" in result.stderr
