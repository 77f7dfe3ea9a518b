"""ONNX (onnxruntime) and torch.export of the deploy graphs: exactness, parity, dynamic batch, errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext import LongConv, MRConv, MRConv2d
from mrconvnext.export import main as export_main
from mrconvnext.layers.long_conv import RuntimeCosts, calibrate, dft_ops, plan_long_conv, toeplitz_ops
from mrconvnext.utils.onnx import (
    example_inputs,
    export_form,
    export_onnx,
    torch_export,
)

ROOT = Path(__file__).resolve().parents[1]


def direct_conv(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """float64 reference: ``y[t] = sum_j c[j] u[t - j] + sum_j a[j] u[t + 1 + j] + bias`` with ``conv1d``."""
    x = x.double()
    dim, length = x.shape[1], x.shape[2]
    causal = (kernel[0] if bidirectional else kernel).double()
    y = F.conv1d(F.pad(x, (causal.shape[1] - 1, 0)), causal.flip(-1)[:, None], groups=dim)[..., :length]
    if bidirectional:
        anticausal = kernel[1].double()
        y = y + F.conv1d(F.pad(x[..., 1:], (0, anticausal.shape[1])), anticausal[:, None], groups=dim)[..., :length]
    return y + bias.double()[:, None]


def randomize_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-trivial BatchNorm statistics and affines, MRConv alphas and ConvNeXt layer scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_mean"):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(("norm.weight", "alpha", "gamma")):
                tensor.copy_(0.5 + 0.5 * torch.rand(tensor.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("method", ["toeplitz", "matmul", "dft", "auto"])
@pytest.mark.parametrize(
    ("seq_len", "kernel_len", "bidirectional"),
    [(49, 49, True), (100, 30, True), (137, 200, False), (7, 3, True), (1, 1, False)],
)
def test_long_conv_matches_direct_convolution(method, seq_len, kernel_len, bidirectional):
    torch.manual_seed(seq_len)
    dim = 5
    kernel = torch.randn(2, dim, kernel_len) if bidirectional else torch.randn(dim, kernel_len)
    bias = torch.randn(dim)
    x = torch.randn(3, dim, seq_len)
    ref = direct_conv(x, kernel, bias, bidirectional)
    y = LongConv(kernel, bias, seq_len, bidirectional, method=method)(x)
    assert y.dtype == torch.float32
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6


@pytest.mark.parametrize(
    ("seq_len", "kernel_len", "bidirectional", "factors"),
    [
        (49, 49, True, (98,)),  # one step: the dense DFT
        (49, 49, True, (25, 4)),  # input padded to 13 rows of 4
        (100, 30, True, (13, 10)),  # odd first factor: no Nyquist row
        (137, 200, False, (7, 5, 8)),
        (196, 196, True, (7, 8, 7)),
        (784, 784, True, (8, 7, 4, 7)),  # four steps
        (50, 20, False, (3, 3, 3, 3)),
        (7, 3, True, (16,)),
    ],
)
def test_factored_dft_matches_direct_convolution(seq_len, kernel_len, bidirectional, factors):
    """Every number of factored-DFT steps, with and without padding and Hermitian pairs, on a batch and an image."""
    torch.manual_seed(seq_len)
    dim = 6
    kernel = torch.randn(2, dim, kernel_len) if bidirectional else torch.randn(dim, kernel_len)
    bias = torch.randn(dim)
    x = torch.randn(3, dim, seq_len)
    ref = direct_conv(x, kernel, bias, bidirectional)
    conv = LongConv(kernel, bias, seq_len, bidirectional, method="matmul", factors=factors)
    assert conv.factors == factors and conv.n == math.prod(factors)
    assert _max_rel(conv(x), ref) < 2e-6
    height = 7 if seq_len % 7 == 0 else 1
    image = LongConv(kernel, bias, seq_len, bidirectional, image=True, method="matmul", factors=factors)
    y = image(x.reshape(3, dim, height, seq_len // height))
    assert y.shape == (3, dim, height, seq_len // height) and _max_rel(y.reshape(3, dim, seq_len), ref) < 2e-6


def _synthetic_costs(mac_s: float, call_s: float, element_s: float) -> RuntimeCosts:
    return RuntimeCosts(mac_s, call_s, ((1e3, element_s), (1e9, element_s)))


def test_cost_model_counts_and_choices():
    """MACs of the forms against counts written out by hand; the plan follows the prices it is given."""
    assert sum(op.macs for op in toeplitz_ops(49, 768, batch=8)) == 8 * 768 * 49**2
    # one step, n = 98: forward (4 * 50 rows x 49 inputs) and inverse (49 x 200) per channel
    assert sum(op.macs for op in dft_ops(49, 10, (98,))) == 2 * 200 * 49 * 10
    # two steps, n = 98 = 14 x 7: first (2 * 8 rows x 7 input rows x 7 columns), second (8 prefixes x 28 x 14 x 1)
    assert sum(op.macs for op in dft_ops(49, 10, (14, 7))) == 2 * (16 * 7 * 7 + 8 * 28 * 14) * 10
    calls = sum(op.calls for op in dft_ops(3136, 96, (64, 14, 7), batch=2))
    assert calls == 2 * (2 + 2 * 33 + 2 * 33 * 14)
    macs_only = _synthetic_costs(1e-9, 0.0, 0.0)
    calls_only = _synthetic_costs(0.0, 1.0, 0.0)
    method, few_macs = plan_long_conv(3136, 96, 3136, 3135, "matmul", macs_only)
    assert method == "matmul" and len(few_macs) > 2
    assert plan_long_conv(3136, 96, 3136, 3135, "matmul", calls_only)[1] == (6272,)  # one step: the fewest GEMMs
    assert plan_long_conv(49, 768, 49, 48, "auto", macs_only)[0] == "toeplitz"  # D L^2 < any DFT's MACs
    assert plan_long_conv(49, 768, 49, 48, "auto", _synthetic_costs(0.0, 0.0, 1e-9))[0] == "matmul"


def test_calibration_recovers_the_prices():
    """calibrate() on probes timed by a known cost model returns that model's prices."""
    truth = dict(fixed=2e-5, mac_s=3e-11, call_s=2e-7, element_s=4e-10)

    def time_matmul(a, b):
        calls = math.prod(a[:-2]) * math.prod(b[:-3]) if len(a) > 2 else b[0]
        out = math.prod(b[:-2]) * a[-2] * b[-1]
        return truth["fixed"] + out * a[-1] * truth["mac_s"] + calls * truth["call_s"] + out * truth["element_s"]

    def time_mul(x, c):
        return truth["fixed"] + math.prod(x) * truth["element_s"]

    costs = calibrate(time_matmul, time_mul)
    assert costs.mac_s == pytest.approx(truth["mac_s"], rel=1e-6)
    assert costs.call_s == pytest.approx(truth["call_s"], rel=1e-3)
    assert all(price == pytest.approx(truth["element_s"], rel=1e-6) for _, price in costs.element_s)


