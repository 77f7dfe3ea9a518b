"""Error paths a user hits with the tools (train_imagenet.py, validate.py, export, convert, ...): each names the file
or value and what was expected, as one line without a traceback."""

from __future__ import annotations

import csv
import importlib
import logging
import shutil
from pathlib import Path

import pytest
import timm
import torch
from accelerate.state import AcceleratorState

from mrconvnext import train_imagenet, validate
from mrconvnext.data import DataFormatError
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.utils.checkpoint import CheckpointError, ModelArgumentError, read_checkpoint
from mrconvnext.utils.training import PreflightError, run_main

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


# ------------------------------------------------------------------------------------------ a newcomer's first hour


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])  # a PNG cut short: the header reads, the pixels do not


def test_truncated_images_are_logged_with_their_path_and_counted_once(shapes, tmp_path, caplog) -> None:
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    broken_train, broken_val = data / "train" / "a" / "a_0001.png", data / "val" / "b" / "b_0000.png"
    _truncate(broken_train)
    _truncate(broken_val)
    out = tmp_path / "out"
    argv = [*TRAIN_ARGS, "--data-dir", str(data), "--num-classes", "3", "--output", str(out), "--experiment", "run"]
    with caplog.at_level(logging.WARNING):
        assert train_imagenet.main(argv) == 0
    assert str(broken_train) in caplog.text and str(broken_val) in caplog.text
    with open(out / "run" / "summary.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert int(row["eval_samples"]) == 3 * 2 - 1  # the unreadable image is left out, no other counted twice


@pytest.fixture(scope="module")
def ema_run(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ema_run")
    argv = [*TRAIN_ARGS, "--model-ema", "--data-dir", str(shapes), "--num-classes", "3", "--output", str(out)]
    train_imagenet.train([*argv, "--experiment", "run"])
    AcceleratorState._reset_state(reset_partial_state=True)
    return out / "run"


def test_resume_without_ema_stops_at_preflight(ema_run, shapes, tmp_path) -> None:
    args = ["--data-dir", str(shapes), "--num-classes", "3", "--epochs", "2", "--resume", str(ema_run)]
    message = _preflight_error([*args, "--no-model-ema"], tmp_path)
    assert "was trained with --model-ema True, this run has False" in message


KWARGS_TOOLS = {  # every tool taking --model-kwargs, with its other required flags (nothing is read)
    "train_imagenet": ["--data-dir", "nowhere"],
    "train_sequence": ["--task", "listops", "--data-dir", "nowhere"],
    "validate": ["--data-dir", "nowhere", "--checkpoint", "none.pth"],
    "export": ["--checkpoint", "none.pth", "--output", "nowhere"],
    "plot": ["--checkpoint", "none.pth", "--out", "nowhere"],
}


@pytest.mark.parametrize("tool", list(KWARGS_TOOLS))
def test_model_kwargs_without_an_equals_sign(tool, capsys) -> None:
    module = importlib.import_module(f"mrconvnext.{tool}")
    with pytest.raises(SystemExit) as info:
        module.main([*KWARGS_TOOLS[tool], "--model-kwargs", "kernel_type", "fourier"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --model-kwargs: 'kernel_type' is not KEY=VALUE; did you mean kernel_type=fourier?" in err


def test_export_has_no_model_args_flag(capsys) -> None:
    from mrconvnext import export

    with pytest.raises(SystemExit) as info:
        export.main(["--checkpoint", "none.pth", "--output", "nowhere", "--model-args", "depth=2"])
    assert info.value.code == 2 and "unrecognized arguments: --model-args" in capsys.readouterr().err


def test_misspelt_model_kwarg_names_the_argument(finished_run, shapes, tmp_path, capsys) -> None:
    message = _preflight_error(
        ["--data-dir", str(shapes), "--num-classes", "3", "--model-kwargs", "kernal_type=fourier"], tmp_path
    )
    assert "mrconvnext_atto (MRConvNeXt) takes no argument 'kernal_type'; did you mean kernel_type?" in message
    argv = ["--data-dir", str(shapes), "--checkpoint", str(finished_run / "last.pth"), "-j", "0"]
    assert validate.main([*argv, "--model-kwargs", "kernal_type=fourier"]) == 1
    err = capsys.readouterr().err
    assert "takes no argument 'kernal_type'; did you mean kernel_type?" in err and "__init__" not in err


def test_validate_with_another_class_count(finished_run, shapes, capsys) -> None:
    argv = ["--data-dir", str(shapes), "--checkpoint", str(finished_run / "last.pth"), "-j", "0"]
    assert validate.main([*argv, "--num-classes", "10"]) == 1
    assert "has 3 classes but num_classes=10 was given (--num-classes); drop it" in capsys.readouterr().err


def test_data_dir_holding_datasets_points_at_them(finished_run, shapes, tmp_path, capsys) -> None:
    """``--data-dir demo_output``: a folder holding the dataset (``shapes/``), plots and a run folder."""
    root = tmp_path / "demo_output"
    shutil.copytree(shapes, root / "shapes")
    (root / "plots").mkdir()
    shutil.copy(shapes / "val" / "a" / "a_0000.png", root / "plots" / "alpha.png")
    shutil.copytree(finished_run, root / "train")
    argv = ["--data-dir", str(root), "--checkpoint", str(root / "train" / "last.pth"), "-j", "0"]
    assert validate.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{str(root)!r} is not an image folder but holds one: pass --data-dir {root / 'shapes'}" in err
    assert "--num-classes" not in err
    message = _preflight_error(["--data-dir", str(root), "--num-classes", "3"], tmp_path)
    assert f"pass --data-dir {root / 'shapes'}" in message


def test_wrong_model_size_names_the_recorded_model(finished_run, shapes, tmp_path, capsys, caplog) -> None:
    argv = ["--data-dir", str(shapes), "-j", "0", "--model", "mrconvnext_nano"]
    assert validate.main([*argv, "--checkpoint", str(finished_run / "last.pth")]) == 1
    assert "holds mrconvnext_atto weights, not mrconvnext_nano" in capsys.readouterr().err
    bare = tmp_path / "bare.pth"
    torch.save(read_checkpoint(finished_run / "last.pth").state_dict, bare)
    with caplog.at_level(logging.INFO):
        assert validate.main([*argv, "--checkpoint", str(bare)]) == 1
    assert "does not fit mrconvnext_nano(" in capsys.readouterr().err
    assert "Loading pretrained weights" not in caplog.text  # no line that reads as success before the error


def test_convert_with_a_missing_input_or_output_folder(tmp_path, capsys) -> None:
    from mrconvnext import convert

    assert convert.main([str(tmp_path / "missing" / "convnext.pth"), str(tmp_path / "out.pth")]) == 1
    assert f"checkpoint {str(tmp_path / 'missing' / 'convnext.pth')!r} does not exist" in capsys.readouterr().err
    source = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto", num_classes=3).state_dict(), source)
    output = tmp_path / "new" / "folder" / "mrconvnext.pth"
    assert convert.main([str(source), str(output), "--model", "mrconvnext_atto", "--img-size", "32"]) == 0
    assert read_checkpoint(output).arch == "mrconvnext_atto"


def test_demo_reports_bad_flags_and_a_failed_step_in_one_line(tmp_path, capsys) -> None:
    """A size or epoch count out of range is a usage error before anything is written; a step that fails (an unknown
    model here) ends the demo with one line naming the step, after that step's own error, not a traceback."""
    from mrconvnext import demo

    with pytest.raises(SystemExit) as info:
        demo.main(["--output", str(tmp_path / "out"), "--img-size", "0"])
    assert info.value.code == 2 and "--img-size must be positive, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as info:
        demo.main(["--output", str(tmp_path / "out"), "--model", "mrconvnext_huge"])
    assert info.value.code == "mrconvnext.demo: error: python -m mrconvnext.train_imagenet exited with status 1"


@pytest.mark.parametrize(
    "error",
    [PreflightError, DataFormatError, CheckpointError, ModelArgumentError, validate.UsageError],
    ids=lambda error: error.__name__,
)
def test_a_training_script_reports_every_kind_of_bad_input_as_one_line(error, capsys) -> None:
    def train(argv):  # a train() that meets the bad input after its own checks, e.g. in a shard mid-epoch
        raise error("shard 'train-0003.tar' is truncated")

    assert run_main(train, [], "train_imagenet.py") == 1
    assert capsys.readouterr().err == "train_imagenet.py: error: shard 'train-0003.tar' is truncated\n"
