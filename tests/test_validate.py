"""validate.py: accuracy against an independent evaluation, deploy form, results files, errors, torchrun."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import accuracy

from mrconvnext import MRConv, validate
from mrconvnext.data.images import check_num_classes, find_image_folder
from mrconvnext.utils.evaluation import MetricSums, sample_metrics

from .image_formats import write_formats
from .reference import randomize_

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "mrconvnext_atto"
NUM_CLASSES, PER_CLASS, IMG_SIZE = 7, 2, 32  # 14 images: batches of 4 leave a remainder, top-5 is not trivial


def _write_images(folder: Path, num_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (IMG_SIZE, IMG_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c}" / f"img{i}.png")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """An ImageNet-style root: ``root/val/<class>/<image>.png``."""
    root = tmp_path_factory.mktemp("imagenet")
    _write_images(root / "val", NUM_CLASSES, PER_CLASS)
    return root


@pytest.fixture(scope="module")
def trained_model() -> torch.nn.Module:
    """MRConvNeXt-atto planned for 32 x 32 with random MRConv weights / BN statistics and O(1) layer scales."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, img_size=IMG_SIZE, num_classes=NUM_CLASSES)
    for layer in model.modules():
        if isinstance(layer, MRConv):
            randomize_(layer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):  # ConvNeXt layer scale starts at 1e-6, which would hide every MRConv
                param.uniform_(0.2, 0.6)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(trained_model, tmp_path_factory) -> Path:
    """A training-script checkpoint: weights plus the ``num_classes`` / ``img_size`` they were trained with."""
    path = tmp_path_factory.mktemp("ckpt") / "model_best.pth"
    torch.save({"state_dict": trained_model.state_dict(), "num_classes": NUM_CLASSES, "img_size": IMG_SIZE}, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny inputs: one thread is faster, and far faster on a loaded machine (no OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def _argv(data_root: Path, checkpoint: Path, *extra: str) -> list[str]:
    """The ``make demo`` interface plus a crop of 1.0 (the test's reference does no resizing) and small batches."""
    base = ["--data-dir", str(data_root), "--model", MODEL, "--checkpoint", str(checkpoint), "--img-size", "32"]
    return base + ["--crop-pct", "1.0", "-b", "4", "-j", "0", "--device", "cpu", *extra]


def _run(capsys, argv: list[str]) -> list[dict]:
    assert validate.main(argv) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture(scope="module")
def reference(trained_model, data_root) -> dict:
    """Top-1 / top-5 / mean cross-entropy computed here: PNGs to tensors with NumPy, one forward pass."""
    images, targets = [], []
    for label, class_dir in enumerate(sorted((data_root / "val").iterdir())):
        for path in sorted(class_dir.iterdir()):
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            pixels = (pixels - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
            images.append(torch.from_numpy(pixels).permute(2, 0, 1).float())
            targets.append(label)
    target = torch.tensor(targets)
    with torch.no_grad():
        logits = trained_model(torch.stack(images)).double()
    top5 = logits.topk(5, dim=1).indices
    return {
        "top1": 100.0 * (top5[:, 0] == target).double().mean().item(),
        "top5": 100.0 * (top5 == target[:, None]).any(dim=1).double().mean().item(),
        "loss": F.cross_entropy(logits, target).item(),
        "num_images": len(targets),
    }


@pytest.fixture(scope="module")
def train_form_result(data_root, checkpoint) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    with contextlib.redirect_stdout(io.StringIO()) as out:  # module scope: no capsys
        assert validate.main(_argv(data_root, checkpoint)) == 0
    (line,) = out.getvalue().splitlines()
    return json.loads(line)


def test_accuracy_matches_independent_evaluation(train_form_result, reference, trained_model) -> None:
    result = train_form_result
    assert result["num_images"] == reference["num_images"] == NUM_CLASSES * PER_CLASS
    assert result["top1"] == pytest.approx(reference["top1"], abs=1e-3)
    assert result["top5"] == pytest.approx(reference["top5"], abs=1e-3)
    assert 0 < reference["top5"] < 100  # 7 classes: top-5 can miss
    assert result["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert result["top1_err"] == pytest.approx(100 - result["top1"])
    expected_params = round(sum(p.numel() for p in trained_model.parameters()) / 1e6, 2)
    assert result["param_count"] == expected_params
    assert result["img_size"] == IMG_SIZE and result["reparam"] is False
    assert result["img_per_sec"] > 0 and result["batch_latency_ms"] > 0


def test_reparam_gives_same_accuracy(capsys, tmp_path, data_root, checkpoint, train_form_result) -> None:
    """Also: a ``--model-list`` file (comments, blank lines, pretrained tags) and appending to a JSON results file."""
    models = tmp_path / "models.txt"
    models.write_text(f"{MODEL}\n# a comment\n\n{MODEL}.untrained\n")
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"model": "earlier"}]))
    rows = _run(
        capsys, _argv(data_root, checkpoint, "--reparam", "--model-list", str(models), "--results-file", str(results))
    )
    assert [r["model"] for r in rows] == [MODEL, f"{MODEL}.untrained"]
    for result in rows:
        assert result["reparam"] is True
        assert result["top1"] == train_form_result["top1"] and result["top5"] == train_form_result["top5"]
        assert result["loss"] == pytest.approx(train_form_result["loss"], abs=1e-5)
        assert result["param_count"] != train_form_result["param_count"]  # branches folded into one kernel
    assert json.loads(results.read_text()) == [{"model": "earlier"}, *rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.txt", "results.json"]  # no temp file left


def test_compare_reparam_reports_small_difference(capsys, tmp_path, data_root, checkpoint, train_form_result) -> None:
    """Also: appending to a CSV results file whose earlier rows have other columns."""
    results = tmp_path / "results.csv"
    results.write_text("model,top1,note\nearlier,50.0,old run\n")
    (result,) = _run(capsys, _argv(data_root, checkpoint, "--compare-reparam", "--results-file", str(results)))
    assert 0 < result["max_abs_logit_diff"] < 1e-4  # > 0: two different forms really ran
    assert result["top1_mismatches"] == 0
    assert result["top1"] == result["deploy_top1"] == train_form_result["top1"]
    assert result["deploy_loss"] == pytest.approx(result["loss"], abs=1e-5)
    assert result["deploy_param_count"] != result["param_count"]
    with open(results, newline="") as f:
        earlier, row = csv.DictReader(f)
    assert earlier["model"] == "earlier" and earlier["note"] == "old run" and earlier["max_abs_logit_diff"] == ""
    assert row["note"] == "" and {k: str(v) for k, v in result.items()} == {k: row[k] for k in result}


def _no_images(root: Path) -> None:
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "notes.txt").write_text("not an image")


