"""One checkpoint schema and one loader: every tool rebuilds the model a checkpoint records, with no model flag.

A 64 px ``branch_norm='scale'`` MRConvNeXt trained by ``train_imagenet`` and an LRA Image sequence model trained
by ``train_sequence`` each go through validate, export (safetensors and ONNX, onnxruntime parity) and plot with
nothing but the checkpoint; the other layouts (timm ``train.py``, exports, safetensors, bare state dicts, files
of earlier versions) read back the same way, and a state dict planned for another image size fails in timm's
own loading paths with one message that names the size.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.utils import CheckpointSaver

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext import convert, plot, train_imagenet, train_sequence, validate
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.export import main as export_main
from mrconvnext.utils.checkpoint import (
    CheckpointError,
    checkpoint_record,
    create_model_from_checkpoint,
    read_checkpoint,
    save_checkpoint_file,
)
from mrconvnext.utils.onnx import planned_input

from .reference import rel_err
from .sequence_fixtures import write_cifar

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py

SIZE = 64


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory) -> tuple[Path, Path]:
    """``train_imagenet`` at 64 px with ``--branch-norm scale`` (one epoch on 16 images); the run and the data."""
    data = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 8, 4, size=SIZE, classes=("circle", "square"))
    out = tmp_path_factory.mktemp("train")
    argv = ["--data-dir", str(data), "--model", "mrconvnext_atto", "--num-classes", "2", "--img-size", str(SIZE)]
    argv += ["--branch-norm", "scale", "-b", "8", "--epochs", "1", "--warmup-epochs", "0", "--aa", "none"]
    argv += ["--mixup", "0", "--cutmix", "0", "--crop-pct", "1.0", "--workers", "0", "--no-model-ema"]
    train_imagenet.train([*argv, "--output", str(out), "--experiment", "run"])
    return out / "run", data


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> tuple[Path, Path]:
    """``train_sequence --task image`` (a tiny model, one epoch); the run and its test images as a PNG folder."""
    cifar = write_cifar(str(tmp_path_factory.mktemp("cifar")), per_batch=12)
    out = tmp_path_factory.mktemp("seq")
    argv = ["--task", "image", "--data-dir", cifar, "--epochs", "1", "-b", "9", "--model-kwargs", "depth=1"]
    argv += ["embed_dim=8", "-j", "0", "--output", str(out), "--experiment", "run"]
    results = train_sequence.train(argv)
    folder = tmp_path_factory.mktemp("images")  # the test split as grayscale PNGs, one folder per class
    with open(Path(cifar) / "cifar-10-batches-py" / "test_batch", "rb") as f:
        test = pickle.load(f)
    luma = np.array([0.299, 0.587, 0.114])
    for index, (row, label) in enumerate(zip(test["data"], test["labels"], strict=True)):
        gray = (row.reshape(3, 32, 32).transpose(1, 2, 0) @ luma).round().astype(np.uint8)
        (folder / f"{label:02d}").mkdir(exist_ok=True)
        Image.fromarray(gray, mode="L").save(folder / f"{label:02d}" / f"{index}.png")
    (folder / "classes.txt").write_text("\n".join(f"{label:02d}" for label in range(10)))  # some have no image
    assert results["test_acc"] == results["test_acc_reparameterized"]
    return out / "run", folder


def _validate(capsys, *argv: str) -> dict:
    assert validate.main(["-j", "0", "-b", "4", "--device", "cpu", *argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def test_the_record_holds_what_the_shapes_depend_on(scale_run, image_run) -> None:
    saved = torch.load(scale_run[0] / "last.pth", weights_only=True)
    assert saved["arch"] == "mrconvnext_atto" and saved["model_args"]["img_size"] == [SIZE, SIZE]
    assert saved["model_args"]["mrconv_kwargs"] == {"branch_norm": "scale"} and saved["model_args"]["num_classes"] == 2
    assert saved["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE] and saved["pretrained_cfg"]["crop_pct"] == 1.0
    model = timm.create_model(saved["arch"], **saved["model_args"])  # plain timm rebuilds it from the record alone
    model.load_state_dict(saved["state_dict"])
    saved = torch.load(image_run[0] / "model_best.pth", weights_only=True)
    assert saved["arch"] == "mrconv_image_base" and saved["model_args"]["depth"] == 1 and saved["task"] == "image"


def test_validate_needs_no_model_flag(scale_run, image_run, capsys) -> None:
    run, data = scale_run
    rows = [_validate(capsys, "--data-dir", str(data), "--checkpoint", str(run / "last.pth"), *extra)
            for extra in ([], ["--reparam"])]  # fmt: skip
    assert rows[0]["model"] == "mrconvnext_atto" and rows[0]["img_size"] == SIZE and rows[0]["crop_pct"] == 1.0
    assert rows[0]["num_images"] == 8 and rows[0]["top1"] == rows[1]["top1"]

    run, folder = image_run
    row = _validate(capsys, "--data-dir", str(folder), "--checkpoint", str(run / "model_best.pth"), "--class-map",
                    str(folder / "classes.txt"))  # fmt: skip
    # independent evaluation of the same PNGs: the recorded model, pixels / 255 normalised with its cfg's statistics
    model = timm.create_model("mrconv_image_base", depth=1, embed_dim=8).eval()
    model.load_state_dict(torch.load(run / "model_best.pth", weights_only=True)["state_dict"])
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    files = sorted(folder.glob("*/*.png"))
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f), np.float32) / 255)[None] for f in files])
    labels = torch.tensor([int(f.parent.name) for f in files])
    with torch.no_grad():
        hits = (model((images - mean) / std).argmax(1) == labels).float().mean().item()
    assert row["model"] == "mrconv_image_base" and row["num_images"] == len(files) == 12
    assert row["top1"] == pytest.approx(100 * hits, abs=1e-4)  # validate rounds to 4 decimals


@pytest.mark.parametrize("run_name, checkpoint", [("scale", "last.pth"), ("image", "model_best.pth")])
def test_export_and_onnx_need_no_model_flag(run_name, checkpoint, scale_run, image_run, tmp_path, capsys) -> None:
    run = (scale_run if run_name == "scale" else image_run)[0]
    trained = create_model_from_checkpoint(run / checkpoint)
    assert export_main(["--checkpoint", str(run / checkpoint), "--output", str(tmp_path / "st")]) == 0
    deployed = timm.create_model(f"local-dir:{tmp_path / 'st'}", pretrained=True).eval()
    assert deployed.deploy and deployed.pretrained_cfg["input_size"] == trained.pretrained_cfg["input_size"]
    (shape, _), *_ = planned_input(trained)["inputs"].values()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert rel_err(deployed(x), trained(x)) < 1e-4
    assert (
        export_main(["--checkpoint", str(run / checkpoint), "--output", str(tmp_path / "onnx"), "--format", "onnx"])
        == 0
    )
    printed = capsys.readouterr().out
    assert (tmp_path / "onnx" / "model.onnx").is_file() and "max relative error" in printed
    assert oct(os.stat(tmp_path / "onnx" / "model.onnx").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("run_name, checkpoint", [("scale", "last.pth"), ("image", "model_best.pth")])
def test_plot_needs_no_model_flag(run_name, checkpoint, scale_run, image_run, tmp_path, capsys) -> None:
    run = (scale_run if run_name == "scale" else image_run)[0]
    assert plot.main(["--checkpoint", str(run / checkpoint), "--out", str(tmp_path), "--plots", "alpha"]) == 0
    assert (tmp_path / "alpha.png").is_file()
    # the export folder is a checkpoint too (its config.json records the model)
    export_main(["--checkpoint", str(run / checkpoint), "--output", str(tmp_path / "deploy")])
    assert (
        plot.main(["--checkpoint", str(tmp_path / "deploy"), "--out", str(tmp_path / "d"), "--plots", "spectra"]) == 0
    )
    (tmp_path / "deploy" / "config.json").write_text("[]")  # valid JSON of another shape: an AttributeError before
    with pytest.raises(CheckpointError, match=r"config.json' is not a model config: expected a JSON object"):
        read_checkpoint(tmp_path / "deploy")


def test_tool_flags_that_cannot_work_are_usage_errors(tmp_path, capsys) -> None:
    """plot drew no kernels for --channels 0 (or counted from the end for -3); convert met PyTorch's error for a
    calibration batch size of 0; export's --output naming a file met os.makedirs'."""
    with pytest.raises(SystemExit) as info:
        plot.main(["--checkpoint", str(tmp_path / "any.pth"), "--out", str(tmp_path / "plots"), "--channels", "0"])
    assert info.value.code == 2 and "--channels must be positive, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        convert.main(
            [str(tmp_path / "any.pth"), str(tmp_path / "out.pth"), "--calibrate-dir", str(tmp_path), "-b", "0"]
        )
    assert info.value.code == 2 and "--batch-size must be positive, got 0" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("kept")  # export --output naming a file: a FileExistsError traceback before
    with pytest.raises(SystemExit) as info:
        export_main(["--checkpoint", str(tmp_path / "any.pth"), "--output", str(tmp_path / "notes.txt")])
    assert info.value.code == 2 and "notes.txt' is a file; expected a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "kept"


def test_flags_override_and_contradictions_name_both_values(scale_run) -> None:
    path = scale_run[0] / "last.pth"
    with pytest.raises(CheckpointError, match="the checkpoint records img_size=\\[64, 64\\], given img_size=224"):
        create_model_from_checkpoint(path, img_size=224)
    with pytest.raises(CheckpointError, match="has 2 classes but num_classes=10 was given"):
        create_model_from_checkpoint(path, num_classes=10)
    with pytest.raises(CheckpointError, match="holds mrconvnext_atto weights, not mrconvnext_nano"):
        create_model_from_checkpoint(path, "mrconvnext_nano")
    model = create_model_from_checkpoint(path, drop_path_rate=0.3)  # not a shape: used as given
    assert model.img_size == (SIZE, SIZE) and model.stages[1].blocks[0].drop_path.drop_prob > 0


def test_layouts_read_back_alike(tmp_path) -> None:
    model = timm.create_model("mrconvnext_atto", img_size=SIZE, num_classes=3, mrconv_kwargs=dict(branch_norm="scale"))
    record = checkpoint_record(model, data_config=dict(input_size=(3, SIZE, SIZE), crop_pct=0.95))
    save_checkpoint_file(record, tmp_path / "a.safetensors")
    safetensors.torch.save_file(model.state_dict(), tmp_path / "bare.safetensors")
    torch.save(
        {"state_dict": model.state_dict(), "num_classes": 3, "img_size": SIZE, "mrconv_norm": "scale"},
        tmp_path / "legacy.pth",
    )  # fmt: skip  (top-level keys, as this project's training wrote before)
    cases = {
        "a.safetensors": {},
        "legacy.pth": {},
        "bare.safetensors": dict(mrconv_kwargs=dict(branch_norm="scale")),  # the norm is not in the shapes
    }
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model.eval()(x)
        for name, given in cases.items():
            loaded = create_model_from_checkpoint(tmp_path / name, "mrconvnext_atto", **given)
            assert loaded.img_size == (SIZE, SIZE) and loaded.num_classes == 3, name  # size and classes: shapes
            assert rel_err(loaded(x), expected) < 1e-6, name
            deployed = create_model_from_checkpoint(tmp_path / name, "mrconvnext_atto", deploy=True, **given)
            assert deployed.deploy and rel_err(deployed(x), expected) < 1e-5, name
    assert read_checkpoint(tmp_path / "a.safetensors").pretrained_cfg["crop_pct"] == 0.95
    with pytest.raises(CheckpointError, match="records no model name"):
        create_model_from_checkpoint(tmp_path / "bare.safetensors")
    (tmp_path / "broken.pth").write_bytes((tmp_path / "legacy.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="broken.pth.*truncated"):
        read_checkpoint(tmp_path / "broken.pth")


def _timm_train_checkpoint(folder: Path, model_kwargs: dict, img_size: int) -> Path:
    """A checkpoint as timm's train.py writes it (timm's CheckpointSaver, its args namespace)."""
    model = timm.create_model("mrconvnext_atto", num_classes=4, **model_kwargs)
    args = argparse.Namespace(model="mrconvnext_atto", model_kwargs=model_kwargs, num_classes=4, in_chans=None,
                              img_size=img_size, input_size=None, crop_pct=0.9, interpolation="", mean=None, std=None)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folder.mkdir(exist_ok=True)
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(epoch=0, metric=1.0)
    return folder / "last.pth.tar"


def test_timm_train_checkpoints_keep_their_planned_size(tmp_path) -> None:
    planned_64 = _timm_train_checkpoint(tmp_path / "a", {"img_size": SIZE}, img_size=SIZE)
    model = create_model_from_checkpoint(planned_64)
    assert model.img_size == (SIZE, SIZE) and model.num_classes == 4 and model.pretrained_cfg["crop_pct"] == 0.9
    # a model created without img_size (timm before its scripts passed the data size): planned for 224, trained at 64
    planned_224 = _timm_train_checkpoint(tmp_path / "b", {}, img_size=SIZE)
    model = create_model_from_checkpoint(planned_224)
    assert model.img_size == (224, 224) and model.pretrained_cfg["input_size"] == (3, SIZE, SIZE)


def test_timm_loading_paths_name_the_planned_size(tmp_path) -> None:
    path = _timm_train_checkpoint(tmp_path, {"img_size": SIZE}, img_size=SIZE)
    message = r"planned for img_size=64, this model's for img_size=224: create it with img_size=64 \(timm's " + (
        r"scripts: --model-kwargs img_size=64\)"
    )
    with pytest.raises(RuntimeError, match=message):  # timm's validate.py: create_model, then load_checkpoint
        model = timm.create_model("mrconvnext_atto", num_classes=4)
        timm.models.load_checkpoint(model, str(path))
    with pytest.raises(RuntimeError, match=message):
        timm.create_model("mrconvnext_atto", num_classes=4, checkpoint_path=str(path))
    with pytest.raises(RuntimeError, match=message):
        timm.create_model(
            "mrconvnext_atto", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=4)
        )


def test_timm_onnx_export_stops_with_a_pointer(tmp_path) -> None:
    from timm.utils.onnx import onnx_export

    model = timm.create_model("mrconvnext_atto", img_size=32, deploy=True).eval()
    with pytest.raises(RuntimeError, match="python -m mrconvnext.export --format onnx"):
        onnx_export(model, str(tmp_path / "model.onnx"), input_size=(3, 32, 32), use_dynamo=False)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("content", [b"hello\n", b"abc", b"J\xba?\x9c", b""], ids=["text", "short", "struct", "empty"])
def test_a_file_that_is_no_checkpoint_is_named_by_every_tool(content, tmp_path, capsys) -> None:
    """``torch.load`` of bytes that are no checkpoint raises whatever its unpickler meets (KeyError, IndexError,
    struct.error, EOFError, ...): the one reader turns each into a CheckpointError naming the file, which the
    tools print as their error (exit status 1), with no traceback."""
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"notes\.pth.*not a torch\.save file"):
        read_checkpoint(path)
    assert convert.main([str(path), str(tmp_path / "converted.pth")]) == 1
    assert export_main(["--checkpoint", str(path), "--output", str(tmp_path / "export")]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all("notes.pth" in line and "not a torch.save file" in line for line in errors)
    assert not (tmp_path / "converted.pth").exists() and not (tmp_path / "export").exists()
