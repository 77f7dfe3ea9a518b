"""ConvNeXt -> MRConvNeXt weight conversion (mrconvnext.convert), against direct conv2d references in float64."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext import MRConv2d
from mrconvnext.models import calibrate_batchnorm, convert_convnext, wraparound_fraction
from mrconvnext.models.mrconvnext import checkpoint_filter_fn

from .reference import direct_conv

SIZES = ["atto", "nano", "tiny", "small", "base"]


def convnext_state_dict(name: str = "convnext_atto", **kwargs) -> dict[str, torch.Tensor]:
    """A ConvNeXt state dict with random non-trivial depthwise kernels, biases and layer scales."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if ".conv_dw." in key or key.endswith(".gamma"):
                value.copy_(torch.randn_like(value) * (0.2 if ".conv_dw." in key else 0.5))
    return model.state_dict()


def wraps(y: int, x: int, height: int, width: int, radius: int = 3) -> bool:
    """Some tap leaves the row (``x + dx`` outside ``[0, W)``) while its flattened index is inside the map."""
    return any(
        not 0 <= x + dx < width and 0 <= (y + dy) * width + x + dx < height * width
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
    )


def converted(kernel_type: str, img_size: int = 224, deploy: bool = False) -> tuple[dict, torch.nn.Module]:
    state_dict = convnext_state_dict(num_classes=10)
    model = timm.create_model(
        "mrconvnext_atto", num_classes=10, img_size=img_size, kernel_type=kernel_type, deploy=deploy
    ).double()
    model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model))
    return state_dict, model.eval()


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("kernel_type", ["fourier_sparse", "sparse", "dense"])
def test_eval_mrconv_equals_depthwise_conv_off_the_row_edges(kernel_type, deploy):
    state_dict, model = converted(kernel_type, deploy=deploy)
    torch.manual_seed(1)
    for stage_idx, size in enumerate((56, 28, 14, 7)):
        name = f"stages.{stage_idx}.blocks.1.conv_dw"
        layer = model.get_submodule(name)
        weight, bias = state_dict[name + ".weight"].double(), state_dict[name + ".bias"].double()
        x = torch.randn(2, layer.dim, size, size, dtype=torch.float64)
        with torch.no_grad():
            got = layer(x)
        want = F.conv2d(x, weight, bias, padding=3, groups=layer.dim)
        exact = torch.tensor([[not wraps(y, x_, size, size) for x_ in range(size)] for y in range(size)])
        assert exact.any()
        assert (got - want)[..., exact].abs().max() < 1e-10
        assert (got - want)[..., ~exact].abs().amax(1).min() > 1e-6  # the wrapped positions do differ
        assert wraparound_fraction(size, size) == pytest.approx(1 - exact.double().mean().item())


@pytest.mark.parametrize("kernel_type", ["fourier_sparse", "dilated"])
def test_narrow_maps_exact_where_no_tap_wraps(kernel_type):
    """At img_size=32 the maps are 8, 4, 2 and 1 pixels wide: taps share offsets; exact where none wraps."""
    state_dict, model = converted(kernel_type, img_size=32)
    torch.manual_seed(2)
    for stage_idx, size in enumerate((8, 4, 2, 1)):
        name = f"stages.{stage_idx}.blocks.0.conv_dw"
        layer = model.get_submodule(name)
        x = torch.randn(2, layer.dim, size, size, dtype=torch.float64)
        with torch.no_grad():
            got = layer(x)
        want = F.conv2d(x, state_dict[name + ".weight"].double(), state_dict[name + ".bias"].double(), padding=3,
                        groups=layer.dim)  # fmt: skip
        close = ((got - want).abs() < 1e-10).all(0).all(0)
        assert close.double().mean().item() == pytest.approx(1 - wraparound_fraction(size, size))
    assert (wraparound_fraction(8, 8), wraparound_fraction(1, 1)) == (0.75, 0.0)


