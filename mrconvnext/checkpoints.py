"""What a training checkpoint file records besides its weights (shared by ``validate.py`` and the export)."""

from __future__ import annotations

import argparse
import os
import pickle

import torch

__all__ = ["checkpoint_metadata"]


def checkpoint_metadata(path: str | os.PathLike) -> dict:
    """``num_classes`` / ``img_size`` / ``mrconv_norm`` a training run saved with its weights: top-level keys (this project's
    training script) or timm ``train.py``'s ``args`` namespace; ``{}`` for a safetensors file or a bare state
    dict. Tensors are memory-mapped, not read. Raises ``FileNotFoundError`` / ``ValueError`` naming the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        return {}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read checkpoint {path!r}: {e}") from e
    if not isinstance(checkpoint, dict):
        return {}
    saved = vars(checkpoint["args"]) if isinstance(checkpoint.get("args"), argparse.Namespace) else {}
    saved = {**saved, **checkpoint}
    meta = {k: saved[k] for k in ("num_classes", "img_size") if isinstance(saved.get(k), (int, list, tuple))}
    if isinstance(saved.get("mrconv_norm"), str):
        meta["mrconv_norm"] = saved["mrconv_norm"]
    return meta
