"""Error paths a user hits with train_imagenet.py: each names the file or value and what was expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from mrconvnext import train_imagenet
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.utils.training import PreflightError

TRAIN_ARGS = ["--model", "mrconvnext_atto", "--img-size", "32", "-b", "4", "--epochs", "1", "--workers", "0"]
TRAIN_ARGS += ["--aa", "none", "--mixup", "0", "--cutmix", "0", "--no-model-ema", "--warmup-epochs", "0"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 4, 2, size=32, classes=("a", "b", "c"), seed=3)


def _preflight_error(args: list[str], tmp_path: Path) -> str:
    with pytest.raises(PreflightError) as info:
        train_imagenet.train([*TRAIN_ARGS, "--output", str(tmp_path / "out"), *args])
    return str(info.value)


def test_train_val_missing_a_class(shapes, tmp_path) -> None:
    shutil.copytree(shapes, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "val" / "c")
    message = _preflight_error(["--data-dir", str(tmp_path / "data"), "--num-classes", "3"], tmp_path)
    assert "class folders differ between 'train' and 'val'" in message and "missing in 'val': c" in message
    assert "--num-classes" not in message


def test_train_unknown_model_suggests_close_names(shapes, tmp_path) -> None:
    message = _preflight_error(
        ["--data-dir", str(shapes), "--num-classes", "3", "--model", "mrconvnext_atoo"], tmp_path
    )
    assert "unknown model 'mrconvnext_atoo'; similar: mrconvnext_atto" in message


@pytest.fixture(scope="module")
def finished_run(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train_imagenet.train([*TRAIN_ARGS, "--data-dir", str(shapes), "--num-classes", "3", "--output", str(out)])
    AcceleratorState._reset_state(reset_partial_state=True)
    (run_dir,) = out.iterdir()
    return run_dir


def test_resume_with_another_img_size(finished_run, shapes, tmp_path) -> None:
    args = ["--data-dir", str(shapes), "--num-classes", "3", "--epochs", "2", "--resume", str(finished_run)]
    message = _preflight_error([*args, "--img-size", "64"], tmp_path)
    assert "was trained with --img-size 32, this run has 64" in message


def test_resume_from_a_truncated_checkpoint(finished_run, shapes, tmp_path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    weights = run_dir / "checkpoints" / "epoch_0001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ["--data-dir", str(shapes), "--num-classes", "3", "--epochs", "2", "--resume", str(run_dir)]
    message = _preflight_error(args, tmp_path)
    assert f"cannot load checkpoint {str(weights.parent)!r}" in message
