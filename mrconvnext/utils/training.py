"""The training runner shared by ``train_imagenet`` and ``train_sequence``: everything a run does that is not
specific to its task.

:func:`add_run_arguments` / :func:`parse_args` give both scripts the same run flags and timm's ``--config
args.yaml``; :class:`TrainingRun` sets up accelerate (devices, mixed precision, seeds, several processes),
picks the run folder, checks and restores a resumed checkpoint, writes ``args.yaml``, prepares model,
optimizer and loaders (:meth:`TrainingRun.prepare`), runs the update loop (:meth:`TrainingRun.train_one_epoch`)
and evaluation (:meth:`TrainingRun.evaluate`), and ends each epoch with the files of the run folder
(:meth:`TrainingRun.end_epoch`)::

    args.yaml                 the parsed arguments (``--config args.yaml`` reruns the run) and, under
                              ``run:``, what was derived from them (world size, batch sizes, lr, ...)
    summary.csv               one row per epoch (and TensorBoard events when tensorboard is installed)
    checkpoints/epoch_NNNN/   accelerate state after NNNN epochs (model, optimizer, scheduler, scaler, EMA,
                              RNG states, loop counters) and ``meta.json``, renamed into place when complete
    checkpoints/epoch_NNNN_update_UUUUUU/
                              the same after NNNN epochs and UUUUUU updates of the next one (``--checkpoint-every``,
                              or a stop signal); only the newest such checkpoint is kept
    last.pth, model_best.pth  the model's weights in the schema of :mod:`mrconvnext.utils.checkpoint`

Preemption: SIGTERM or SIGUSR1 (what clusters send before they stop a job) makes every process finish the
update in progress, write a checkpoint and exit with status 0 (:class:`RunStopped`), or give up after
``--preempt-grace`` seconds. A checkpoint is complete once its folder has its final name; ``meta.json`` lists
the size of every file in it, and ``--resume`` of a run folder resumes from the newest checkpoint that is
complete and loads, logging the ones it skipped. A non-finite loss stops the run before that update is
applied (:class:`TrainingError`, naming the update, the learning rate and the last checkpoint) or, with
``--skip-nonfinite-loss``, skips the update.

Numbers to plan with: every ``--log-interval`` updates one line with the loss, the learning rate, samples/s in
total and per process, the fraction of the time spent waiting for data, the time left in the epoch and in
the run, and the peak CUDA memory; the epoch's values go to ``summary.csv``.

Used as a context manager, the run always ends with ``accelerator.end_training()`` (success or error).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.data_loader import prepare_data_loader
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from accelerate.utils.imports import is_tensorboard_available
from timm.layers import convert_sync_batchnorm
from timm.utils import distribute_bn
from torch.utils.data import DataLoader

from .checkpoint import checkpoint_record, save_checkpoint_file
from .cli import InputError, out_of_range
from .evaluation import MetricSums, sample_metrics
from .files import atomic_path

__all__ = [
    "CHECKPOINT_DIR",
    "CSV_FILE",
    "META_FILE",
    "RUN_FLAG_RANGES",
    "STOP_SIGNALS",
    "MetricsLog",
    "PreflightError",
    "RunStopped",
    "TrainState",
    "TrainingError",
    "TrainingRun",
    "add_run_arguments",
    "checkpoint_name",
    "checkpoint_problem",
    "default_num_threads",
    "find_checkpoints",
    "parse_args",
    "resume_change",
    "run_main",
    "set_default_num_threads",
    "usable_cores",
]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)(?:_update_(\d+))?$")
META_FILE = "meta.json"
CSV_FILE = "summary.csv"
ARGS_FILE = "args.yaml"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM, Kubernetes and torchrun send before a stop
# the run flags' ranges, checked by parse_args (mrconvnext.utils.cli.out_of_range); the scripts add their own
RUN_FLAG_RANGES = dict(
    positive=["log_interval"], non_negative=["checkpoint_every", "checkpoint_hist", "preempt_grace", "workers"]
)

_logger = get_logger("train")
_END = object()


class PreflightError(InputError):
    """A configuration or data problem detected before any training step."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names where and the checkpoint to resume from."""


class RunStopped(Exception):
    """The run ended early and cleanly: stopped by a signal after writing a checkpoint, or nothing was left to
    do; ``run_main`` prints the message and exits with status 0."""


# ------------------------------------------------------------------------------------------ command line


