"""The training runner shared by ``train_imagenet`` and ``train_sequence``: everything a run does that is not
specific to its task.

:func:`add_run_arguments` / :func:`parse_args` give both scripts the same run flags and timm's ``--config
args.yaml``; :class:`TrainingRun` sets up accelerate (devices, mixed precision, seeds, several processes),
picks the run folder, checks and restores a resumed checkpoint, writes ``args.yaml``, runs the update loop
(:meth:`TrainingRun.train_one_epoch`) and evaluation (:meth:`TrainingRun.evaluate`), and ends each epoch with
the files of the run folder (:meth:`TrainingRun.end_epoch`)::

    args.yaml                 the parsed arguments (``--config args.yaml`` reruns the run) and, under
                              ``run:``, what was derived from them (world size, batch sizes, lr, ...)
    summary.csv               one row per epoch (and TensorBoard events when tensorboard is installed)
    checkpoints/epoch_NNNN/   accelerate state after NNNN epochs (model, optimizer, scheduler, scaler, EMA,
                              RNG states, loop counters) and ``meta.json``, renamed into place when complete
    last.pth, model_best.pth  the model's weights in the schema of :mod:`mrconvnext.utils.checkpoint`

Used as a context manager, the run always ends with ``accelerator.end_training()`` (success or error).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from accelerate.utils.imports import is_tensorboard_available
from tqdm.auto import tqdm

from .checkpoint import checkpoint_record, save_checkpoint_file
from .evaluation import MetricSums, sample_metrics
from .files import atomic_path

__all__ = [
    "CHECKPOINT_DIR",
    "CSV_FILE",
    "META_FILE",
    "MetricsLog",
    "PreflightError",
    "TrainState",
    "TrainingRun",
    "add_run_arguments",
    "find_checkpoint",
    "parse_args",
    "run_main",
]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)$")
META_FILE = "meta.json"
CSV_FILE = "summary.csv"
ARGS_FILE = "args.yaml"

_logger = get_logger("train")


class PreflightError(ValueError):
    """A configuration or data problem detected before any training step."""


# ------------------------------------------------------------------------------------------ command line


def add_run_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    """The flags every training script has (a ``run`` group): devices, seed, logging, output and resume."""
    group = parser.add_argument_group("run")
    group.add_argument("-c", "--config", default="", help="YAML of defaults, e.g. a finished run's args.yaml")
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="default: accelerate's")
    group.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is available")
    group.add_argument("--seed", type=int, default=42, help="seed of weights, augmentation and data order")
    group.add_argument("--log-interval", type=int, default=10, help="progress bar postfix every N updates")
    group.add_argument("--output", default=output, help="base directory of experiment folders")
    group.add_argument("--experiment", default="", help="experiment folder name (default: time-model[-size])")
    group.add_argument("--resume", default="", help="checkpoint folder, or a run folder to resume its latest one")
    group.add_argument("--checkpoint-hist", type=int, default=1, help="epoch checkpoints kept")


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
        values = {k: v for k, v in values.items() if k not in ("config", "resume")}
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # given by the file
        flags = {action.dest for action in parser._actions}
        parser.set_defaults(**{k: v for k, v in values.items() if k in flags})
    args = parser.parse_args(argv)
    args.config = known.config
    return args


def run_main(train: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None, prog: str) -> int:
    """A training script's command line: ``train(argv)``; a configuration or data problem is one
    ``prog: error: ...`` line and exit status 1."""
    try:
        train(argv)
    except PreflightError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ run folder state


def find_checkpoint(path: str) -> str:
    """The checkpoint folder at ``path``, or the latest complete one of the run folder ``path``."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    root = os.path.join(path, CHECKPOINT_DIR)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            match = CHECKPOINT_PATTERN.match(name)
            if match and os.path.isfile(os.path.join(root, name, META_FILE)):
                found.append((int(match.group(1)), os.path.join(root, name)))
    if not found:
        raise PreflightError(f"--resume {path!r}: no complete checkpoint (a folder with {META_FILE}) found there")
    return max(found)[1]


