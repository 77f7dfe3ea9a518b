"""train_sequence.py end to end on generated ListOps and fixture Speech Commands (tiny models, CPU)."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

import mrconvnext  # noqa: F401
from mrconvnext import train_sequence
from mrconvnext.data import create_dataset
from mrconvnext.data.listops_generator import generate_listops
from mrconvnext.utils.training import PreflightError

from .sequence_fixtures import write_speech_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_sequence.py")
TINY = ["--model-kwargs", "depth=1", "embed_dim=8", "-j", "0", "--log-interval", "1"]


def env():
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("listops")
    generate_listops(str(out), 120, 30, 50, max_depth=3, max_args=4, max_length=30, seed=1)
    return str(out)


def listops_args(data_dir, output, epochs=3, *extra):
    return [
        "--task", "listops", "--data-dir", data_dir, "--seq-len", "32", "--epochs", str(epochs), "-b", "20",
        "--output", str(output), "--experiment", "run", *TINY, *extra,
    ]  # fmt: skip


def run_script(args, timeout=600):
    result = subprocess.run(
        [sys.executable, SCRIPT, *args], env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(listops_dir, tmp_path_factory):
    """4 epochs of 6 updates, checkpointed every 4 updates (mid-epoch in epochs 1, 3 and 4)."""
    out = tmp_path_factory.mktemp("reference")
    result = run_script(listops_args(listops_dir, out, 4, "--checkpoint-every", "4"))
    return out, result.stderr


def test_kill_and_resume_continue_exactly(listops_dir, reference, tmp_path):
    reference, _ = reference
    expected = torch.load(reference / "run" / "last.pth", weights_only=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *listops_args(listops_dir, killed, 4, "--checkpoint-every", "4")],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = killed / "run" / "checkpoints" / "epoch_0001" / "meta.json"  # epoch_0000_update_000004 before it
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "run" / "results.json").exists()
    done = {name for name in os.listdir(killed / "run" / "checkpoints") if name.startswith("epoch_")}
    assert "epoch_0004" not in done

    result = run_script(
        listops_args(listops_dir, killed, 4, "--checkpoint-every", "4", "--resume", str(killed / "run"))
    )
    assert "resumed from" in result.stderr
    resumed = torch.load(killed / "run" / "last.pth", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 4
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    rows, reference_rows = read_csv(killed / "run" / "summary.csv"), read_csv(reference / "run" / "summary.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    for row, reference_row in zip(rows, reference_rows, strict=True):
        for key in ("train_loss", "train_acc", "lr", "val_loss", "val_acc"):
            assert float(row[key]) == pytest.approx(float(reference_row[key]), rel=1e-6), key
    results = json.loads((killed / "run" / "results.json").read_text())
    assert results == json.loads((reference / "run" / "results.json").read_text())

    # a finished run's args.yaml reruns it (timm's --config); flags on the command line override the file
    run_script(["--config", str(reference / "run" / "args.yaml"), "--output", str(tmp_path / "replay")])
    replayed = torch.load(tmp_path / "replay" / "run" / "last.pth", weights_only=True)
    for key, value in expected["state_dict"].items():
        assert torch.equal(replayed["state_dict"][key], value), key

    with pytest.raises(PreflightError, match="already completed 4 of 4 epochs"):  # not resumed silently
        train_sequence.train(listops_args(listops_dir, killed, 4, "--resume", str(killed / "run")))
    with pytest.raises(PreflightError, match="was trained with --epochs 4, this run has 5"):
        train_sequence.train(listops_args(listops_dir, killed, 5, "--resume", str(killed / "run")))
    with pytest.raises(PreflightError, match="was trained with --model-kwargs .*'depth': 1.*this run has .*'depth': 2"):
        resume = listops_args(listops_dir, killed, 4, "--resume", str(killed / "run"))
        train_sequence.train([*resume, "--model-kwargs", "depth=2", "embed_dim=8"])


def test_sigterm_checkpoints_mid_epoch_and_the_resumed_run_matches(listops_dir, reference, tmp_path):
    """The runner's stop signal and mid-epoch resume in train_sequence.py as in train_imagenet.py: SIGTERM once
    update 2 of epoch 2 is logged writes a checkpoint where the run stands and exits 0; the resumed run's later
    losses and final weights are the uninterrupted run's. Updates take milliseconds, so on a loaded machine the
    signal can land a few updates later, after an epoch's last update or between epochs: each is checked."""
    reference, reference_log = reference
    log = tmp_path / "stopped.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, SCRIPT, *listops_args(listops_dir, tmp_path, 4)],
            env=env(),
            cwd=ROOT,
            stdout=out,
            stderr=out,
        )
    deadline = time.time() + 300
    while "epoch 2/4 update 2/6" not in log.read_text() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = re.search(
        r"rank 0: SIGTERM: stopped (after update (\d) of|before) epoch (\d); checkpoint (\S+); exit status 0",
        log.read_text(),
    )
    assert stopped, log.read_text()[-3000:]
    epoch, updates = int(stopped.group(3)), int(stopped.group(2) or 0)
    if updates:
        assert stopped.group(4).endswith(f"epoch_{epoch - 1:04d}_update_{updates:06d}")
        position = f"epoch {epoch}, update {updates + 1}"
        first = (epoch, updates + 1) if updates < 6 else (epoch + 1, 1)  # after the epoch's last update: the next
    else:  # between epochs: the last epoch's checkpoint
        assert stopped.group(4).endswith(f"epoch_{epoch - 1:04d}")
        position, first = f"epoch {epoch}", (epoch, 1)
    assert epoch >= 2

    result = run_script(listops_args(listops_dir, tmp_path, 4, "--resume", str(tmp_path / "run")))
    assert f"continuing at {position}" in result.stderr
    losses = re.findall(r"epoch (\d)/4 update (\d)/6: loss ([\d.]+)", result.stderr)
    expected = {(e, u): loss for e, u, loss in re.findall(r"epoch (\d)/4 update (\d)/6: loss ([\d.]+)", reference_log)}
    assert losses and losses[0][:2] == tuple(map(str, first))
    assert all(loss == expected[(e, u)] for e, u, loss in losses), losses
    resumed = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["state_dict"]
    for key, value in torch.load(reference / "run" / "last.pth", weights_only=True)["state_dict"].items():
        assert torch.equal(resumed[key], value), key


