"""Training on a preemptible cluster, with real processes and real signals (mrconvnext.utils.training):

- SIGTERM to every process of a 2-process ``torchrun`` run (the ranks and their loader workers, as SLURM and
  Kubernetes do) on webdataset shards: each rank finishes its update, writes one checkpoint and exits 0; the
  resumed run continues with the next batch, on two nodes or on one process that reads what the two had left;
- ``examples/slurm/train_imagenet.sbatch`` run as SLURM would on parquet files, with a stand-in ``srun`` and
  ``scontrol`` (tasks started with SLURM's task ids, signals passed on): SIGUSR1 to the batch script makes the
  tasks checkpoint and exit 0 and requeues the job; the requeued job continues the run to its end;
- the grace period: a process that cannot finish in ``--preempt-grace`` seconds exits with status 1;
- ``--resume`` of a run folder whose newest checkpoint is incomplete or corrupt resumes from the newest good one
  and names the ones it skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mrconvnext import train_imagenet
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.utils.training import checkpoint_problem, resume_change
from tests.image_formats import write_formats
from tests.processes import descendants, free_port

ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPT = ROOT / "examples" / "slurm" / "train_imagenet.sbatch"
SMALL_ARGS = [
    "--model", "mrconvnext_atto", "--num-classes", "2", "--img-size", "32", "-b", "4", "--epochs", "2",
    "--lr", "2e-3", "--warmup-epochs", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
    "--smoothing", "0", "--no-model-ema", "--crop-pct", "1.0", "--log-interval", "1", "--mixed-precision", "no",
    "--val-split", "validation",
]  # fmt: skip
STOPPED = re.compile(r"rank (\d): (SIG\w+): stopped (.*?); checkpoint (\S+); exit status 0")
# srun on one machine: $SLURM_NTASKS copies of the command with SLURM's task ids, signals passed on to them
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while true; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
    if [ "$rc" -ne 0 ]; then status=$rc; fi
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
    show) echo localhost ;;
    requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
esac
"""


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Path]:
    # 2 classes, 32 train images: 4 updates per epoch at 2 processes x 4; 10 validation images
    shapes = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 16, 5, size=32, classes=("circle", "square"))
    return write_formats(shapes, tmp_path_factory.mktemp("formats"))


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, f"the run ended before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in time"
        time.sleep(0.05)


def _stopped(log: str) -> dict[int, tuple[str, str, str]]:
    """``rank: (signal, where, checkpoint)`` of the ranks' stop lines."""
    return {int(m.group(1)): m.groups()[1:] for m in STOPPED.finditer(log)}


def _torchrun(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*cmd, str(ROOT / "train_imagenet.py"), *args], cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT
        )