@dataclass
class TrainState:
    """Loop counters saved with every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    epoch: int = 0  # epochs completed
    best_top1: float = -1.0
    best_epoch: int = -1

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


# ------------------------------------------------------------------------------------------ the run


class TrainingRun:
    """One training run: accelerator, run folder, resume, checkpoints, logs, the update and evaluation loops.

    Args:
        args: parsed arguments with the flags of :func:`add_run_arguments` and ``epochs``.
        name: the run folder's name without ``--experiment`` (a timestamp is prepended).
        resume_meta: what a resumed run must share with the run that wrote its checkpoint (JSON values,
            saved in every checkpoint's ``meta.json``); a difference is a :class:`PreflightError` naming both.
        **accelerator_kwargs: further ``Accelerator`` arguments (``gradient_accumulation_steps``, ...).
    """

    def __init__(self, args: argparse.Namespace, name: str, resume_meta: dict[str, Any], **accelerator_kwargs: Any):
        self.args = args
        self.resume_meta = _json(resume_meta)
        self.checkpoint = find_checkpoint(args.resume) if args.resume else None
        if self.checkpoint:
            with open(os.path.join(self.checkpoint, META_FILE)) as f:
                saved = json.load(f)
            for key, value in self.resume_meta.items():
                if key in saved and saved[key] != value:  # keys newer than the checkpoint are not compared
                    raise PreflightError(
                        f"--resume {self.checkpoint!r} was trained with --{key.replace('_', '-')} {saved[key]}, "
                        f"this run has {value}"
                    )
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
        # different augmentation, dropout and mixup draws per process; the sampler has its own seed (data_seed)
        set_seed(args.seed, device_specific=True)
        if self.checkpoint:
            self.run_dir = os.path.dirname(os.path.dirname(os.path.abspath(self.checkpoint)))
        else:  # chosen once (timestamp, free name) and shared with every process
            folder = self._new_run_dir(name) if self.accelerator.is_main_process else None
            self.run_dir = broadcast_object_list([folder])[0]
        self.accelerator.project_configuration.set_directories(self.run_dir)
        self.state = TrainState()
        self.metrics_log: MetricsLog | None = None

    def _new_run_dir(self, name: str) -> str:
        """Fresh run folder under ``--output`` (suffix ``-1``, ``-2`` ... if taken, as timm does)."""
        name = self.args.experiment or f"{datetime.now():%Y%m%d-%H%M%S}-{name}"
        path, index = os.path.join(self.args.output, name), 0
        while os.path.exists(path):
            index += 1
            path = os.path.join(self.args.output, f"{name}-{index}")
        return path

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # destroys the process group: gloo's threads left running at interpreter exit can abort the process
        self.accelerator.end_training()

    def log(self, message: str) -> None:
        _logger.info(message, main_process_only=True)

    # ------------------------------------------------------------------------------------ start

    def restore(self, *objects: Any) -> int:
        """Register ``objects`` (scheduler, EMA, ...) with the loop counters for checkpointing, load the resumed
        checkpoint if there is one (last: it restores the RNG states saved with it); returns the first epoch."""
        self.accelerator.register_for_checkpointing(self.state, *objects)
        if self.checkpoint:
            try:
                self.accelerator.load_state(self.checkpoint)
            except Exception as e:  # truncated or foreign files (safetensors raises its own error type)
                raise PreflightError(f"cannot load checkpoint {self.checkpoint!r}: {type(e).__name__}: {e}") from e
        if self.state.epoch >= self.args.epochs:
            raise PreflightError(
                f"--resume {self.checkpoint!r} already completed {self.state.epoch} of {self.args.epochs} epochs"
            )
        return self.state.epoch

    def write_config(self, **derived: Any) -> None:
        """``args.yaml`` (the arguments, and ``derived`` under ``run:``), the trackers' config, the log."""
        config = {**vars(self.args), "run": {**derived, "world_size": self.accelerator.num_processes}}
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
        if self.checkpoint:
            self.log(f"resumed from {self.checkpoint}: continuing at epoch {self.state.epoch + 1}")

    # ------------------------------------------------------------------------------------ loops

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
        ``on_update(num_updates)`` after it. Returns the epoch's ``train_loss`` (mean over micro-batches and
        processes), ``lr``, ``samples_s`` (all processes), ``updates_per_rank``, ``epoch_time`` and, for every
        key of ``sums``, its total over the epoch and all processes divided by the samples (``train_<key>``)."""
        accelerator = self.accelerator
        model.train()
        num_updates = epoch * updates_per_epoch
        loss_sum = torch.zeros((), device=accelerator.device)
        sums: dict[str, torch.Tensor] = {}
        micro_steps = updates = samples = 0
        start = time.perf_counter()
        progress = tqdm(
            total=updates_per_epoch,
            desc=f"epoch {epoch + 1}/{self.args.epochs}",
            disable=not accelerator.is_main_process,
            dynamic_ncols=True,
            mininterval=2.0,
            file=sys.stderr,
        )
        for batch in loader:
            with accelerator.accumulate(model):
                loss, count, batch_sums = loss_fn(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and clip_grad is not None:
                    if clip_mode == "norm":
                        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                    else:
                        accelerator.clip_grad_value_(model.parameters(), clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float()
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
            micro_steps += 1
            samples += count
            if accelerator.sync_gradients:
                updates += 1
                num_updates += 1
                if on_update is not None:
                    on_update(num_updates)
                lr_scheduler.step_update(num_updates=num_updates)
                if accelerator.is_main_process and updates % self.args.log_interval == 0:  # .item() syncs
                    rate = samples * accelerator.num_processes / (time.perf_counter() - start)
                    lr = optimizer.param_groups[0]["lr"]
                    progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3e}", samples_s=f"{rate:.0f}")
                progress.update()
        progress.close()
        elapsed = time.perf_counter() - start
        # per-rank counters gathered: a sanity check that every process took the same number of updates
        counts = accelerator.gather(torch.tensor([[updates, samples]], device=accelerator.device)).cpu()
        total = counts[:, 1].sum().item()
        metrics = {
            "train_loss": accelerator.reduce(loss_sum / max(micro_steps, 1), reduction="mean").item(),
            **{f"train_{k}": accelerator.reduce(v, reduction="sum").item() / total for k, v in sums.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "samples_s": total / elapsed,
            "epoch_time": elapsed,
        }
        return {**metrics, "updates_per_rank": counts[:, 0].tolist()}

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable,
        forward: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
        topk: tuple[int, ...] = (1, 5),
    ) -> dict[str, float]:
        """Loss and top-k accuracy of ``logits, targets = forward(batch)`` over ``loader``, each sample counted
        once across processes (``gather_for_metrics`` drops the sampler's padding); ``samples`` is the count."""
        model.eval()
        sums = MetricSums()
        for batch in loader:
            with self.accelerator.autocast():
                logits, targets = forward(batch)
            sums.update(self.accelerator.gather_for_metrics(sample_metrics(logits, targets, topk=topk)))
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
        ``metric`` improved) in the checkpoint schema with ``record``'s entries, the CSV row, the trackers, the
        accelerate checkpoint. Call on every process; returns the checkpoint folder."""
        accelerator = self.accelerator
        self.state.epoch = epoch + 1
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

    def _save_state(self, epoch: int) -> str:
        """``accelerator.save_state`` into a temporary folder, renamed to ``checkpoints/epoch_NNNN`` when complete."""
        accelerator = self.accelerator
        root = os.path.join(self.run_dir, CHECKPOINT_DIR)
        final = os.path.join(root, f"epoch_{epoch:04d}")
        tmp = os.path.join(root, f".epoch_{epoch:04d}.tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump({**self.resume_meta, "epoch": epoch}, f, indent=2)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            complete = sorted(n for n in os.listdir(root) if CHECKPOINT_PATTERN.match(n))
            for name in complete[: -self.args.checkpoint_hist]:
                shutil.rmtree(os.path.join(root, name))
        accelerator.wait_for_everyone()
        return final