def test_two_processes_with_torchrun(listops_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT]
    result = subprocess.run(
        [*command, *listops_args(listops_dir, tmp_path, 2)], env=env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    config = (run / "args.yaml").read_text()
    assert "world_size: 2" in config and "per_process_batch: 10" in config
    rows = read_csv(run / "summary.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["val_samples"] == "30" for r in rows)
    results = json.loads((run / "results.json").read_text())
    assert results["test_acc"] == results["test_acc_reparameterized"]
    # the test accuracy of the best checkpoint, recomputed here over all 50 test examples
    best = torch.load(run / "model_best.pth", weights_only=True)
    model = timm.create_model(best["arch"], **best["model_args"]).eval()
    model.load_state_dict(best["state_dict"])
    test = create_dataset("listops", listops_dir, "test", 32)
    x, lengths, targets = (torch.stack([torch.as_tensor(item[i]) for item in test]) for i in range(3))
    with torch.no_grad():
        accuracy = 100.0 * (model(x, lengths=lengths).argmax(1) == targets).double().mean().item()
    assert results["test_acc"] == pytest.approx(accuracy, abs=1e-9)


def test_a_mid_epoch_checkpoint_resumes_exactly_on_another_number_of_processes(listops_dir, tmp_path):
    """A checkpoint that 2 processes write in the middle of an epoch (SIGTERM), resumed by 1 process with the same
    global batch: the rest of the run takes exactly the samples the interrupted run had left (the epoch's
    permutation does not depend on the number of processes), so its losses are an uninterrupted one-process
    run's, and the resumed run says nothing to the contrary. The model computes each sample on its own (no
    BatchNorm, no dropout), so both process counts make the same updates up to the order of float sums; any
    other batch would move the logged loss by far more than the tolerance (consecutive updates differ by > 1e-3)."""
    exact = ["-b", "4", "--branch-norm", "scale", "--drop", "0"]
    exact += ["--model-kwargs", "depth=1", "embed_dim=8", "block_norm=layer"]  # 30 updates per epoch
    pattern = r"epoch (\d)/2 update (\d+)/30: loss ([\d.]+)"
    reference = run_script(listops_args(listops_dir, tmp_path / "one", 2, *exact)).stderr
    expected = {(int(e), int(u)): float(loss) for e, u, loss in re.findall(pattern, reference)}
    assert len(expected) == 60

    log = tmp_path / "two.log"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*torchrun, *listops_args(listops_dir, tmp_path / "two", 2, *exact)], env=env(), stdout=out, stderr=out
        )
    deadline = time.time() + 300
    while "epoch 1/2 update 3/30" not in log.read_text() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    process.wait(timeout=120)
    stops = re.findall(r"rank (\d): SIGTERM: stopped (after update (\d+) of|before) epoch (\d)", log.read_text())
    assert sorted(stop[0] for stop in stops) == ["0", "1"] and stops[0][1:] == stops[1][1:], log.read_text()[-3000:]
    epoch, updates = int(stops[0][3]), int(stops[0][2] or 0)
    position = f"epoch {epoch}, update {updates + 1}" if updates else f"epoch {epoch}"
    first = (epoch, updates + 1) if updates < 30 else (epoch + 1, 1)

    resume = listops_args(listops_dir, tmp_path / "two", 2, *exact, "--resume", str(tmp_path / "two" / "run"))
    resumed = run_script(resume).stderr
    assert f"continuing at {position}" in resumed and "warning" not in resumed, resumed[-3000:]
    losses = {(int(e), int(u)): float(loss) for e, u, loss in re.findall(pattern, resumed)}
    assert min(losses) == first and len(losses) == 60 - (30 * (first[0] - 1) + first[1] - 1)
    assert losses == pytest.approx({key: expected[key] for key in losses}, abs=2e-4)