@pytest.mark.parametrize(
    "size", [s if s in ("atto", "tiny") else pytest.param(s, marks=pytest.mark.slow) for s in SIZES]
)
def test_non_depthwise_tensors_copied_exactly(size):
    state_dict = convnext_state_dict(f"convnext_{size}")
    model = timm.create_model(f"mrconvnext_{size}", img_size=64, kernel_type="sparse")
    out = checkpoint_filter_fn(dict(state_dict), model)
    model.load_state_dict(out)
    for key, value in state_dict.items():
        if ".conv_dw." not in key:
            assert torch.equal(out[key], value), key
    assert not any(".conv_dw." in k and k not in out for k in model.state_dict())


def test_training_checkpoint_and_original_layout():
    state_dict = convnext_state_dict(num_classes=10)
    model = timm.create_model("mrconvnext_atto", num_classes=10, img_size=64)
    bare = checkpoint_filter_fn(dict(state_dict), model)
    wrapped = checkpoint_filter_fn({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}, model)
    for key in bare:
        if "positions" not in key and "sparse.weight" not in key:  # spare sparse taps are drawn at random
            assert torch.equal(bare[key], wrapped[key]), key


def test_unconvertible_layers_and_checkpoints_get_clear_errors():
    state_dict = convnext_state_dict(num_classes=10)
    for kwargs, message in [
        (dict(kernel_type="fourier"), "kernel_type='fourier'"),
        (dict(kernel_type="dilated", img_size=224), "no resolution holds them"),
        (dict(bidirectional=False), "bidirectional=False"),
        (dict(mrconv_kwargs=dict(branch_norm="scale")), "branch_norm='scale'"),
    ]:
        model = timm.create_model("mrconvnext_atto", num_classes=10, **{"img_size": 64, **kwargs})
        with pytest.raises(ValueError, match=message):
            checkpoint_filter_fn(dict(state_dict), model)
    model = timm.create_model("mrconvnext_atto", num_classes=10, img_size=64)
    with pytest.raises(ValueError, match=r"widths \[96, 192, 384, 768\]\) does not match mrconvnext_atto"):
        checkpoint_filter_fn(convnext_state_dict("convnext_tiny", num_classes=10), model)
    resnet = timm.create_model("resnet10t", num_classes=10).state_dict()
    with pytest.raises(ValueError, match="not a timm ConvNeXt checkpoint"):
        convert_convnext(resnet, model)
    with pytest.raises(RuntimeError, match="incompatible with MRConvNeXt"):
        checkpoint_filter_fn(resnet, model)


def test_calibrated_batchnorm_keeps_eval_function_and_matches_batch_statistics():
    torch.manual_seed(3)
    layer = MRConv2d(dim=6, seq_len=64, kernel_size=16, kernel_type="fourier_sparse", max_resolutions=3).double()
    with torch.no_grad():
        layer.alpha.uniform_(0.3, 1.0)
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.normal_()
        layer.norm.running_mean.normal_()
        layer.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 6, 8, 8, dtype=torch.float64) * 2 + 1
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        assert calibrate_batchnorm(layer, [(x[:5], None), x[5:]]) == 8
        after = layer(x)
        branches = torch.stack([direct_conv(x.flatten(2), k, True) for k in layer.kernel()])  # (N, B, D, L)
    assert (after - before).abs().max() < 1e-10
    torch.testing.assert_close(layer.norm.running_mean, branches.mean((1, 3)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.norm.running_var, branches.var((1, 3)), rtol=1e-10, atol=1e-10)
    layer.train()
    with torch.no_grad():
        train_mode = layer(x)
    assert (train_mode - after).norm() / after.norm() < 1e-2  # biased vs unbiased variance of 512 values


def test_pretrained_loads_convnext_file_and_reparameterizes(tmp_path):
    state_dict = convnext_state_dict()
    path = tmp_path / "convnext_atto.safetensors"
    save_file(state_dict, str(path))
    model = timm.create_model("mrconvnext_atto", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.state_dict()["stem.0.weight"], state_dict["stem.0.weight"])
    model = model.double().eval()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        train_form = model(x)
        model.reparameterize()
        deploy = model(x)
    assert (deploy - train_form).abs().max() / train_form.abs().max() < 1e-10
    torch.save({"state_dict_ema": state_dict, "epoch": 1}, tmp_path / "checkpoint.pth")
    deploy_model = timm.create_model(
        "mrconvnext_atto",
        pretrained=True,
        deploy=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "checkpoint.pth")),
    ).double()
    with torch.no_grad():  # converted in float32: the train form's BN scale sqrt(1 + eps) / sqrt(1 + eps) rounds
        assert (deploy_model.eval()(x) - train_form).abs().max() / train_form.abs().max() < 1e-6