def _loose_images(root: Path) -> None:
    root.mkdir()
    Image.new("RGB", (IMG_SIZE, IMG_SIZE)).save(root / "img.png")


ERROR_CASES = {
    "missing data dir": (lambda root: None, [], "does not exist"),
    "empty folder": (lambda root: root.mkdir(), [], "no images found"),
    "non-image folder": (_no_images, [], "no images found"),
    "images without class folders": (_loose_images, [], "expected one sub-folder per class"),
    "class count mismatch": (
        lambda root: _write_images(root, 3, 1),
        [],
        "class count mismatch: the dataset has 3 classes (3 class folders) but the model has 7 outputs",
    ),
    "checkpoint of another model": (None, ["--model", "mrconvnext_nano"], "does not fit mrconvnext_nano("),
    "checkpoint of another size": (
        None,
        ["--model-kwargs", "img_size=64"],
        "the checkpoint records img_size=32, given img_size=64: Checkpoint is incompatible",
    ),
    "missing checkpoint": (None, ["--checkpoint", "missing.pth"], "checkpoint 'missing.pth' does not exist"),
    "unknown model": (None, ["--model", "mrconvnext_huge"], "unknown model 'mrconvnext_huge'"),
    "class map of another size": (None, ["--class-map", "CLASS_MAP"], "(class map"),
    "missing class map": (None, ["--class-map", "nowhere.txt"], "Cannot locate specified class map file"),
    "results file of another format": (None, ["--results-file", "BAD_RESULTS"], "is not a JSON list of results"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_reported_with_nonzero_status(case, capsys, tmp_path, data_root, checkpoint) -> None:
    make_data, extra, message = ERROR_CASES[case]
    root = data_root
    if make_data is not None:
        root = tmp_path / "data"
        make_data(root)
    class_map = tmp_path / "classes.txt"
    class_map.write_text("\n".join(f"class{c}" for c in range(NUM_CLASSES + 1)))
    bad_results = tmp_path / "results.json"
    bad_results.write_text(json.dumps({"top1": 50.0}))
    extra = [{"CLASS_MAP": str(class_map), "BAD_RESULTS": str(bad_results)}.get(a, a) for a in extra]
    assert validate.main(_argv(root, checkpoint, *extra)) == 1
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""  # no result line


def test_script_exits_nonzero_without_published_weights(data_root) -> None:
    """No checkpoint means ``--pretrained`` (as in timm); MRConvNeXt has no published weights yet."""
    proc = subprocess.run(
        [sys.executable, "validate.py", "--data-dir", str(data_root), "--model", MODEL, "--device", "cpu"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"validate.py: error: cannot create model '{MODEL}'" in proc.stderr
    assert f"No pretrained weights exist for {MODEL}.untrained" in proc.stderr


def test_torchrun_two_processes_count_each_image_once(data_root, checkpoint, train_form_result) -> None:
    """2 CPU ranks (gloo): sharded batches padded by the sampler, gathered without the padding."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "validate.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd + _argv(data_root, checkpoint), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # printed by rank 0 only
    result = json.loads(lines[0])
    assert result["num_images"] == train_form_result["num_images"]
    assert result["top1"] == train_form_result["top1"] and result["top5"] == train_form_result["top5"]
    assert result["loss"] == pytest.approx(train_form_result["loss"], abs=1e-5)


def test_find_image_folder_prefers_split_dir(data_root) -> None:
    assert find_image_folder(str(data_root)) == str(data_root / "val")
    assert find_image_folder(str(data_root / "val")) == str(data_root / "val")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        find_image_folder(str(next((data_root / "val" / "class0").iterdir())))


def test_check_num_classes_accepts_match_only() -> None:
    check_num_classes({"a": 0, "b": 1}, 2)
    with pytest.raises(ValueError, match="--num-classes 2"):
        check_num_classes({"a": 0, "b": 1}, 1000)


def test_sample_metrics_agree_with_timm_accuracy() -> None:
    torch.manual_seed(0)
    sums = MetricSums()
    logits, target = torch.randn(37, 10), torch.randint(0, 10, (37,))
    for chunk_logits, chunk_target in zip(logits.split(8), target.split(8), strict=True):
        sums.update(sample_metrics(chunk_logits, chunk_target))
    top1, top5 = accuracy(logits, target, topk=(1, 5))
    summary = sums.summary()
    assert sums.count == 37
    assert summary["top1"] == pytest.approx(top1.item()) and summary["top5"] == pytest.approx(top5.item())
    assert summary["loss"] == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------- user errors


def _validate(capsys, caplog, argv: list[str]) -> tuple[int, list[dict], str]:
    """Exit status, result rows, and stderr plus the log."""
    caplog.clear()
    status = validate.main(argv)
    captured = capsys.readouterr()
    return status, [json.loads(line) for line in captured.out.splitlines()], captured.err + caplog.text


def test_validate_suggests_close_model_names(capsys, caplog, data_root, checkpoint) -> None:
    status, _, err = _validate(capsys, caplog, _argv(data_root, checkpoint, "--model", "mrconvnext_atoo"))
    assert status == 1 and "unknown model 'mrconvnext_atoo' (similar registered models: mrconvnext_atto" in err


def test_validate_warns_about_another_eval_size(capsys, caplog, data_root, checkpoint) -> None:
    with pytest.warns(UserWarning, match=f"planned for img_size={IMG_SIZE} gets 48 x 48 inputs"):  # the model's
        status, rows, _ = _validate(capsys, caplog, _argv(data_root, checkpoint, "--img-size", "48"))
    assert status == 0 and rows[0]["img_size"] == 48


def test_validate_does_not_count_unreadable_images(capsys, caplog, tmp_path, data_root, checkpoint) -> None:
    clean = _validate(capsys, caplog, _argv(data_root, checkpoint))[1][0]
    shutil.copytree(data_root, tmp_path / "data")
    broken = tmp_path / "data" / "val" / "class3" / "img9.png"
    broken.write_bytes((data_root / "val" / "class3" / "img0.png").read_bytes()[:60])  # truncated PNG
    status, rows, err = _validate(capsys, caplog, _argv(tmp_path / "data", checkpoint))
    assert status == 0 and f"skipped unreadable image {str(broken)!r}" in err
    row = rows[0]
    assert row["num_images"] == clean["num_images"] and row["skipped_images"] == 1
    for key in ("top1", "top5", "loss"):
        assert row[key] == pytest.approx(clean[key], abs=1e-6), key


@pytest.fixture(scope="module")
def odd_root(data_root, tmp_path_factory) -> Path:
    """13 of the 14 images as ``train`` and ``val`` folders: an odd count, so two processes pad one sample."""
    root = tmp_path_factory.mktemp("odd")
    for split in ("train", "val"):
        shutil.copytree(data_root / "val", root / split)
        (root / split / "class6" / "img1.png").unlink()
    return root


@pytest.fixture(scope="module")
def shard_formats(odd_root, tmp_path_factory) -> dict[str, Path]:
    return write_formats(odd_root, tmp_path_factory.mktemp("formats"))


@pytest.fixture(scope="module")
def odd_folder_result(odd_root, checkpoint) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert validate.main(_argv(odd_root, checkpoint)) == 0
    (line,) = out.getvalue().splitlines()
    return json.loads(line)


def _same_as_folder(row: dict, folder: dict) -> None:
    assert row["num_images"] == folder["num_images"] == 13 and row["skipped_images"] == 0
    assert row["top1"] == folder["top1"] and row["top5"] == folder["top5"]
    assert row["loss"] == pytest.approx(folder["loss"], abs=1e-5)


@pytest.mark.parametrize("name", ["wds", "parquet", "hfds"])
def test_shards_validate_as_the_folder(name, capsys, shard_formats, checkpoint, odd_folder_result) -> None:
    """``--dataset`` as in timm's validate.py, ``--split validation`` by default (the Hub copies' name)."""
    (row,) = _run(capsys, _argv(shard_formats[name], checkpoint, "--dataset", name))
    _same_as_folder(row, odd_folder_result)


def test_torchrun_two_processes_validate_shards_once(shard_formats, checkpoint, odd_folder_result) -> None:
    """Each process reads its own half of the shards; the one padding repeat is neither counted nor skipped."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "validate.py"]
    argv = _argv(shard_formats["wds"], checkpoint, "--dataset", "wds")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    _same_as_folder(json.loads(line), odd_folder_result)


def test_a_missing_split_of_shards_is_reported(capsys, shard_formats, checkpoint) -> None:
    assert validate.main(_argv(shard_formats["wds"], checkpoint, "--dataset", "wds", "--split", "val")) == 1
    assert "validate.py: error: " in (err := capsys.readouterr().err) and "no split 'val'" in err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--batch-size", "0", "--batch-size must be positive, got 0"),
        ("--img-size", "0", "--img-size must be positive, got 0"),
        ("--workers", "-1", "--workers must be non-negative, got -1"),
    ],
)
def test_flags_out_of_range_are_reported(capsys, data_root, checkpoint, flag, value, message) -> None:
    """Values PyTorch or timm would have refused with a traceback deep inside the loader or the transforms."""
    assert validate.main([*_argv(data_root, checkpoint), flag, value]) == 1
    assert f"validate.py: error: {message}" in capsys.readouterr().err


def test_a_sequence_model_checkpoint_is_named_as_such(capsys, data_root, tmp_path) -> None:
    """A token model's checkpoint given to the image evaluator: said as that, not as a class-count mismatch or a
    shape error from inside the model (sequence models of images are evaluated: tests/test_checkpoint_schema.py)."""
    from mrconvnext.utils.checkpoint import checkpoint_record, save_checkpoint_file

    path = tmp_path / "listops.pth"
    save_checkpoint_file(checkpoint_record(timm.create_model("mrconv_listops_base", depth=1, embed_dim=8)), path)
    assert validate.main(["--data-dir", str(data_root), "--checkpoint", str(path), "-j", "0", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert (
        "validate.py: error: mrconv_listops_base is a sequence model without image input" in err
        and "train_sequence.py" in err
    )