def test_speech_zero_shot_8khz_and_scale_norm(tmp_path):
    data = write_speech_commands(tmp_path / "sc", per_word=3)
    args = ["--task", "speech", "--data-dir", data, "--epochs", "1", "-b", "35", "--output", str(tmp_path)]
    run_script([*args, "--experiment", "run", "--branch-norm", "scale", *TINY])
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"best_epoch", "val_acc", "test_acc", "test_acc_8khz", "test_acc_reparameterized"}
    assert results["test_acc"] == results["test_acc_reparameterized"]
    best = torch.load(run / "model_best.pth", weights_only=True)
    assert best["model_args"]["mrconv_kwargs"] == {"branch_norm": "scale"} and best["task"] == "speech"
    model = timm.create_model(best["arch"], **best["model_args"]).eval()
    model.load_state_dict(best["state_dict"])  # strict: the scale-norm layers
    test = create_dataset("speech", data, "test", 16000, decimate=2)
    x, targets = torch.stack([item[0] for item in test]), torch.tensor([item[2] for item in test])
    assert x.shape == (35, 8000, 1)
    with torch.no_grad():
        hits = sum((model(x[i : i + 7], rate=2).argmax(1) == targets[i : i + 7]).sum().item() for i in range(0, 35, 7))
    assert results["test_acc_8khz"] == pytest.approx(100.0 * hits / 35, abs=1e-9)


