"""train_imagenet.py: a 2-process CPU run with kill + resume, the numbers it logs, non-finite losses, and the
pre-flight errors.

The end-to-end runs launch ``torchrun --nproc_per_node 2`` (gloo) on a generated shapes ImageFolder, with a
checkpoint after every update. An audit hook (``sitecustomize`` on ``PYTHONPATH``) records, per rank, every
file Python opens for writing and every rename, so the tests can see which process committed each
checkpoint (by renaming it into place) and wrote the CSV; with ``HOLD_WRITE`` set it also stops rank 0 in
the first file it opens under that path, so that a kill lands in the middle of that checkpoint's write.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler

from mrconvnext import train_imagenet
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.utils.training import PreflightError, TrainingError, TrainingRun, add_run_arguments, parse_args
from tests.processes import descendants

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
TRAIN_ARGS = [
    "--model", "mrconvnext_atto", "--num-classes", "2", "--img-size", "32", "-b", "8", "--epochs", str(EPOCHS),
    "--lr", "2e-3", "--warmup-epochs", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
    "--smoothing", "0", "--scale", "0.8", "1", "--hflip", "0", "--workers", "0", "--model-ema",
    "--model-ema-decay", "0.5", "--crop-pct", "1.0", "--grad-accum-steps", "2", "--checkpoint-every", "1",
    "--log-interval", "1",
]  # fmt: skip
LOSS_LINE = re.compile(
    r"epoch (\d+)/\d+ update (\d+)/\d+: loss ([\d.]+), lr ([\d.e+-]+), ([\d.]+) img/s \(([\d.]+) per process\)"
)
AUDIT_HOOK = textwrap.dedent(
    """
    import os, sys
    if os.environ.get("RANK") is not None and os.environ.get("WRITE_AUDIT_DIR"):
        _log = open(os.path.join(os.environ["WRITE_AUDIT_DIR"], "writes_" + os.environ["RANK"] + ".log"), "a")
        _hold = os.environ.get("HOLD_WRITE") if os.environ["RANK"] == "0" else None
        def _hook(event, args):
            if event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
                _log.write("open " + str(args[0]) + "\\n")
                if _hold and _hold in str(args[0]):
                    open(os.environ["WRITE_AUDIT_DIR"] + "/held", "w").close()
                    import time
                    time.sleep(600)  # killed here, in the middle of the write
            elif event == "os.rename":
                _log.write("rename " + str(args[0]) + " " + str(args[1]) + "\\n")
            _log.flush()
        sys.addaudithook(_hook)
    """
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 2 classes; 32 train images = 2 updates per epoch at 2 x 8; 10 val images = 3 batches of 4 over 2 ranks
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 16, 5, size=32, classes=("circle", "square"), seed=1)


def _torchrun(args: list[str], audit_dir: Path, kill_when: Path | None = None, hold_write: str = "") -> str:
    """Run train_imagenet.py on 2 CPU processes; with ``kill_when``, SIGKILL everything once that path exists
    (``hold_write``: rank 0 stops when it opens a file under that path, and ``kill_when`` is its marker)."""
    (audit_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = dict(os.environ, PYTHONPATH=f"{audit_dir}{os.pathsep}{ROOT}", WRITE_AUDIT_DIR=str(audit_dir))
    env.update(HOLD_WRITE=hold_write)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "train_imagenet.py"), *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    if kill_when is None:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        return out
    deadline = time.monotonic() + 300
    while not kill_when.exists():
        assert proc.poll() is None, f"run ended before {kill_when} appeared:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts its workers in their own sessions
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate()
    return out


def _writes(audit_dir: Path, rank: int, run_dir: Path) -> list[str]:
    """Write events of ``rank`` inside ``run_dir``, paths relative to it."""
    log = audit_dir / f"writes_{rank}.log"
    lines = log.read_text().splitlines() if log.exists() else []
    prefix = f"{run_dir}{os.sep}"
    return [line.replace(prefix, "") for line in lines if prefix in line]


def _csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _state_dicts(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    return {"model": checkpoint["state_dict"], "ema": checkpoint["state_dict_ema"]}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    out_dir = tmp_path_factory.mktemp("full")
    audit_dir = tmp_path_factory.mktemp("audit_full")
    log = _torchrun(
        [*TRAIN_ARGS, "--data-dir", str(data_dir), "--output", str(out_dir), "--experiment", "run"], audit_dir
    )
    return out_dir / "run", audit_dir, log


def test_two_process_run(uninterrupted):
    run_dir, audit_dir, log = uninterrupted
    # both ranks took the same 2 updates per epoch (32 images / (2 ranks x 8), in micro-batches of 4)
    assert log.count("updates/rank [2, 2]") == EPOCHS, log
    rows = _csv_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]), rows
    # every validation sample counted exactly once (10 images over 2 ranks, padding dropped)
    assert all(int(r["eval_samples"]) == 10 for r in rows)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"epoch_{EPOCHS:04d}"]

    # rank 0 committed every checkpoint, plain model file and CSV row; rank 1 only adds its RNG state (torch.save
    # writes from C++, outside the audit hook) to the shared checkpoint folder
    rank0, rank1 = _writes(audit_dir, 0, run_dir), _writes(audit_dir, 1, run_dir)
    for epoch in range(1, EPOCHS + 1):
        assert rank0.count(f"rename checkpoints/.epoch_{epoch:04d}.tmp checkpoints/epoch_{epoch:04d}") == 1
    assert rank0.count("open summary.csv") == EPOCHS
    assert sum(bool(re.fullmatch(r"rename \.last\.pth\.\w+\.tmp last\.pth", w)) for w in rank0) == EPOCHS, rank0
    assert rank1 == []
    final = run_dir / "checkpoints" / f"epoch_{EPOCHS:04d}"
    assert (final / "random_states_0.pkl").is_file() and (final / "random_states_1.pkl").is_file()
    # --checkpoint-every 1: a checkpoint after update 1 of each epoch (update 2 ends it), removed with the epoch's
    for epoch in range(EPOCHS):
        name = f"epoch_{epoch:04d}_update_000001"
        assert rank0.count(f"rename checkpoints/.{name}.tmp checkpoints/{name}") == 1


def test_numbers_to_plan_with(uninterrupted):
    """Per update (--log-interval 1): loss, lr, images/s in total and per process, data wait, ETA of the epoch
    and the run; per epoch the same in summary.csv (peak memory only on CUDA)."""
    run_dir, _, log = uninterrupted
    lines = re.findall(r"epoch \d/3 update \d/2: .*", log)
    assert len(lines) == 2 * EPOCHS, log
    for line in lines:
        match = re.fullmatch(
            r"epoch \d/3 update \d/2: loss [\d.]+, lr [\d.e+-]+, ([\d.]+) img/s \(([\d.]+) per process\), "
            r"data wait (\d+)%, ETA epoch \d+:\d\d:\d\d, run \d+:\d\d:\d\d",
            line,
        )
        assert match, line
        assert float(match.group(1)) == pytest.approx(2 * float(match.group(2)), abs=0.2)
        assert 0 <= int(match.group(3)) <= 100
    assert re.search(r"epoch 3/3 update 2/2: .*ETA epoch 0:00:00, run 0:00:00", log)
    rows = _csv_rows(run_dir)
    for row in rows:
        assert float(row["samples_s"]) == pytest.approx(2 * float(row["samples_s_per_process"]))
        assert 0 <= float(row["data_wait"]) < 1 and float(row["epoch_time"]) > 0
        assert row["peak_mem_gib"] == "" and row["skipped_updates"] == "0"  # CPU: no CUDA memory to report
    assert float(rows[0]["eta_run_s"]) > 0 and float(rows[-1]["eta_run_s"]) == 0


def _losses(log: str) -> dict[tuple[int, int], float]:
    """``(epoch, update): loss`` of the per-update log lines (mean over both processes)."""
    return {(int(m.group(1)), int(m.group(2))): float(m.group(3)) for m in LOSS_LINE.finditer(log)}


def test_resume_after_kill_matches_uninterrupted(uninterrupted, data_dir, tmp_path):
    full_dir, _, full_log = uninterrupted
    run_dir = tmp_path / "run"
    args = [*TRAIN_ARGS, "--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "run"]
    # killed while rank 0 commits the checkpoint of epoch 2 (its files written, meta.json not yet)
    _torchrun(args, tmp_path, kill_when=tmp_path / "held", hold_write=".epoch_0002.tmp")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [".epoch_0002.tmp", "epoch_0001", "epoch_0001_update_000001"], checkpoints
    assert not (run_dir / "checkpoints" / ".epoch_0002.tmp" / "meta.json").exists()

    # the newest complete checkpoint is the one after update 1 of epoch 2: the run goes on with its next batch
    log = _torchrun([*TRAIN_ARGS, "--data-dir", str(data_dir), "--resume", str(run_dir)], tmp_path / "")
    assert "continuing at epoch 2, update 2" in log
    assert log.count("updates/rank [2, 2]") == EPOCHS - 1
    resumed_losses, full_losses = _losses(log), _losses(full_log)
    assert sorted(resumed_losses) == [(2, 2), (3, 1), (3, 2)]
    for step, loss in resumed_losses.items():  # the same batches, augmentation draws and weights as uninterrupted
        assert loss == pytest.approx(full_losses[step], abs=1e-4), step
    resumed, full = _state_dicts(run_dir), _state_dicts(full_dir)
    for form in ("model", "ema"):
        assert resumed[form].keys() == full[form].keys()
        for key, value in full[form].items():
            torch.testing.assert_close(resumed[form][key], value, rtol=1e-6, atol=1e-7, msg=f"{form} {key}")
    rows, full_rows = _csv_rows(run_dir), _csv_rows(full_dir)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in full_rows]
    for row, full_row in zip(rows, full_rows, strict=True):  # epoch 2's row sums both of its parts
        for key in ("train_loss", "eval_top1", "eval_loss", "ema_top1", "lr"):
            assert float(row[key]) == pytest.approx(float(full_row[key]), rel=1e-5), key
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"epoch_{EPOCHS:04d}"]  # .tmp removed


def test_final_checkpoint_loads_with_timm(uninterrupted):
    run_dir, _, _ = uninterrupted
    for name in ("last.pth", "model_best.pth"):
        model = timm.create_model(
            "mrconvnext_atto",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(run_dir / name), num_classes=2),
            num_classes=2,
            img_size=32,
        )
        expected = torch.load(run_dir / name, map_location="cpu", weights_only=True)["state_dict_ema"]
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------------------------- pre-flight


def _preflight_error(args: list[str], tmp_path: Path) -> str:
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as info:
        train_imagenet.train([*TRAIN_ARGS, "--output", str(out), *args])
    assert not out.exists(), "pre-flight errors must come before anything is written"
    return str(info.value)


def test_missing_data_dir(tmp_path):
    assert "does not exist" in _preflight_error(["--data-dir", str(tmp_path / "nope")], tmp_path)


def test_empty_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    assert "is empty" in _preflight_error(["--data-dir", str(tmp_path / "data")], tmp_path)
    (tmp_path / "data" / "train" / "circle").mkdir(parents=True)
    (tmp_path / "data" / "val" / "circle").mkdir(parents=True)
    assert "is empty" in _preflight_error(["--data-dir", str(tmp_path / "data")], tmp_path)


def test_class_folders_do_not_match_num_classes(data_dir, tmp_path):
    message = _preflight_error(["--data-dir", str(data_dir), "--num-classes", "3"], tmp_path)
    assert "has 2 class folders but --num-classes is 3" in message


def test_unknown_model(data_dir, tmp_path):
    message = _preflight_error(["--data-dir", str(data_dir), "--model", "mrconvnext_huge"], tmp_path)
    assert "unknown model 'mrconvnext_huge'; similar: " in message and "mrconvnext_base" in message


def test_batch_not_divisible_by_accumulation(data_dir, tmp_path):
    message = _preflight_error(["--data-dir", str(data_dir), "-b", "6", "--grad-accum-steps", "4"], tmp_path)
    assert "--batch-size 6 is not divisible by --grad-accum-steps 4" in message


def test_resume_from_a_weights_file(uninterrupted, data_dir, tmp_path):
    run_dir, _, _ = uninterrupted
    message = _preflight_error(["--data-dir", str(data_dir), "--resume", str(run_dir / "last.pth")], tmp_path)
    assert "last.pth' is a file: --resume takes a run folder or one of its checkpoints/epoch_NNNN folders" in message


def test_resume_from_other_model(uninterrupted, data_dir, tmp_path):
    run_dir, _, _ = uninterrupted
    args = ["--data-dir", str(data_dir), "--model", "mrconvnext_nano", "--resume", str(run_dir)]
    message = _preflight_error(args, tmp_path)
    assert "trained with --model mrconvnext_atto, this run has mrconvnext_nano" in message


def test_cli_reports_preflight_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_imagenet.py"), "--data-dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "train_imagenet.py: error: data directory" in result.stderr and "Traceback" not in result.stderr


def test_run_flags_out_of_range(data_dir, tmp_path):
    """Values that crashed later (a modulo or division by 0, an AssertionError in timm, a DataLoader, Dropout or
    optimizer ValueError), checkpointed every update (--checkpoint-every -1) or trained with something else than
    asked (a negative weight decay or mixup alpha, a random-erasing probability of 2) are preflight errors naming
    the flag."""
    for flag, value, message in [
        ("--log-interval", "0", "--log-interval must be positive, got 0"),
        ("--checkpoint-every", "-2", "--checkpoint-every must be non-negative, got -2"),
        ("--preempt-grace", "-1", "--preempt-grace must be non-negative, got -1.0"),
        ("--workers", "-1", "--workers must be non-negative, got -1"),
        ("--drop-path", "1", "--drop-path must be in [0, 1), got 1.0"),
        ("--batch-size", "0", "--batch-size must be positive, got 0"),
        ("--grad-accum-steps", "0", "--grad-accum-steps must be positive, got 0"),
        ("--epochs", "0", "--epochs must be positive, got 0"),
        ("--img-size", "0", "--img-size must be positive, got 0"),
        ("--lr", "-1", "--lr must be non-negative, got -1.0"),  # 0 is allowed: weights as loaded
        ("--lr-base-size", "0", "--lr-base-size must be positive, got 0"),
        ("--min-lr", "-1", "--min-lr must be non-negative, got -1.0"),
        ("--warmup-epochs", "-1", "--warmup-epochs must be non-negative, got -1"),
        ("--weight-decay", "-1", "--weight-decay must be non-negative, got -1.0"),
        ("--mixup", "-1", "--mixup must be non-negative, got -1.0"),
        ("--reprob", "2", "--reprob must be in [0, 1], got 2.0"),
        ("--smoothing", "1.5", "--smoothing must be in [0, 1), got 1.5"),
        ("--crop-pct", "0", "--crop-pct must be positive, got 0.0"),
        ("--val-interval", "0", "--val-interval must be positive, got 0"),
        ("--opt-eps", "-1", "--opt-eps must be non-negative, got -1.0"),
        ("--color-jitter", "-1", "--color-jitter must be non-negative, got -1.0"),
        ("--model-ema-decay", "1.5", "--model-ema-decay must be in [0, 1), got 1.5"),
    ]:
        assert message in _preflight_error(["--data-dir", str(data_dir), flag, value], tmp_path)
    for flag, values, message in [
        ("--scale", ["0", "0"], "--scale 0.0 0.0: expected 0 < min <= max <= 1"),
        ("--ratio", ["2", "1"], "--ratio 2.0 1.0: expected 0 < min <= max"),
    ]:
        assert message in _preflight_error(["--data-dir", str(data_dir), flag, *values], tmp_path)


def test_kernel_lr_needs_mrconv_layers(data_dir, tmp_path):
    args = ["--data-dir", str(data_dir), "--model", "convnext_atto", "--kernel-lr", "1e-4"]
    assert "convnext_atto has no MRConv layers" in _preflight_error(args, tmp_path)


# ------------------------------------------------------------------------------------ non-finite losses


def _toy_run(tmp_path: Path, *flags: str) -> TrainingRun:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, output=str(tmp_path))
    parser.add_argument("--epochs", type=int, default=1)
    return TrainingRun(parse_args(parser, ["--cpu", "--experiment", "toy", *flags]), "toy", {})


def _toy_epoch(run: TrainingRun, bad_call: int) -> tuple[dict, list[torch.Tensor]]:
    """One epoch of 8 updates of a linear model whose ``bad_call``-th loss is NaN; the weights before each call."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = CosineLRScheduler(optimizer, t_initial=8, t_in_epochs=False)
    run.restore(scheduler)
    data = torch.utils.data.TensorDataset(torch.randn(16, 2), torch.randn(16, 1))
    model, optimizer, loader = run.prepare(model, optimizer, torch.utils.data.DataLoader(data, batch_size=2))
    weights = []

    def loss_fn(batch):
        weights.append(model.weight.detach().clone())
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        return loss * float("nan") if len(weights) == bad_call else loss, 2, {}

    return run.train_one_epoch(0, model, loader, optimizer, scheduler, loss_fn, updates_per_epoch=8), weights