@pytest.mark.parametrize("cls", [MRConv, MRConv2d])
def test_long_conv_from_train_and_deploy_form(cls):
    """Both forms give the layer's own merged kernel; image layers flatten (B, C, H, W) row-major."""
    torch.manual_seed(0)
    layer = randomize_statistics(cls(6, 48, 8, kernel_type="fourier_sparse", bidirectional=True))
    x = torch.randn(2, 6, 6, 8) if cls is MRConv2d else torch.randn(2, 6, 48)
    kernel, bias = layer.merged_kernel()
    ref = direct_conv(x.reshape(2, 6, 48), kernel, bias, True).reshape(x.shape)
    for method in ("toeplitz", "matmul"):
        assert ((LongConv.from_mrconv(layer, method)(x).double() - ref).abs().max() / ref.abs().max()) < 2e-6
    layer.reparameterize()
    assert ((LongConv.from_mrconv(layer)(x).double() - ref).abs().max() / ref.abs().max()) < 2e-6


def test_long_conv_errors():
    layer = MRConv(4, 32, 4)
    with pytest.raises(ValueError, match="eval mode"):
        LongConv.from_mrconv(layer.train())
    conv = LongConv.from_mrconv(layer.eval())
    with pytest.raises(ValueError, match="planned length L=32"):
        conv(torch.randn(1, 4, 33))
    with pytest.raises(ValueError, match="rate=2"):
        conv(torch.randn(1, 4, 32), rate=2)
    with pytest.raises(ValueError, match="unknown long-convolution method 'fft'"):
        LongConv.from_mrconv(layer, "fft")
    with pytest.raises(ValueError, match="GiB per call"):
        LongConv(torch.zeros(2, 64, 8), torch.zeros(64), 4096, True, method="toeplitz")
    with pytest.raises(ValueError, match="product of at least 63"):
        LongConv(torch.zeros(2, 4, 32), torch.zeros(4), 32, True, method="matmul", factors=(4, 4))
    with pytest.raises(TypeError, match="MRConvNeXt and MRConvSequenceModel"):
        export_form(timm.create_model("convnext_atto"))