def test_convert_command(tmp_path):
    torch.save({"state_dict": convnext_state_dict(num_classes=10)}, tmp_path / "convnext.pth")
    out = tmp_path / "mrconvnext.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "mrconvnext.convert", str(tmp_path / "convnext.pth"), str(out),
         "--model", "mrconvnext_atto", "--img-size", "64", "--deploy"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert not result.stderr
    assert "positions wrapping per stage: 37.5%, 75.0%, 87.5%, 50.0%" in result.stdout
    model = timm.create_model("mrconvnext_atto", num_classes=10, img_size=64, deploy=True, checkpoint_path=str(out))
    assert model.deploy


def test_readme_conversion_commands(tmp_path):
    """The README's ConvNeXt -> MRConvNeXt measurement commands as written, with one epoch per training run."""
    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```bash\n(.*?)```", (root / "README.md").read_text(), re.S)
    block = next(b for b in blocks if "mrconvnext.convert" in b)
    script = re.sub(r"--epochs \d+", "--epochs 1", block).replace("OUT=/tmp/convnext-digits", f"OUT={tmp_path}")
    assert script.count("--epochs 1") == 3 and f"OUT={tmp_path}" in script
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])  # `python` is this one
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-ec", script], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| converted, deploy form |" in result.stdout
    assert "positions wrapping per stage at 224 px: 10.7%, 21.4%, 42.9%, 85.7%" in result.stdout
    for run in ("convnext", "finetune", "scratch"):
        assert (tmp_path / "runs" / run / "last.pth").exists()


FINE_TUNE_ARGS = ["--model", "mrconvnext_atto", "--img-size", "32", "--num-classes", "4", "-b", "8", "--epochs", "1"]
FINE_TUNE_ARGS += ["-j", "0", "--aa", "none", "--mixup", "0", "--cutmix", "0", "--no-model-ema", "--warmup-epochs", "0"]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fine_tune_converted_weights_on_a_four_class_folder(tmp_path, capsys):
    """ImageNet-1k ConvNeXt weights converted, then fine-tuned on 4 classes: a fresh 4-class head, every other
    weight the converted one (``--lr 0 --min-lr 0``: one epoch leaves the weights as loaded; BatchNorm statistics move)."""
    from mrconvnext import convert, train_imagenet
    from mrconvnext.demo import make_shapes_dataset
    from mrconvnext.utils.checkpoint import read_checkpoint
    from mrconvnext.utils.training import PreflightError

    torch.save({"state_dict": convnext_state_dict()}, tmp_path / "convnext.pth")  # 1000 classes
    source = tmp_path / "converted.pth"
    assert (
        convert.main([str(tmp_path / "convnext.pth"), str(source), "--model", "mrconvnext_atto", "--img-size", "32"])
        == 0
    )
    assert "fine-tune it with train_imagenet.py --pretrained-path" in capsys.readouterr().out
    data = make_shapes_dataset(tmp_path / "shapes", train_per_class=4, val_per_class=2, size=32)
    argv = [*FINE_TUNE_ARGS, "--data-dir", str(data), "--output", str(tmp_path / "runs")]

    with pytest.raises(PreflightError, match="--pretrained-path"):  # timm's checkpoint_path loads strictly
        train_imagenet.train([*argv, "--model-kwargs", f"checkpoint_path={source}"])
    assert (
        train_imagenet.main(
            [*argv, "--pretrained-path", str(source), "--lr", "0", "--min-lr", "0", "--experiment", "ft"]
        )
        == 0
    )
    tuned, converted_weights = read_checkpoint(tmp_path / "runs" / "ft" / "last.pth"), read_checkpoint(source)
    assert tuned.arch == "mrconvnext_atto" and tuned.model_args["num_classes"] == 4
    assert tuned.state_dict["head.fc.weight"].shape == (4, 320)
    for key, value in converted_weights.state_dict.items():
        if not key.startswith("head.fc.") and not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(tuned.state_dict[key], value), key