def test_nonfinite_loss_stops_the_run_before_the_update(tmp_path, fresh_accelerate_state):
    with _toy_run(tmp_path, "--checkpoint-every", "2") as run, pytest.raises(TrainingError) as info:
        _toy_epoch(run, bad_call=5)
    checkpoint = tmp_path / "toy" / "checkpoints" / "epoch_0000_update_000004"
    assert re.fullmatch(
        r"non-finite loss at update 5 \(epoch 1, update 5/8, process\(es\) \[0\]\), lr \d\.\d{3}e-0\d: stopped before "
        rf"applying it; .*--skip-nonfinite-loss to skip such updates; last good checkpoint: {re.escape(str(checkpoint))}",
        str(info.value),
    ), str(info.value)
    assert (checkpoint / "meta.json").is_file()


def test_a_mid_epoch_resume_with_another_seed_says_the_rest_of_the_epoch_is_another_order(
    tmp_path, fresh_accelerate_state, caplog
):
    """The seed (and the dataset) decide an epoch's order: resumed mid-epoch with another ``--seed``, the rest of
    the epoch reads some samples twice and others never, and the run says so; with the same one it does not."""
    with _toy_run(tmp_path, "--checkpoint-every", "2") as run, pytest.raises(TrainingError):
        _toy_epoch(run, bad_call=5)
    checkpoint = tmp_path / "toy" / "checkpoints" / "epoch_0000_update_000004"
    assert json.loads((checkpoint / "meta.json").read_text())["epoch_order"] == {"seed": 42, "samples": 16}
    for seed in ("42", "7"):
        shutil.copytree(tmp_path / "toy", tmp_path / seed)
        resumed = str(tmp_path / seed / "checkpoints" / checkpoint.name)
        caplog.clear()
        with _toy_run(tmp_path, "--resume", resumed, "--seed", seed) as run, caplog.at_level("INFO"):
            _, weights = _toy_epoch(run, bad_call=0)
        assert len(weights) == 4  # updates 5-8
        warned = "the checkpoint's epoch order had seed 42, this run's has seed 7: the rest of epoch 1 is not exactly"
        assert (warned in caplog.text) == (seed == "7"), caplog.text


def test_nonfinite_loss_skips_the_update_when_asked(tmp_path, fresh_accelerate_state, caplog):
    with _toy_run(tmp_path, "--skip-nonfinite-loss") as run, caplog.at_level("INFO"):
        metrics, weights = _toy_epoch(run, bad_call=3)
    assert metrics["skipped_updates"] == 1 and math.isfinite(metrics["train_loss"])
    assert torch.equal(weights[2], weights[3])  # the NaN update left the weights alone
    assert not torch.equal(weights[3], weights[4]) and torch.isfinite(weights[-1]).all()  # and training went on
    assert "warning: non-finite loss at update 3 (epoch 1, update 3/8" in caplog.text
    assert "skipped it (--skip-nonfinite-loss)" in caplog.text
