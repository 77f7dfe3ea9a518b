"""``--branch-norm``: train_imagenet.py records it, validate.py and export rebuild the form; the BN-vs-scale benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from accelerate.state import AcceleratorState
from PIL import Image

from mrconvnext import train_imagenet, validate
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.export import main as export_main
from mrconvnext.utils.training import PreflightError

from .reference import rel_err

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = [
    "--model", "mrconvnext_atto", "--num-classes", "2", "--img-size", "32", "-b", "8", "--epochs", "1",
    "--lr", "2e-3", "--warmup-epochs", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
    "--smoothing", "0", "--hflip", "0", "--workers", "0", "--crop-pct", "1.0",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 8, 4, size=32, classes=("circle", "square"), seed=2)


@pytest.fixture(scope="module")
def scale_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    AcceleratorState._reset_state(reset_partial_state=True)
    argv = [*TRAIN_ARGS, "--data-dir", str(data_dir), "--output", str(out), "--experiment", "scale"]
    train_imagenet.train([*argv, "--branch-norm", "scale"])
    return out / "scale"


def test_checkpoint_records_scale_form(scale_run) -> None:
    checkpoint = torch.load(scale_run / "last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["model_args"]["mrconv_kwargs"] == {"branch_norm": "scale"}
    keys = checkpoint["state_dict"].keys()
    assert "stages.0.blocks.0.conv_dw.kernel_norm" in keys and "stages.0.blocks.0.conv_dw.alpha" in keys
    assert not any(".conv_dw.norm." in k for k in keys)  # no per-resolution BatchNorm
    meta = json.loads(next((scale_run / "checkpoints").glob("epoch_*/meta.json")).read_text())
    assert meta["branch_norm"] == "scale"


def test_validate_rebuilds_scale_form(scale_run, data_dir, capsys) -> None:
    rows = []
    for extra in ([], ["--reparam"]):
        argv = ["--data-dir", str(data_dir), "--checkpoint", str(scale_run / "last.pth")]  # no model flag
        argv += ["-b", "4", "-j", "0", "--device", "cpu", *extra]
        assert validate.main(argv) == 0, capsys.readouterr().err
        rows.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    assert rows[0]["top1"] == rows[1]["top1"] and rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-4)


def test_export_rebuilds_scale_form(scale_run, tmp_path, capsys) -> None:
    out = tmp_path / "deploy"
    assert export_main(["--checkpoint", str(scale_run / "last.pth"), "--output", str(out)]) == 0  # no model flag
    assert "relative difference" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["mrconv_kwargs"] == {"branch_norm": "scale"}
    deployed = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    trained = timm.create_model("mrconvnext_atto", num_classes=2, img_size=32, mrconv_kwargs=dict(branch_norm="scale"))
    saved = torch.load(scale_run / "last.pth", weights_only=True)
    trained.load_state_dict(saved.get("state_dict_ema", saved["state_dict"]))  # export takes the EMA, as timm does
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(deployed(images), trained.eval()(images)) < 1e-4


def test_scale_needs_an_mrconvnext(data_dir, tmp_path) -> None:
    argv = [*TRAIN_ARGS, "--data-dir", str(data_dir), "--output", str(tmp_path / "out"), "--model", "convnext_atto"]
    with pytest.raises(PreflightError, match="--branch-norm scale needs an MRConvNeXt model, got 'convnext_atto'"):
        train_imagenet.train([*argv, "--branch-norm", "scale"])


def test_resume_with_other_norm(scale_run, data_dir, tmp_path) -> None:
    argv = [*TRAIN_ARGS, "--data-dir", str(data_dir), "--output", str(tmp_path / "out"), "--resume", str(scale_run)]
    with pytest.raises(PreflightError, match="trained with --branch-norm scale, this run has batch"):
        train_imagenet.train([*argv, "--epochs", "2"])


def test_norm_benchmark_prints_the_table(data_dir, tmp_path) -> None:
    """``benchmarks/branch_norm.py`` as the README runs it, with one seed, one epoch and few timing rounds."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "branch_norm.py"), str(data_dir), "--num-classes", "2"]
    cmd += ["--epochs", "1", "-b", "8", "--seeds", "0", "--step-repeats", "2", "--output", str(tmp_path / "runs")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1].strip() for line in table] == ["`batch`", "`scale`"]
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert all(0 <= v[0] <= 100 for v in results["top1"].values())
    assert results["step_time_ratio"][1] <= results["step_time_ratio"][0] <= results["step_time_ratio"][2]


def test_digits_folder_as_the_readme_runs_it(tmp_path) -> None:
    """``python benchmarks/digits_folder.py digits --size 32``: the real images the measurement trains on."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "digits_folder.py"), "digits", "--size", "32"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    counts = {split: len(list((tmp_path / "digits" / split).rglob("*.png"))) for split in ("train", "val")}
    assert counts == {"train": 1347, "val": 450}
    with Image.open(next((tmp_path / "digits" / "val" / "3").iterdir())) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
