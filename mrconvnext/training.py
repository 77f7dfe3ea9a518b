"""Training-run plumbing shared by ``train_imagenet.py`` and ``train_sequence.py``.

Atomic checkpoints (accelerate state written to a temporary folder, renamed into place when complete),
finding the checkpoint to resume, the loop counters saved with it, and the per-epoch ``summary.csv``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator

__all__ = [
    "CHECKPOINT_DIR",
    "CSV_FILE",
    "META_FILE",
    "MetricsLog",
    "PreflightError",
    "TrainState",
    "atomic_torch_save",
    "find_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)$")
META_FILE = "meta.json"
CSV_FILE = "summary.csv"


class PreflightError(ValueError):
    """A configuration or data problem detected before any training step."""


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


def atomic_torch_save(obj: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, run_dir: str, epoch: int, meta: dict, keep: int) -> str:
    """``accelerator.save_state`` into a temporary folder, renamed to ``checkpoints/epoch_NNNN`` when complete."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
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
            json.dump(meta, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        complete = sorted(n for n in os.listdir(root) if CHECKPOINT_PATTERN.match(n))
        for name in complete[:-keep]:
            shutil.rmtree(os.path.join(root, name))
    accelerator.wait_for_everyone()
    return final


class MetricsLog:
    """``summary.csv`` in the run folder (main process only); rows past ``start_epoch`` dropped on resume."""

    def __init__(self, path: str, start_epoch: int) -> None:
        self.path = path
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= start_epoch]
            tmp = f"{path}.tmp"
            with open(tmp, "w", newline="") as f:
                if rows:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
            os.replace(tmp, path)

    def append(self, row: dict) -> None:
        new_file = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)