def add_run_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    """The flags every training script has (a ``run`` group): devices, seed, logging, output, checkpoints and
    resume, preemption."""
    group = parser.add_argument_group("run")
    group.add_argument("-c", "--config", default="", help="YAML of defaults, e.g. a finished run's args.yaml")
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="default: accelerate's")
    group.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is available")
    group.add_argument("--seed", type=int, default=42, help="seed of weights, augmentation and data order")
    group.add_argument(
        "--log-interval", type=int, default=10, help="log loss, throughput, data wait and ETA every N updates"
    )
    group.add_argument("--output", default=output, help="base directory of experiment folders")
    group.add_argument("--experiment", default="", help="experiment folder name (default: time-model[-size])")
    group.add_argument("--resume", default="", help="checkpoint folder, or a run folder to resume its latest one")
    group.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume --output/--experiment if it holds a checkpoint, else start it there (for requeued jobs)",
    )
    group.add_argument("--checkpoint-hist", type=int, default=1, help="epoch checkpoints kept")
    group.add_argument(
        "--checkpoint-every", type=int, default=0, help="also checkpoint every N updates within an epoch (0: off)"
    )
    group.add_argument(
        "--preempt-grace",
        type=float,
        default=120.0,
        help="after SIGTERM/SIGUSR1: seconds to finish the update and checkpoint before giving up (exit 1)",
    )
    group.add_argument(
        "--skip-nonfinite-loss", action="store_true", help="skip updates with a NaN/inf loss instead of stopping"
    )
    group.add_argument(
        "--sync-bn",
        action="store_true",
        help="several processes: BatchNorm statistics of the global batch (SyncBatchNorm; MRConv's branch norms too)",
    )
    group.add_argument(
        "--dist-bn",
        default="reduce",
        choices=("reduce", "broadcast", ""),
        help="several processes, without --sync-bn: after each epoch and before each checkpoint the BatchNorm running "
        "statistics become the processes' average ('reduce'), rank 0's ('broadcast') or stay per process ('')",
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the values of ``--config FILE`` (YAML) as defaults, as timm's ``train.py``:
    flags on the command line override the file; keys that are no flag of ``parser`` are ignored (``run``)."""
    config_parser = argparse.ArgumentParser(add_help=False)  # the file first, as timm's train.py does
    config_parser.add_argument("-c", "--config", default="")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"--config {known.config!r}: {e}")
        if not isinstance(values, dict):
            parser.error(f"--config {known.config!r} is not a YAML mapping of flag names to values")
        values = {k: v for k, v in values.items() if k not in ("config", "resume", "auto_resume")}
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # given by the file
        flags = {action.dest for action in parser._actions}
        parser.set_defaults(**{k: v for k, v in values.items() if k in flags})
    args = parser.parse_args(argv)
    args.config = known.config
    problem = out_of_range(args, **RUN_FLAG_RANGES)
    if problem:
        raise PreflightError(problem)
    return args


def run_main(train: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None, prog: str) -> int:
    """A training script's command line: ``train(argv)``; a configuration, data or training problem is one
    ``prog: error: ...`` line and exit status 1; a run stopped cleanly (:class:`RunStopped`) exits with 0."""
    try:
        train(argv)
    except (InputError, TrainingError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except RunStopped as stopped:
        print(f"{prog}: {stopped}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ CPU threads


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_threads(cores: int, processes: int, workers: int) -> int:
    """torch threads for each of ``processes`` processes on a machine of ``cores`` cores, each with ``workers``
    data-loader workers: the cores left to a process once its workers have one each, at least 1. More threads than
    cores make OpenMP threads spin-wait on each other: one ``make demo`` epoch on a loaded 2-core machine took 114 s
    with torch's default of 2 threads next to its data worker, and 19 s with 1."""
    return max(1, cores // max(processes, 1) - workers)


def set_default_num_threads(workers: int) -> str:
    """Lower torch's thread count to :func:`default_num_threads` (processes: ``LOCAL_WORLD_SIZE``, as ``torchrun``
    and ``accelerate launch`` set it) unless ``OMP_NUM_THREADS`` is set; returns the log line saying what it chose."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    cores, processes = usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = min(torch.get_num_threads(), default_num_threads(cores, processes, workers))
    torch.set_num_threads(threads)
    return (
        f"torch threads: {threads} (OMP_NUM_THREADS unset: {cores} cores for {processes} process(es) with "
        f"{workers} data workers each; set OMP_NUM_THREADS to choose)"
    )


# ------------------------------------------------------------------------------------------ run folder state


def checkpoint_name(epoch: int, updates: int = 0) -> str:
    """``epoch_NNNN`` after ``epoch`` epochs, ``epoch_NNNN_update_UUUUUU`` after ``updates`` more updates."""
    return f"epoch_{epoch:04d}" + (f"_update_{updates:06d}" if updates else "")


def _progress(name: str) -> tuple[int, int] | None:
    """(epochs, updates into the next epoch) of a checkpoint folder name, None for other names."""
    match = CHECKPOINT_PATTERN.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def _folder_files(folder: str) -> dict[str, int]:
    """Every file under ``folder`` (relative path) and its size in bytes."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    return files


def checkpoint_problem(folder: str) -> str | None:
    """Why checkpoint ``folder`` cannot be resumed from (incomplete: no ``meta.json``, a file missing or of
    another size than ``meta.json`` records), or None."""
    try:
        with open(os.path.join(folder, META_FILE)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return f"incomplete: no {META_FILE}"
    except (OSError, ValueError) as e:
        return f"unreadable {META_FILE}: {e}"
    files = (meta.get("files") or {}) if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
        return f"unreadable {META_FILE}: expected a mapping with 'files': {{name: size in bytes}}"
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"incomplete: {name} is missing"
        if os.path.getsize(path) != size:
            return f"incomplete: {name} has {os.path.getsize(path)} of the {size} bytes written"
    return None


def find_checkpoints(path: str) -> list[str]:
    """The checkpoint folder ``path``, or the checkpoint folders of the run folder ``path``, newest first."""
    if os.path.isfile(os.path.join(path, META_FILE)) or _progress(os.path.basename(os.path.normpath(path))):
        return [path]
    root = os.path.join(path, CHECKPOINT_DIR)
    names = (
        [n for n in os.listdir(root) if _progress(n) and os.path.isdir(os.path.join(root, n))]
        if os.path.isdir(root)
        else []
    )
    return [os.path.join(root, n) for n in sorted(names, key=_progress, reverse=True)]


@dataclass
class TrainState:
    """Loop counters saved with every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    epoch: int = 0  # epochs completed
    best_top1: float = -1.0
    best_epoch: int = -1
    epoch_updates: int = 0  # updates done in epoch ``epoch`` (a mid-epoch checkpoint)
    epoch_sums: dict = field(default_factory=dict)  # their running totals over all processes (_EpochMeter)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class MetricsLog:
    """``summary.csv`` in the run folder (main process only); rows past ``start_epoch`` dropped on resume."""

    def __init__(self, path: str, start_epoch: int) -> None:
        self.path = path
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= start_epoch]
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                if rows:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)

    def append(self, row: dict) -> None:
        new_file = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def epoch_order(dataset: Any, seed: int) -> dict[str, Any] | None:
    """What the order of an epoch's samples depends on, besides the epoch and the processes' plan: the dataset's
    own ``epoch_order`` (shards: their files, seed, samples per epoch, shuffle window) or, for a map-style dataset
    (shuffled by accelerate's seedable sampler), the sampler's seed and the dataset's size; None if unknown."""
    own = getattr(dataset, "epoch_order", None)
    if own is not None:
        return dict(own)
    return {"seed": seed, "samples": len(dataset)} if isinstance(dataset, Sized) else None


def resume_change(
    saved: dict, world: int, global_batch: int, sharded: bool, order: dict[str, Any] | None = None
) -> str | None:
    """What keeps a mid-epoch resume from going on with exactly the samples the interrupted run had left, or
    None. ``saved`` is the checkpoint's ``meta.json``; this run has ``world`` processes, ``global_batch``
    samples per update, a training set that splits itself over the processes (``sharded``) or not, and the
    :func:`epoch_order` ``order``.

    The position in an epoch is a number of updates. A shuffled dataset's loader draws one permutation per
    epoch, the same for every number of processes (accelerate's seedable sampler), and update ``u`` takes
    its ``u``-th run of ``global_batch`` samples: the same global batch continues exactly. Shards are split
    over the processes: on another number of processes the dataset splits what the checkpoint's processes had
    left, which needs their batch size (``micro_batch``) too."""
    saved_world = saved.get("world_size", world)
    saved_batch = saved.get("global_batch")  # not recorded: only the number of processes is known to be the same
    if saved_batch is not None and saved_batch != global_batch:
        return f"the checkpoint's updates took {saved_batch} samples, this run's take {global_batch}"
    saved_order = saved.get("epoch_order")  # not recorded: written before checkpoints recorded it
    if order is not None and saved_order is not None and saved_order != order:
        keys = [key for key in {**saved_order, **order} if saved_order.get(key) != order.get(key)]
        return (
            f"the checkpoint's epoch order had {', '.join(f'{k} {saved_order.get(k)}' for k in keys)}, this run's "
            f"has {', '.join(f'{k} {order.get(k)}' for k in keys)}"
        )
    if saved_world != world and saved_batch is None:
        return (
            f"the checkpoint does not record its global batch, for {saved_world} processes in it, {world} in this run"
        )
    if saved_world != world and sharded and "micro_batch" not in saved:
        return (
            f"the shards are split over {saved_world} processes in the checkpoint, {world} in this run, and the "
            "checkpoint does not record their batch size"
        )
    return None


def _host_rng_states() -> tuple:
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def _set_host_rng_states(states: tuple) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.random.set_rng_state(states[2])


def _ignore_stop_signals(worker_init_fn: Callable[[int], None] | None, worker_id: int) -> None:
    """A loader worker's start: it ignores the stop signals (a cluster signals every process of a job; the main
    process checkpoints and shuts its workers down), then runs the loader's own ``worker_init_fn``."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


class _EpochMeter:
    """This process's running sums over an epoch and over the current log interval; ``carry`` holds the totals
    over all processes of the part of the epoch done before a mid-epoch checkpoint (a resumed epoch)."""

    def __init__(self, device: torch.device, carry: dict | None = None) -> None:
        self.device, self.carry = device, carry or {}
        self.loss = torch.zeros((), device=device)  # finite losses only
        self.finite = torch.zeros((), device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.samples, self.wait, self.skipped = 0, 0.0, 0
        self.start = time.perf_counter()
        self.reset_interval()

    def reset_interval(self) -> None:
        self.i_loss = torch.zeros((), device=self.device)
        self.i_finite = torch.zeros((), device=self.device)
        self.i_samples, self.i_wait, self.i_updates, self.i_start = 0, 0.0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, count: int, sums: dict[str, torch.Tensor]) -> None:
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        value = torch.where(finite, loss, torch.zeros_like(loss))
        self.loss += value
        self.i_loss += value
        self.finite += finite
        self.i_finite += finite
        for key, sum_ in sums.items():
            self.sums[key] = self.sums.get(key, 0) + sum_.detach().float()
        self.samples += count
        self.i_samples += count

    def add_wait(self, seconds: float) -> None:
        self.wait += seconds
        self.i_wait += seconds

    def totals(self, accelerator: Accelerator) -> dict:
        """Sums over all processes and the carried part (a collective: call on every process).

        The keys are those of this part and of the carried one: a resumed epoch whose checkpoint came after its
        last update runs no batch, and its sums are the carried ones (every process carries the same)."""
        carry = self.carry
        carried = carry.get("sums", {})
        keys = sorted(set(self.sums) | set(carried))
        local = [self.loss, self.finite, self.samples, self.wait, time.perf_counter() - self.start]
        local = torch.stack([torch.as_tensor(v, device=self.device, dtype=torch.float32) for v in local])
        zero = local.new_zeros(())
        extra = torch.stack([self.sums.get(k, zero) for k in keys]) if keys else local.new_zeros(0)
        summed = accelerator.reduce(torch.cat([local, extra]))
        summed, world = summed.tolist(), accelerator.num_processes
        return {
            "loss": summed[0] + carry.get("loss", 0.0),
            "finite": summed[1] + carry.get("finite", 0.0),
            "samples": summed[2] + carry.get("samples", 0.0),
            "wait": summed[3] / world + carry.get("wait", 0.0),
            "time": summed[4] / world + carry.get("time", 0.0),
            "skipped": self.skipped + carry.get("skipped", 0),
            "sums": {k: summed[5 + i] + carried.get(k, 0.0) for i, k in enumerate(keys)},
        }


def _peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


# ------------------------------------------------------------------------------------------ the run


class TrainingRun:
    """One training run: accelerator, run folder, resume, checkpoints, logs, the update and evaluation loops.

    Args:
        args: parsed arguments with the flags of :func:`add_run_arguments`, ``epochs`` and, if the script has
            data-loader workers, ``workers`` per process (for the default thread count: :func:`set_default_num_threads`).
        name: the run folder's name without ``--experiment`` (a timestamp is prepended).
        resume_meta: what a resumed run must share with the run that wrote its checkpoint (JSON values,
            saved in every checkpoint's ``meta.json``); a difference is a :class:`PreflightError` naming both.
        unit: what a sample is called in the log (``img`` for images/s).
        **accelerator_kwargs: further ``Accelerator`` arguments (``gradient_accumulation_steps``, ...).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        name: str,
        resume_meta: dict[str, Any],
        unit: str = "samples",
        **accelerator_kwargs: Any,
    ):
        self.args, self.unit = args, unit
        self.resume_meta = _json(resume_meta)
        self.skipped: list[str] = []  # checkpoints passed over on resume, with the reason
        self._choose_checkpoint()
        threads = set_default_num_threads(getattr(args, "workers", 0))
        # without a GPU (or other accelerator) accelerate only forms a multi-process CPU (gloo) group with cpu=True
        has_accelerator = (
            torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        )
        self.accelerator = Accelerator(
            cpu=args.cpu or not has_accelerator,
            mixed_precision=args.mixed_precision,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
            log_with="tensorboard" if is_tensorboard_available() else None,
            step_scheduler_with_optimizer=False,  # the timm schedulers are stepped by update / epoch here
            **accelerator_kwargs,
        )
        logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per file saved is too much
        self.log(threads)
        # different dropout and mixup draws per process; the sampler has its own seed (data_seed), augmentation one
        # per sample (mrconvnext.data.images.sample_seed)
        set_seed(args.seed, device_specific=True)
        if self.checkpoint:
            self.run_dir = os.path.dirname(os.path.dirname(os.path.abspath(self.checkpoint)))
        elif args.auto_resume:
            self.run_dir = os.path.join(args.output, args.experiment)
        else:  # chosen once (timestamp, free name) and shared with every process
            folder = self._new_run_dir(name) if self.accelerator.is_main_process else None
            self.run_dir = broadcast_object_list([folder])[0]
        self.accelerator.project_configuration.set_directories(self.run_dir)
        self.state = TrainState()
        self.metrics_log: MetricsLog | None = None
        self.last_checkpoint: str | None = None  # the newest complete checkpoint of this run
        self.averaged_modules: list[nn.Module] = []  # model EMAs given to restore(): --dist-bn covers them too
        self._resume_updates, self._resume_rng = 0, None
        self._epoch_order: dict[str, Any] | None = None  # of the training set, from train_one_epoch
        self.global_batch = 0  # samples per update over all processes, from write_config
        self._eval_seconds, self._eval_history, self._epoch_walls = 0.0, [], []
        self._epoch_start = time.perf_counter()
        self._stop_signal: int | None = None
        self._stopped_with: str | None = None  # the checkpoint written after a stop signal
        self._previous_handlers: dict = {}

    def _choose_checkpoint(self) -> None:
        """``self.checkpoint``: the newest complete checkpoint of ``--resume`` (or of the ``--auto-resume`` run
        folder), the others as fallbacks if it does not load; checks ``resume_meta`` against it."""
        args = self.args
        self.checkpoint, self._fallbacks, self._checkpoint_meta = None, [], {}
        if args.auto_resume and args.resume:
            raise PreflightError("pass --resume or --auto-resume, not both")
        if args.auto_resume and not args.experiment:
            raise PreflightError("--auto-resume needs --experiment NAME: the run folder a requeued job continues")
        source = args.resume or (os.path.join(args.output, args.experiment) if args.auto_resume else "")
        if not source:
            return
        if os.path.isfile(source):
            raise PreflightError(
                f"--resume {source!r} is a file: --resume takes a run folder or one of its checkpoints/epoch_NNNN "
                "folders (the accelerate state with the optimizer and the position); weights alone such as last.pth "
                "do not resume a run"
            )
        candidates = find_checkpoints(source)
        good = []
        for folder in candidates:
            problem = checkpoint_problem(folder)
            if problem:
                self.skipped.append(f"{folder}: {problem}")
            else:
                good.append(folder)
        if not good:
            if args.auto_resume and not candidates:
                return  # nothing to resume: the run starts in that folder
            if candidates:
                raise PreflightError(f"cannot load checkpoint {candidates[0]!r}: {'; '.join(self.skipped)}")
            raise PreflightError(f"--resume {source!r}: no checkpoint folder (checkpoints/epoch_NNNN) found there")
        self.checkpoint, self._fallbacks = good[0], good[1:]
        self._check_meta(self.checkpoint)

    def _check_meta(self, checkpoint: str) -> None:
        with open(os.path.join(checkpoint, META_FILE)) as f:
            self._checkpoint_meta = saved = json.load(f)
        for key, value in self.resume_meta.items():
            if key in saved and saved[key] != value:  # keys newer than the checkpoint are not compared
                raise PreflightError(
                    f"--resume {checkpoint!r} was trained with --{key.replace('_', '-')} {saved[key]}, "
                    f"this run has {value}"
                )

    def _new_run_dir(self, name: str) -> str:
        """Fresh run folder under ``--output`` (suffix ``-1``, ``-2`` ... if taken, as timm does)."""
        name = self.args.experiment or f"{datetime.now():%Y%m%d-%H%M%S}-{name}"
        path, index = os.path.join(self.args.output, name), 0
        while os.path.exists(path):
            index += 1
            path = os.path.join(self.args.output, f"{name}-{index}")
        return path

    def __enter__(self) -> TrainingRun:
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {s: signal.signal(s, self._on_stop_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        # destroys the process group: gloo's threads left running at interpreter exit can abort the process
        self.accelerator.end_training()

    def log(self, message: str) -> None:
        _logger.info(message, main_process_only=True)

    # ------------------------------------------------------------------------------------ start

    def restore(self, *objects: Any) -> int:
        """Register ``objects`` (scheduler, EMA, ...) with the loop counters for checkpointing, load the resumed
        checkpoint if there is one (last: it restores the RNG states saved with it), falling back to older
        complete checkpoints when it does not load on some process; returns the first epoch. The modules of
        objects that hold one (timm's ``ModelEma*``: ``.module``) get ``--dist-bn`` with the model."""
        self.accelerator.register_for_checkpointing(self.state, *objects)
        self.averaged_modules = [o.module for o in objects if isinstance(getattr(o, "module", None), nn.Module)]
        while self.checkpoint:
            error = self._load_state(self.checkpoint)
            if error is None:
                break
            self.skipped.append(f"{self.checkpoint}: {error}")
            if not self._fallbacks:
                raise PreflightError(f"cannot load checkpoint {self.checkpoint!r}: {error}")
            self.checkpoint = self._fallbacks.pop(0)
            self._check_meta(self.checkpoint)
        self.last_checkpoint = self.checkpoint
        if self.state.epoch >= self.args.epochs:
            message = f"--resume {self.checkpoint!r} already completed {self.state.epoch} of {self.args.epochs} epochs"
            if self.args.auto_resume:
                raise RunStopped(f"{message}: nothing to do")
            raise PreflightError(message)
        if self.state.epoch_updates:  # a mid-epoch checkpoint: the epoch goes on from its next batch
            self._resume_updates, self._resume_rng = self.state.epoch_updates, _host_rng_states()
        return self.state.epoch

    def _load_state(self, checkpoint: str) -> str | None:
        """Load ``checkpoint`` on every process; the error if it failed on any of them."""
        error = ""
        try:
            self.accelerator.load_state(checkpoint)
        except Exception as e:  # truncated or foreign files (safetensors raises its own error type)
            error = f"{type(e).__name__}: {e}"
        failed = self.accelerator.gather(torch.tensor([float(bool(error))], device=self.accelerator.device))
        if not failed.any():
            return None
        ranks = [i for i, f in enumerate(failed.tolist()) if f]
        return error or f"failed to load on process(es) {ranks}"

    @property
    def micro_batch(self) -> int:
        """Samples per process in one forward and backward (a loader batch): an update has
        ``gradient_accumulation_steps`` of them on every process."""
        accelerator = self.accelerator
        return self.global_batch // (accelerator.num_processes * accelerator.gradient_accumulation_steps)

    def write_config(self, global_batch: int, **derived: Any) -> None:
        """``args.yaml`` (the arguments, and ``global_batch``, the samples of one update over all processes, and
        ``derived`` under ``run:``), the trackers' config, the log."""
        self.global_batch = global_batch
        world = self.accelerator.num_processes
        config = {**vars(self.args), "run": {"global_batch": global_batch, **derived, "world_size": world}}
        config["run"].update(mixed_precision=self.accelerator.mixed_precision, run_dir=self.run_dir)
        config = _json(config)
        if self.accelerator.is_main_process:
            os.makedirs(self.run_dir, exist_ok=True)
            with atomic_path(os.path.join(self.run_dir, ARGS_FILE)) as tmp, open(tmp, "w") as f:
                yaml.safe_dump(config, f, sort_keys=False)
            self.metrics_log = MetricsLog(os.path.join(self.run_dir, CSV_FILE), self.state.epoch)
        flat = {k: str(v) for k, v in {**config, **config.pop("run")}.items()}
        self.accelerator.init_trackers(os.path.basename(self.run_dir), config=flat)
        self.log("run config:\n" + "\n".join(f"  {k}: {v}" for k, v in flat.items()))
        for skipped in self.skipped:
            self.log(f"skipped checkpoint {skipped}")
        if self.checkpoint:
            position = f"epoch {self.state.epoch + 1}"
            if self._resume_updates:
                position += f", update {self._resume_updates + 1}"
            self.log(f"resumed from {self.checkpoint}: continuing at {position}")

    def prepare(self, *objects: Any) -> Any:
        """``accelerator.prepare(*objects)`` (same order and return), with two changes for data loaders: their
        workers ignore the stop signals, and a loader whose dataset splits itself over the processes
        (``dataset.shards_over_processes``, e.g. :class:`~mrconvnext.data.images.ShardedImageDataset`) is only
        placed on the device; accelerate would have every process read all of it and keep a slice."""
        prepared: dict[int, Any] = {}
        for index, obj in enumerate(objects):
            if isinstance(obj, DataLoader):
                obj.worker_init_fn = functools.partial(_ignore_stop_signals, obj.worker_init_fn)
                if getattr(obj.dataset, "shards_over_processes", False):
                    placed = prepare_data_loader(
                        obj,
                        self.accelerator.device,
                        num_processes=1,
                        process_index=0,
                        put_on_device=True,
                        dispatch_batches=False,
                        non_blocking=self.accelerator.non_blocking,
                    )
                    placed._drop_last = True  # no remainder cut by gather_for_metrics: padding is labelled -1
                    prepared[index] = placed
        rest = [obj for index, obj in enumerate(objects) if index not in prepared]
        done = self.accelerator.prepare(*rest) if rest else ()
        done = iter(done if len(rest) > 1 else (done,))
        result = tuple(prepared[i] if i in prepared else next(done) for i in range(len(objects)))
        return result if len(result) > 1 else result[0]

    # ------------------------------------------------------------------------------------ stop signals

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:
            return
        self._stop_signal = signum
        timer = threading.Timer(self.args.preempt_grace, self._grace_expired)
        timer.daemon = True
        timer.start()

    def _grace_expired(self) -> None:
        """The watchdog of ``--preempt-grace``: exit now, 0 if the checkpoint was written, else 1."""
        done = self._stopped_with is not None
        state = f"checkpoint {self._stopped_with} written" if done else "no new checkpoint written"
        message = f"rank {self.accelerator.process_index}: --preempt-grace {self.args.preempt_grace} s over ({state})"
        os.write(2, f"{message}: exiting with status {0 if done else 1}\n".encode())
        os._exit(0 if done else 1)

    def _stop_agreed(self) -> bool:
        """Whether any process got a stop signal (a collective)."""
        flag = torch.tensor([float(self._stop_signal is not None)], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).any())

    def _stopped(self, checkpoint: str | None, where: str) -> RunStopped:
        self._stopped_with = checkpoint or ""
        name = signal.Signals(self._stop_signal).name if self._stop_signal else "a stop signal on another process"
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (nothing trained yet)"
        return RunStopped(f"rank {self.accelerator.process_index}: {name}: stopped {where}; {saved}; exit status 0")

    # ------------------------------------------------------------------------------------ BatchNorm across processes

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """``--sync-bn`` with several processes: every BatchNorm computes the statistics of the global batch (timm's
        ``convert_sync_batchnorm``, which converts MRConv's branch norms too). Call before ``accelerator.prepare``."""
        if not self.args.sync_bn or self.accelerator.num_processes == 1:
            return model
        if self.accelerator.device.type == "cpu":
            raise PreflightError(
                "--sync-bn needs GPU processes: torch's DistributedDataParallel refuses SyncBatchNorm layers on the "
                "CPU; drop it (--dist-bn reduce averages the running statistics instead)"
            )
        self.log("BatchNorm synchronised across processes (--sync-bn)")
        return convert_sync_batchnorm(model)

    def distribute_bn(self, model: nn.Module) -> None:
        """``--dist-bn``: the BatchNorm running statistics of ``model`` and :attr:`averaged_modules` (its EMA) made
        equal on every process (timm's ``distribute_bn``). Call after each training epoch, before evaluating and
        saving; :meth:`train_one_epoch` calls it before each checkpoint within an epoch."""
        if self.args.sync_bn or not self.args.dist_bn or self.accelerator.num_processes == 1:
            return
        for module in (model, *self.averaged_modules):
            distribute_bn(module, self.accelerator.num_processes, reduce=self.args.dist_bn == "reduce")

    # ------------------------------------------------------------------------------------ loops

    def _epoch_loader(self, loader: Iterable, epoch: int, skip: int, *plan: int) -> Iterable:
        """``loader`` set to ``epoch`` (sampler and dataset) and starting after its first ``skip`` batches: the
        dataset's own position when it has one, else accelerate's ``skip_first_batches`` (sampler level).
        ``plan``: the number of processes and batch size that ``skip`` counts in, if not this run's (shards)."""
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):  # accelerate sets a sharded sampler's epoch, not the dataset's
            dataset.set_epoch(epoch)
        if not skip:
            return loader
        if hasattr(dataset, "start_epoch_at"):
            dataset.start_epoch_at(epoch, skip, *plan)
            return loader
        return self.accelerator.skip_first_batches(loader, skip)

    def _timed_batches(self, loader: Iterable, meter: _EpochMeter, rng_states: tuple | None) -> Iterator:
        """The batches of ``loader``, the time spent waiting for each added to ``meter``; with ``rng_states``
        (a mid-epoch resume) the host RNG states are set to them once the first batch is there, so that the
        loader's start (its seed draw, the skipped batches) leaves the draws of the updates as in the
        interrupted run."""
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(iterator, _END)
            meter.add_wait(time.perf_counter() - start)
            if rng_states is not None:
                _set_host_rng_states(rng_states)
                rng_states = None
            if batch is _END:
                return
            yield batch

    def _agree(self, nonfinite: torch.Tensor) -> tuple[list[int], bool]:
        """Before an optimizer step, on every process: the processes whose loss was non-finite since the last
        update, and whether any process got a stop signal."""
        flags = torch.stack([nonfinite.float(), nonfinite.new_tensor(float(self._stop_signal is not None))])
        gathered = self.accelerator.gather(flags[None]).cpu()
        return [i for i, bad in enumerate(gathered[:, 0].tolist()) if bad], bool(gathered[:, 1].any())

    def train_one_epoch(
        self,
        epoch: int,
        model: nn.Module,
        loader: Iterable,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        loss_fn: Callable[[Any], tuple[torch.Tensor, int, dict[str, torch.Tensor]]],
        updates_per_epoch: int,
        clip_grad: float | None = None,
        clip_mode: str = "norm",
        on_update: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """One pass over ``loader``: ``loss, samples, sums = loss_fn(batch)`` per micro-batch, backward, clipping
        and an optimizer step per update (``accelerator.accumulate``), ``lr_scheduler.step_update`` and
        ``on_update(num_updates)`` after it; a resumed epoch continues after its checkpoint's last update.
        Returns the epoch's ``train_loss`` (mean over micro-batches and processes), ``lr``, ``samples_s`` (all
        processes) and ``samples_s_per_process``, ``data_wait`` (fraction of the time spent waiting for
        batches), ``epoch_time``, ``peak_mem_gib`` (CUDA), ``skipped_updates``, ``updates_per_rank`` and, for
        every key of ``sums``, its total over the epoch and all processes divided by the samples
        (``train_<key>``). Raises :class:`TrainingError` on a non-finite loss (unless
        ``--skip-nonfinite-loss``) and :class:`RunStopped` after the checkpoint a stop signal asks for."""
        accelerator, args = self.accelerator, self.args
        if self._stop_agreed():  # a signal during the evaluation or the checkpoint of the previous epoch
            raise self._stopped(self.last_checkpoint, f"before epoch {epoch + 1}")
        model.train()
        done = self._resume_updates if epoch == self.state.epoch else 0
        rng_states = self._resume_rng if done else None
        self._resume_updates, self._resume_rng = 0, None
        position = (done * accelerator.gradient_accumulation_steps,)  # batches of this run's processes
        dataset = getattr(loader, "dataset", None)
        self._epoch_order = epoch_order(dataset, args.seed)
        if done:  # a resumed epoch: whether it goes on with the samples the interrupted run had left
            saved, world = self._checkpoint_meta, accelerator.num_processes
            sharded = getattr(dataset, "shards_over_processes", False)
            change = resume_change(saved, world, self.global_batch, sharded, self._epoch_order)
            saved_plan = (saved.get("world_size", world), saved.get("micro_batch", self.micro_batch))
            if change:
                self.log(
                    f"warning: {change}: the rest of epoch {epoch + 1} is not exactly the samples the interrupted "
                    "run had left"
                )
            elif sharded and saved_plan != (world, self.micro_batch):
                position = (done * self.global_batch // (saved_plan[0] * saved_plan[1]), *saved_plan)
                self.log(
                    f"epoch {epoch + 1}: the shards' samples that the checkpoint's {saved_plan[0]} processes had "
                    f"left, split over {world}"
                )
        loader = self._epoch_loader(loader, epoch, *position)
        meter = _EpochMeter(accelerator.device, self.state.epoch_sums if done else None)
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        self._epoch_start = time.perf_counter()
        updates, num_updates = done, epoch * updates_per_epoch + done
        nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        for batch in self._timed_batches(loader, meter, rng_states):
            bad, stop = [], False
            with accelerator.accumulate(model):
                loss, count, batch_sums = loss_fn(batch)
                accelerator.backward(loss)
                nonfinite |= ~torch.isfinite(loss.detach())
                if accelerator.sync_gradients:
                    bad, stop = self._agree(nonfinite)
                    if bad and not args.skip_nonfinite_loss:
                        raise TrainingError(self._nonfinite_message(epoch, updates, updates_per_epoch, optimizer, bad))
                    if not bad:
                        if clip_grad is not None and clip_mode == "norm":
                            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                        elif clip_grad is not None:
                            accelerator.clip_grad_value_(model.parameters(), clip_grad)
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            meter.add(loss, count, batch_sums)
            if not accelerator.sync_gradients:
                continue
            updates += 1
            num_updates += 1
            nonfinite.zero_()
            if bad:
                meter.skipped += 1
                self.log(f"warning: {self._nonfinite_message(epoch, updates - 1, updates_per_epoch, optimizer, bad)}")
            elif on_update is not None:
                on_update(num_updates)
            lr_scheduler.step_update(num_updates=num_updates)
            meter.i_updates += 1
            if updates % args.log_interval == 0:
                self._log_interval(epoch, updates, updates_per_epoch, meter, optimizer)
            every = args.checkpoint_every and num_updates % args.checkpoint_every == 0
            if stop or (every and updates < updates_per_epoch):
                self.state.epoch_updates, self.state.epoch_sums = updates, meter.totals(accelerator)
                self.distribute_bn(model)  # every process resumes with the statistics the checkpoint holds
                saved = self._save_state(epoch, updates)
                if stop:
                    raise self._stopped(saved, f"after update {updates} of epoch {epoch + 1}")
        return self._epoch_metrics(meter, updates, optimizer)

    def _nonfinite_message(
        self, epoch: int, updates: int, updates_per_epoch: int, optimizer: torch.optim.Optimizer, ranks: list[int]
    ) -> str:
        step = epoch * updates_per_epoch + updates + 1
        checkpoint = self.last_checkpoint or "none yet (the run has written no checkpoint)"
        action = (
            "skipped it (--skip-nonfinite-loss)"
            if self.args.skip_nonfinite_loss
            else "stopped before applying it; resume from the last good checkpoint with --resume, e.g. with a "
            "lower --lr or --clip-grad, or pass --skip-nonfinite-loss to skip such updates"
        )
        return (
            f"non-finite loss at update {step} (epoch {epoch + 1}, update {updates + 1}/{updates_per_epoch}, "
            f"process(es) {ranks}), lr {optimizer.param_groups[0]['lr']:.3e}: {action}; last good checkpoint: "
            f"{checkpoint}"
        )

    def _log_interval(
        self, epoch: int, updates: int, updates_per_epoch: int, meter: _EpochMeter, optimizer: torch.optim.Optimizer
    ) -> None:
        """The numbers to plan with, every ``--log-interval`` updates (a collective: every process calls it)."""
        accelerator = self.accelerator
        elapsed = time.perf_counter() - meter.i_start
        local = [meter.i_loss, meter.i_finite, meter.i_samples, meter.i_wait, _peak_memory_gib(accelerator.device)]
        local = torch.stack([torch.as_tensor(v, device=accelerator.device, dtype=torch.float32) for v in local])
        gathered = accelerator.gather(local[None]).cpu()
        loss_sum, finite, samples, wait = gathered[:, :4].sum(0).tolist()
        peak = gathered[:, 4].max().item()
        world = accelerator.num_processes
        per_update = elapsed / max(meter.i_updates, 1)
        eta_epoch = (updates_per_epoch - updates) * per_update
        eval_per_epoch = sum(self._eval_history) / len(self._eval_history) if self._eval_history else 0.0
        remaining = self.args.epochs - epoch - 1
        eta_run = eta_epoch + eval_per_epoch + remaining * (updates_per_epoch * per_update + eval_per_epoch)
        rate = samples / elapsed
        line = (
            f"epoch {epoch + 1}/{self.args.epochs} update {updates}/{updates_per_epoch}: loss "
            f"{loss_sum / max(finite, 1):.4f}, lr {optimizer.param_groups[0]['lr']:.3e}, {rate:.1f} {self.unit}/s "
            f"({rate / world:.1f} per process), data wait {wait / world / elapsed:.0%}, ETA epoch "
            f"{_duration(eta_epoch)}, run {_duration(eta_run)}"
        )
        if accelerator.device.type == "cuda":
            line += f", peak memory {peak:.2f} GiB"
        self.log(line)
        meter.reset_interval()

    def _epoch_metrics(self, meter: _EpochMeter, updates: int, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        accelerator = self.accelerator
        totals = meter.totals(accelerator)
        # per-rank counters gathered: a sanity check that every process took the same number of updates
        local = [updates, _peak_memory_gib(accelerator.device)]
        gathered = accelerator.gather(torch.tensor([local], device=accelerator.device, dtype=torch.float32)).cpu()
        rate = totals["samples"] / totals["time"]
        metrics = {
            "train_loss": totals["loss"] / max(totals["finite"], 1),
            **{f"train_{k}": v / totals["samples"] for k, v in totals["sums"].items()},
            "lr": optimizer.param_groups[0]["lr"],
            "samples_s": rate,
            "samples_s_per_process": rate / accelerator.num_processes,
            "data_wait": totals["wait"] / totals["time"],
            "epoch_time": totals["time"],
            "peak_mem_gib": gathered[:, 1].max().item() if accelerator.device.type == "cuda" else None,
            "skipped_updates": totals["skipped"],
        }
        return {**metrics, "updates_per_rank": [int(u) for u in gathered[:, 0].tolist()]}

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable,
        forward: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
        topk: tuple[int, ...] = (1, 5),
    ) -> dict[str, float]:
        """Loss and top-k accuracy of ``logits, targets = forward(batch)`` over ``loader``, each sample counted
        once across processes (``gather_for_metrics`` drops the sampler's padding; samples with a negative target,
        the padding of a sharded dataset or an unreadable image, are left out); ``samples`` is the count."""
        model.eval()
        start = time.perf_counter()
        sums = MetricSums()
        for batch in loader:
            with self.accelerator.autocast():
                logits, targets = forward(batch)
            # a negative target is marked unreadable by sample_metrics and left out by MetricSums
            sums.update(self.accelerator.gather_for_metrics(sample_metrics(logits, targets, topk=topk)))
        self._eval_seconds += time.perf_counter() - start
        return {**sums.summary(), "samples": sums.count}

    # ------------------------------------------------------------------------------------ end of an epoch

    def end_epoch(
        self,
        epoch: int,
        row: dict[str, Any],
        model: nn.Module,
        metric: float | None,
        model_ema: nn.Module | None = None,
        data_config: dict[str, Any] | None = None,
        **record: Any,
    ) -> str:
        """After epoch ``epoch`` (0-based): best-metric bookkeeping, ``last.pth`` (and ``model_best.pth`` when
        ``metric`` improved) in the checkpoint schema with ``record``'s entries, the CSV row (with
        ``eta_run_s``, the time the remaining epochs take at this session's pace), the trackers, the accelerate
        checkpoint. Call on every process; returns the checkpoint folder."""
        accelerator = self.accelerator
        self.state.epoch, self.state.epoch_updates, self.state.epoch_sums = epoch + 1, 0, {}
        self._eval_history.append(self._eval_seconds)
        self._eval_seconds = 0.0
        self._epoch_walls.append(time.perf_counter() - self._epoch_start)
        row["eta_run_s"] = (self.args.epochs - epoch - 1) * sum(self._epoch_walls) / len(self._epoch_walls)
        improved = metric is not None and metric > self.state.best_top1
        if improved:
            self.state.best_top1, self.state.best_epoch = metric, epoch + 1
        state_dict = accelerator.get_state_dict(model)  # a collective under FSDP / DeepSpeed: every process
        if accelerator.is_main_process:
            plain = checkpoint_record(
                accelerator.unwrap_model(model),
                state_dict,
                state_dict_ema=model_ema.state_dict() if model_ema is not None else None,
                data_config=data_config,
                epoch=epoch + 1,
                metric=metric,
                **record,
            )
            save_checkpoint_file(plain, os.path.join(self.run_dir, "last.pth"))
            if improved:
                save_checkpoint_file(plain, os.path.join(self.run_dir, "model_best.pth"))
            self.metrics_log.append(row)
        accelerator.log({k: v for k, v in row.items() if k != "epoch" and isinstance(v, int | float)}, step=epoch + 1)
        return self._save_state(epoch + 1)

    def _save_state(self, epoch: int, updates: int = 0) -> str:
        """``accelerator.save_state`` into a temporary folder, renamed to ``checkpoints/<checkpoint_name>`` when
        complete (``meta.json``, written last, records every file's size); then older checkpoints are removed:
        all but the ``--checkpoint-hist`` newest epoch checkpoints and the newest checkpoint."""
        accelerator = self.accelerator
        root = os.path.join(self.run_dir, CHECKPOINT_DIR)
        name = checkpoint_name(epoch, updates)
        final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta = {**self.resume_meta, "epoch": epoch, "epoch_updates": updates}
            meta.update(world_size=accelerator.num_processes, global_batch=self.global_batch)
            meta.update(micro_batch=self.micro_batch, epoch_order=self._epoch_order, files=_folder_files(tmp))
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=2)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            self._remove_old_checkpoints(root, name)
        accelerator.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def _remove_old_checkpoints(self, root: str, newest: str) -> None:
        names = [n for n in os.listdir(root) if _progress(n)]
        epoch_ends = sorted((n for n in names if _progress(n)[1] == 0), key=_progress)
        keep = {newest, *epoch_ends[-self.args.checkpoint_hist :]} if self.args.checkpoint_hist > 0 else {newest}
        for name in os.listdir(root):
            if name not in keep and (_progress(name) or name.endswith(".tmp")):  # .tmp: a write that was killed
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