def test_sigterm_to_every_process_checkpoints_and_the_run_resumes_on_two_nodes(formats, tmp_path) -> None:
    args = [*SMALL_ARGS, "--dataset", "wds", "--data-dir", str(formats["wds"]), "--workers", "1"]
    args += ["--output", str(tmp_path), "--experiment", "run", "--preempt-grace", "60"]
    log = tmp_path / "stopped.log"
    proc = _torchrun(args, log)
    _wait_for(log, "epoch 1/2 update 1/4", proc)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun, both ranks and their loader workers
        os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=120)
    text = log.read_text()
    stopped = _stopped(text)
    assert sorted(stopped) == [0, 1], text[-3000:]
    assert stopped[0] == stopped[1] and stopped[0][0] == "SIGTERM", stopped  # one checkpoint, written together
    checkpoint = Path(stopped[0][2])
    assert checkpoint.parent == tmp_path / "run" / "checkpoints" and (checkpoint / "meta.json").is_file()
    assert "exited unexpectedly" not in text and "ChildFailedError" not in text  # the loader workers lived on
    updates = int(re.fullmatch(r"epoch_0000_update_(\d+)", checkpoint.name).group(1))

    # a copy resumed by one process of batch 8 (the same global batch): it reads what the two had left
    shutil.copytree(tmp_path / "run", tmp_path / "single")
    single_args = [*args, "-b", "8", "--resume", str(tmp_path / "single")]
    with open(tmp_path / "single.log", "w") as out:
        cmd = [sys.executable, str(ROOT / "train_imagenet.py"), *single_args]
        single = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)

    # resumed as two nodes of one process each that meet at a c10d rendezvous (the README's several-nodes
    # command): the epoch goes on with the next update, both epochs end complete
    endpoint, nodes = f"localhost:{free_port()}", []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, str(ROOT / "train_imagenet.py")]
        with open(tmp_path / f"node{node}.log", "w") as out:
            nodes.append(
                subprocess.Popen(
                    [*cmd, *args, "--resume", str(tmp_path / "run")], cwd=ROOT, env=_env(), stdout=out, stderr=out
                )
            )
    codes = [node.wait(timeout=300) for node in nodes]
    text = "".join((tmp_path / f"node{node}.log").read_text() for node in range(2))
    assert codes == [0, 0], text[-4000:]
    assert f"resumed from {checkpoint}: continuing at epoch 1, update {updates + 1}" in text
    assert f"epoch 1/2 update {updates}/" not in text  # no update done twice
    assert text.count("updates/rank [4, 4]") == 2 and (tmp_path / "run" / "checkpoints" / "epoch_0002").is_dir()

    assert single.wait(timeout=300) == 0, (tmp_path / "single.log").read_text()[-4000:]
    text = (tmp_path / "single.log").read_text()
    assert "epoch 1: the shards' samples that the checkpoint's 2 processes had left, split over 1" in text
    assert "warning" not in text and f"epoch 1/2 update {updates}/" not in text
    assert text.count("updates/rank [4]") == 2 and (tmp_path / "single" / "checkpoints" / "epoch_0002").is_dir()