def test_preflight_errors_before_anything_is_written(listops_dir, tmp_path):
    cases = [
        (["--data-dir", str(tmp_path / "missing")], "does not exist"),
        (["--model", "mrconv_text_base"], "'mrconv_text_base' is not a listops model"),
        (["--lr", "0"], "--lr must be positive"),
        (["--seq-len", "16", "--task", "image"], "--seq-len applies to the token tasks"),
        (["-b", "500"], "120 training examples are fewer than one batch (500)"),
        (["--log-interval", "0"], "--log-interval must be positive, got 0"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be non-negative, got -1"),
        (["-j", "-1"], "--workers must be non-negative, got -1"),
        (["--drop", "1.5"], "--drop must be in [0, 1), got 1.5"),
        (["--weight-decay", "-0.1"], "--weight-decay must be non-negative, got -0.1"),
    ]
    for extra, message in cases:
        with pytest.raises(PreflightError) as info:
            train_sequence.train(listops_args(listops_dir, tmp_path / "out", 1) + extra)
        assert message in str(info.value)
        assert not (tmp_path / "out").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "basic_train.tsv").write_text("Source\tTarget\n( [MAX 1 2 ] )\t2\n")
    result = subprocess.run(  # as a user sees it: one line naming the file, no traceback
        [sys.executable, SCRIPT, *listops_args(str(broken), tmp_path / "out", 1)],
        env=env(), capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train_sequence.py: error: ListOps: missing file" in result.stderr and "basic_val.tsv" in result.stderr


def demo_lra_commands(out_dir):
    """The recipe of ``make demo-lra`` from the Makefile, as a user's make runs it."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        lines = f.read().split("\ndemo-lra:", 1)[1].splitlines()[1:]
    commands = []
    for line in lines:
        if not line.startswith("\t"):
            break
        command = line.strip().replace("$(DEMO_LRA)", str(out_dir)).split()
        commands.append([sys.executable if word == "$(PY)" else word for word in command])
    assert len(commands) == 2 and commands[1][1] == "train_sequence.py"
    return commands


def test_demo_lra_commands_run(tmp_path):
    """``make demo-lra`` with one epoch instead of twelve (the full demo: test_demo_lra_beats_majority_class)."""
    generate, train = demo_lra_commands(tmp_path)
    subprocess.run(generate, env=env(), cwd=ROOT, check=True, capture_output=True)
    result = subprocess.run([*train, "--epochs", "1"], env=env(), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p for p in (tmp_path).iterdir() if p.name != "listops-1000"]
    results = json.loads((run / "results.json").read_text())
    assert results["test_acc"] == results["test_acc_reparameterized"]


@pytest.mark.slow
def test_demo_lra_beats_majority_class(tmp_path):
    generate, train = demo_lra_commands(tmp_path)
    subprocess.run(generate, env=env(), cwd=ROOT, check=True, capture_output=True)
    result = subprocess.run(train, env=env(), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p for p in (tmp_path).iterdir() if p.name != "listops-1000"]
    results = json.loads((run / "results.json").read_text())
    targets = create_dataset("listops", str(tmp_path / "listops-1000"), "test", 128).targets
    majority = 100.0 * max(targets.count(c) for c in set(targets)) / len(targets)
    assert results["test_acc"] > 2.5 * majority and results["test_acc"] == results["test_acc_reparameterized"]


# Table 5 (base models): lr, weight decay, batch size, epochs per task; kernel lr 0.001 throughout
PAPER_RECIPES = {
    "listops": (0.003, 0.05, 50, 40),
    "text": (0.005, 0.05, 16, 32),
    "retrieval": (0.003, 0.05, 64, 20),
    "image": (0.0045, 0.05, 50, 200),
    "pathfinder": (0.005, 0.03, 64, 200),
    "pathx": (0.004, 0.03, 16, 50),
    "scifar": (0.0045, 0.05, 50, 300),
    "speech": (0.005, 0.05, 16, 40),
}


def test_readme_task_commands_resolve_the_paper_recipe_and_read_their_layout(tmp_path):
    """Each README command, its data dir replaced by a fixture in that layout: recipe, model and readers."""
    import re

    from .sequence_fixtures import write_aan, write_cifar, write_imdb, write_pathfinder

    with open(os.path.join(ROOT, "README.md")) as f:
        commands = re.findall(r"`python train_sequence\.py (--task [^`]*)`", f.read())
    fixtures = {
        "listops": lambda d: generate_listops(d, 60, 10, 10, seed=2) and d,
        "text": lambda d: os.path.join(write_imdb(d), "aclImdb"),
        "retrieval": write_aan,
        "image": lambda d: os.path.join(write_cifar(d, per_batch=12), "cifar-10-batches-py"),
        "pathfinder": lambda d: os.path.join(write_pathfinder(d), "pathfinder32"),
        "pathx": lambda d: os.path.join(write_pathfinder(d, resolution=128, images=10), "pathfinder128"),
        "speech": lambda d: write_speech_commands(d, per_word=3),
    }
    fixtures["scifar"] = fixtures["image"]
    assert sorted(command.split()[1] for command in commands) == sorted(PAPER_RECIPES)
    for command in commands:
        argv = command.split()
        task = argv[1]
        folder = tmp_path / task
        folder.mkdir()
        data_dir = fixtures[task](str(folder))
        argv[argv.index("--data-dir") + 1] = data_dir
        args = train_sequence.create_parser().parse_args(argv)
        train_sequence.resolve_recipe(args)
        assert (args.lr, args.weight_decay, args.batch_size, args.epochs) == PAPER_RECIPES[task], task
        assert args.kernel_lr == 0.001 and args.kernel_weight_decay == 0.0 and args.model == f"mrconv_{task}_base"
        splits = train_sequence.preflight(args)
        assert all(len(split) for split in splits.values()), task
        assert ("test_8khz" in splits) == (task == "speech")
        x, length, target = splits["train"][0]
        cfg = timm.models.get_pretrained_cfg(args.model)
        tokens = task in ("listops", "text", "retrieval")
        assert 0 <= target < cfg.num_classes and x.shape[-1 if tokens else 0] == math.prod(cfg.input_size[1:]), task