def _ort_run(path: Path, *inputs: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return torch.from_numpy(session.run(None, feed)[0])


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def test_onnx_mrconvnext_atto(tmp_path):
    """Train form in eval mode, exported: metadata with the planned size, dynamic batch, parity < 1e-4."""
    torch.manual_seed(0)
    model = randomize_statistics(timm.create_model("mrconvnext_atto", img_size=64, num_classes=7))
    path, error = export_onnx(model, tmp_path / "atto.onnx")
    assert error < 1e-4
    proto = onnx.load(str(path))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["img_size"] == [64, 64] and meta["form"] == "deploy"
    assert meta["inputs"] == {"images": {"shape": ["batch", 3, 64, 64], "dtype": "float32"}}
    assert sorted({m["seq_len"] for m in meta["long_conv"]}) == [4, 16, 64, 256]
    for layer in meta["long_conv"]:  # the form the cost model picked, and the DFT's factors
        assert layer["method"] in ("matmul", "toeplitz") and bool(layer["factors"]) == (layer["method"] == "matmul")
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    model.reparameterize()
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            assert _max_rel(_ort_run(path, x), model(x)) < 1e-4


@pytest.mark.parametrize(
    ("name", "args", "lengths"),
    [
        ("mrconv_listops_base", dict(seq_len=200, depth=2, embed_dim=32), True),  # causal, sum, padded tokens
        ("mrconv_retrieval_base", dict(seq_len=96, depth=2, embed_dim=32), True),  # bidirectional pairs, padded
        ("mrconv_pathx_base", dict(seq_len=1024, depth=2, embed_dim=16), False),  # bidirectional concat, images
    ],
)
def test_onnx_sequence_models(tmp_path, name, args, lengths):
    torch.manual_seed(0)
    model = randomize_statistics(timm.create_model(name, **args))
    model.reparameterize()
    path, error = export_onnx(model, tmp_path / "model.onnx", lengths=lengths)
    assert error < 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["seq_len"] == args["seq_len"]
    assert ("lengths" in meta["inputs"]) == lengths
    inputs = example_inputs(model, batch=5, lengths=lengths, seed=7)
    with torch.no_grad():
        ref = model(*inputs)
    assert _max_rel(_ort_run(path, *inputs), ref) < 1e-4
    if lengths:  # padding content does not reach the logits
        x, valid = inputs
        noisy = x.clone()
        positions = torch.arange(x.shape[-1])
        pad = positions >= valid[..., None]
        noisy[pad] = (noisy[pad] + 1) % model.vocab_size
        assert _max_rel(_ort_run(path, noisy, valid), ref) < 1e-4


@pytest.mark.parametrize("deploy", [True, False])
@pytest.mark.parametrize(
    ("name", "args"),
    [("mrconvnext_atto", dict(img_size=64)), ("mrconv_text_base", dict(seq_len=64, depth=2, embed_dim=16))],
)
def test_torch_export_round_trip(tmp_path, name, args, deploy):
    """torch.export of the deploy form and the eval train form, saved and loaded, with another batch size."""
    torch.manual_seed(0)
    model = randomize_statistics(timm.create_model(name, **args))
    if deploy:
        model.reparameterize()
    lengths = name.startswith("mrconv_")
    program = torch_export(model, lengths=lengths)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    inputs = example_inputs(model, batch=5, lengths=lengths, seed=3)
    with torch.no_grad():
        assert _max_rel(loaded(*inputs), model(*inputs)) < 1e-4
    with pytest.raises(Exception, match="batch|shape|size"):
        loaded(torch.randn(2, 3, 32, 32)) if not lengths else loaded(inputs[0][:, :10], inputs[1])


@pytest.mark.parametrize("deploy", [True, False])
def test_timm_onnx_export_with_dynamo(tmp_path, deploy):
    """timm's ``onnx_export(..., use_dynamo=True)`` (its onnx_export.py --dynamo): MRConv exports its convolution in
    ONNX-friendly ops (power-of-two real FFTs, no complex tensors in the graph); onnxruntime agrees, dynamic batch."""
    from timm.utils.onnx import onnx_export

    torch.manual_seed(0)
    model = randomize_statistics(timm.create_model("mrconvnext_atto", img_size=32, depths=(1, 1, 1, 1), num_classes=5))
    if deploy:
        model = timm.utils.reparameterize_model(model)  # onnx_export.py --reparam
    path = tmp_path / "model.onnx"
    onnx_export(model, str(path), input_size=(3, 32, 32), batch_size=2, use_dynamo=True, check_forward=True)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "DFT" in ops
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert _max_rel(_ort_run(path, x), model(x)) < 1e-5


def test_torchscript_is_refused_with_the_ways_to_export() -> None:
    """``torch.jit.script`` (timm's ``--torchscript``) and ``torch.jit.trace`` (timm's onnx_export without dynamo)
    stop with one error naming the exporters that take MRConv, not TorchScript's on some Python construct."""
    model = timm.create_model("mrconvnext_atto", img_size=32).eval()
    with pytest.raises(RuntimeError, match="cannot be scripted by TorchScript: export MRConv models with"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match="cannot be traced by TorchScript: .*mrconvnext.export --format onnx"):
        torch.jit.trace(model, torch.randn(1, 3, 32, 32))


def test_export_cli_onnx_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main(["--format", "onnx", "--form", "train", "--model", "mrconvnext_atto", "--checkpoint", "x.pth",
                     "--output", str(tmp_path)])  # fmt: skip
    assert "deploy form only" in capsys.readouterr().err
    argv = ["--format", "onnx", "--output", str(tmp_path / "out"), "--checkpoint"]
    assert export_main([*argv, str(tmp_path / "missing.pth")]) == 1
    assert "missing.pth" in capsys.readouterr().err
    checkpoint = tmp_path / "listops.pth"
    torch.save(timm.create_model("mrconv_listops_base", depth=2).state_dict(), checkpoint)
    assert export_main([*argv, str(checkpoint), "--model", "resnet18"]) == 1
    assert "'resnet18' is not an MRConv model" in capsys.readouterr().err
    assert export_main([*argv, str(checkpoint), "--model", "mrconv_listops_base"]) == 1  # depth 8 expected
    err = capsys.readouterr().err
    assert "listops.pth" in err and "does not fit" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "model.onnx").exists()


def _deploy_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Deploy\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README has no Deploy section"
    return match.group(1)


def test_readme_deploy_commands(tmp_path):
    """The Deploy section's first python block (the checkpoints) and its shell commands, run as written in a
    fresh directory; the section's later python blocks run on their own in tests/test_readme.py."""
    section = _deploy_section()
    blocks = re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S)
    assert [kind for kind, _ in blocks][:2] == ["python", "bash"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    for kind, code in blocks[:2]:
        if kind == "python":
            subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
            continue
        for line in code.splitlines():
            line = line.split("#")[0].strip()
            if not line:
                continue
            assert line.startswith("python "), line
            result = subprocess.run(
                line.replace("python", sys.executable, 1),
                shell=True,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            assert re.search(r"max relative error \d\.\d\de-0[5-9]", result.stdout), result.stdout
    for name in ("atto", "listops"):
        assert (tmp_path / "deploy" / name / "model.onnx").is_file()