def test_accelerate_launch_on_two_machines(formats, tmp_path) -> None:
    """The README's several-nodes path with accelerate: on each of two "machines" (one process each, both on this
    host) the config file that ``accelerate config`` saves for a multi-GPU cluster of two machines, then
    ``accelerate launch --config_file ... train_imagenet.py``. Without a GPU the script joins the two as gloo CPU
    ranks; the epoch is split over both and rank 0 writes the checkpoint."""
    from accelerate.commands.config.config_args import ClusterConfig

    args = [*SMALL_ARGS, "--epochs", "1", "--dataset", "wds", "--data-dir", str(formats["wds"]), "--workers", "0"]
    args += ["--output", str(tmp_path), "--experiment", "run"]
    port, machines = free_port(), []
    for rank in range(2):
        config = ClusterConfig(
            compute_environment="LOCAL_MACHINE", distributed_type="MULTI_GPU", mixed_precision="no", use_cpu=False,
            debug=False, num_processes=2, num_machines=2, machine_rank=rank, main_process_ip="127.0.0.1",
            main_process_port=port, rdzv_backend="static", same_network=True, gpu_ids="all",
        )  # fmt: skip
        config.to_yaml_file(tmp_path / f"machine{rank}.yaml")
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(tmp_path / f"machine{rank}.yaml"),
        ]
        with open(tmp_path / f"machine{rank}.log", "w") as out:
            machines.append(
                subprocess.Popen(
                    [*cmd, str(ROOT / "train_imagenet.py"), *args], cwd=ROOT, env=_env(), stdout=out, stderr=out
                )
            )
    codes = [machine.wait(timeout=300) for machine in machines]
    text = "".join((tmp_path / f"machine{rank}.log").read_text() for rank in range(2))
    assert codes == [0, 0], text[-4000:]
    assert "updates/rank [4, 4]" in text and "[RANK 1]" not in text  # both ranks trained; rank 0 logs
    meta = json.loads((tmp_path / "run" / "checkpoints" / "epoch_0001" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["micro_batch"] == 4


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_checkpoints_on_sigusr1_requeues_and_continues(formats, tmp_path) -> None:
    assert subprocess.run(["bash", "-n", str(SLURM_SCRIPT)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    env = _env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable, SCONTROL_LOG=str(tmp_path / "sc"),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="tiny", SLURM_JOB_NODELIST="node001", SLURM_NTASKS="2",
        DATA=str(formats["parquet"]), OUTPUT=str(tmp_path / "out"), MASTER_PORT=str(free_port()),
    )  # fmt: skip
    extra = [*SMALL_ARGS, "--dataset", "parquet", "--workers", "1"]  # after the script's own flags: they win
    run_dir = tmp_path / "out" / "tiny-4242"

    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", str(SLURM_SCRIPT), *extra], cwd=ROOT, env=env, stdout=out, stderr=out)
    _wait_for(log, "epoch 1/2 update 1/4", job)
    job.send_signal(signal.SIGUSR1)  # --signal=B:USR1@300: to the batch script only
    assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = _stopped(log.read_text())
    assert sorted(stopped) == [0, 1] and stopped[0] == stopped[1] and stopped[0][0] == "SIGUSR1", log.read_text()
    assert (tmp_path / "sc").read_text() == "requeue 4242\n"
    assert Path(stopped[0][2]).parent == run_dir / "checkpoints"

    # the requeued job: the same script and job id continue the run to its end
    log = tmp_path / "requeued.log"
    with open(log, "w") as out:
        assert (
            subprocess.run(["bash", str(SLURM_SCRIPT), *extra], cwd=ROOT, env=env, stdout=out, stderr=out).returncode
            == 0
        )
    text = log.read_text()
    assert f"resumed from {stopped[0][2]}" in text, text[-3000:]
    assert text.count("updates/rank [4, 4]") == 2 - (stopped[0][2].endswith("epoch_0001")), text[-3000:]
    assert (run_dir / "checkpoints" / "epoch_0002").is_dir() and (tmp_path / "sc").read_text() == "requeue 4242\n"


def test_a_process_that_cannot_stop_in_its_grace_period_exits_1(tmp_path) -> None:
    code = f"""
import os, signal, sys, time
from mrconvnext import train_imagenet
from mrconvnext.utils.training import TrainingRun
args = train_imagenet.create_parser().parse_args(["--data-dir", ".", "--output", {str(tmp_path)!r}, "--preempt-grace", "0.5"])
with TrainingRun(args, "stuck", {{}}):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # an update that never ends
"""
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "rank 0: --preempt-grace 0.5 s over (no new checkpoint written): exiting with status 1" in result.stderr


# ---------------------------------------------------------------------------- resume past broken checkpoints


@pytest.fixture
def two_checkpoints(formats, tmp_path, fresh_accelerate_state) -> tuple[list[str], Path]:
    args = [*SMALL_ARGS, "--dataset", "wds", "--data-dir", str(formats["wds"]), "--workers", "0"]
    args += ["--output", str(tmp_path), "--experiment", "run", "--checkpoint-hist", "2"]
    train_imagenet.train(args)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0001", "epoch_0002"]
    return [*args, "--epochs", "3", "--resume", str(tmp_path / "run")], checkpoints


def _resume_log(args: list[str], caplog) -> str:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with caplog.at_level("INFO"):
        train_imagenet.train(args)
    return caplog.text


def test_resume_skips_an_incomplete_newest_checkpoint(two_checkpoints, caplog) -> None:
    args, checkpoints = two_checkpoints
    optimizer = checkpoints / "epoch_0002" / "optimizer.bin"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])  # a write cut short
    (checkpoints / ".epoch_0002_update_000003.tmp").mkdir()  # a write that was killed before its rename
    text = _resume_log(args, caplog)
    skipped = (
        f"skipped checkpoint {checkpoints / 'epoch_0002'}: incomplete: optimizer.bin has {size // 2} of the {size}"
    )
    assert skipped in text
    assert f"resumed from {checkpoints / 'epoch_0001'}: continuing at epoch 2" in text
    assert (checkpoints / "epoch_0003").is_dir() and not (checkpoints / ".epoch_0002_update_000003.tmp").exists()


def test_auto_resume_of_a_complete_run_has_nothing_to_do(two_checkpoints, capsys) -> None:
    from accelerate.state import AcceleratorState

    args, checkpoints = two_checkpoints
    AcceleratorState._reset_state(reset_partial_state=True)
    resume = args.index("--resume")
    assert train_imagenet.main([*args[:resume], "--epochs", "2", "--auto-resume"]) == 0
    message = f"--resume {str(checkpoints / 'epoch_0002')!r} already completed 2 of 2 epochs: nothing to do"
    assert message in capsys.readouterr().err


def test_resume_skips_a_corrupt_newest_checkpoint(two_checkpoints, caplog) -> None:
    args, checkpoints = two_checkpoints
    weights = checkpoints / "epoch_0002" / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # every file of its size, but unreadable
    text = _resume_log(args, caplog)
    assert f"skipped checkpoint {checkpoints / 'epoch_0002'}: SafetensorError" in text
    assert f"resumed from {checkpoints / 'epoch_0001'}: continuing at epoch 2" in text


def test_an_epoch_stopped_after_its_last_update_resumes_with_its_sums(fresh_accelerate_state) -> None:
    """A stop signal that lands on an epoch's last update checkpoints before the epoch's evaluation; the resumed
    epoch then runs no batch and its metrics (``train_acc`` ...) come from the checkpoint's sums alone. Seen as
    ``KeyError: 'train_acc'`` when ``train_sequence.py`` resumed such a checkpoint on a loaded machine."""
    from accelerate import Accelerator

    from mrconvnext.utils.training import _EpochMeter

    accelerator = Accelerator(cpu=True)
    carry = {"loss": 3.0, "finite": 6.0, "samples": 120.0, "wait": 0.5, "time": 2.0, "skipped": 0,
             "sums": {"acc": 4200.0}}  # fmt: skip
    totals = _EpochMeter(accelerator.device, carry).totals(accelerator)
    assert totals["sums"] == {"acc": 4200.0} and totals["samples"] == 120.0 and totals["loss"] == 3.0


def test_resume_change_names_what_moves_the_position_in_the_epoch() -> None:
    """When a mid-epoch resume continues with the samples left (``tests/test_train_sequence.py`` runs one on
    another number of processes), and what else it names in its warning."""
    saved = {"world_size": 2, "global_batch": 8, "micro_batch": 4}
    assert resume_change(saved, 1, 8, sharded=False) is None  # a shuffled dataset: the same global batch suffices
    assert resume_change(saved, 1, 8, sharded=True) is None  # shards: what the 2 processes had left, split again
    assert resume_change(saved, 2, 4, sharded=False) == "the checkpoint's updates took 8 samples, this run's take 4"
    unsplit = {"world_size": 2, "global_batch": 8}  # written before checkpoints recorded the batch per process
    assert resume_change(unsplit, 2, 8, sharded=True) is None
    assert resume_change(unsplit, 1, 8, sharded=True) == (
        "the shards are split over 2 processes in the checkpoint, 1 in this run, and the checkpoint does not "
        "record their batch size"
    )
    old = {"world_size": 2}  # written before checkpoints recorded their global batch
    assert resume_change(old, 2, 8, sharded=False) is None
    assert "does not record its global batch" in resume_change(old, 4, 8, sharded=False)
    order = {"seed": 42, "samples": 32, "shuffle_window": 100, "shards": "3f2a"}
    ordered = {**saved, "epoch_order": order}
    assert resume_change(ordered, 1, 8, sharded=True, order=order) is None
    assert resume_change(saved, 1, 8, sharded=True, order=order) is None  # not recorded: nothing to compare
    assert resume_change(ordered, 2, 8, sharded=True, order={**order, "seed": 7, "shuffle_window": 50}) == (
        "the checkpoint's epoch order had seed 42, shuffle_window 100, this run's has seed 7, shuffle_window 50"
    )


def test_a_meta_json_that_is_no_record_makes_its_checkpoint_unreadable(tmp_path) -> None:
    """A ``meta.json`` of another shape (a list, file sizes that are no numbers) is a reason to skip the checkpoint,
    as a truncated one is, not an AttributeError or TypeError while the run looks for one to resume."""
    for text in ("[1, 2]", '{"files": 3}', '{"files": {"model.safetensors": "big"}}'):
        (tmp_path / "meta.json").write_text(text)
        assert checkpoint_problem(str(tmp_path)).startswith("unreadable meta.json: expected"), text
