"""Evaluation helpers shared by ``validate.py`` and training: image folders and per-sample metrics.

Metrics are kept per sample (not per batch, unlike ``timm.utils.accuracy``) so that a distributed run can
gather them with ``Accelerator.gather_for_metrics``, which drops the samples a sharded loader repeats to even
out the last batch; every image is then counted exactly once, and an unreadable one not at all.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import ImageDataset, get_img_extensions

_logger = logging.getLogger(__name__)

EVAL_SPLIT_DIRS = ("val", "validation", "valid", "eval", "evaluation", "test")
UNREADABLE_TARGET = -1  # an image evaluation could not read (ImageFolderDataset): left out, counted as skipped
PADDING_TARGET = -2  # a sharded dataset's repeat that evens out the processes' shares: left out, not counted
# what PIL raises for an image it cannot decode: damaged files (OSError, some ValueErrors) and sizes over its
# decompression-bomb limit
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)
_MAX_UNREADABLE = 10  # consecutive unreadable training images before the loader gives up (timm's default)


def has_image(folder: str) -> bool:
    """Whether ``folder`` holds an image file, at any depth (stops at the first one)."""
    extensions = get_img_extensions(as_set=True)
    for _, _, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(name)[1].lower() in extensions for name in files):
            return True
    return False


def datasets_below(root: str) -> list[str]:
    """The sub-folders of ``root`` that are dataset roots themselves: a ``train/`` or ``val/`` (or other evaluation
    split) folder of theirs holds images, e.g. ``demo_output/shapes`` of ``demo_output``."""
    splits = ("train", *EVAL_SPLIT_DIRS)
    children = sorted(e.path for e in os.scandir(root) if e.is_dir())
    return [
        path
        for path in children
        if any(os.path.isdir(os.path.join(path, s)) and has_image(os.path.join(path, s)) for s in splits)
    ]


def find_image_folder(root: str, split_dirs: tuple[str, ...] = EVAL_SPLIT_DIRS) -> str:
    """The ImageFolder to evaluate: ``root`` itself, or its first existing ``split_dirs`` child (``root/val``).

    Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a bad path and ``ValueError`` when the folder
    holds no images or holds images that are not in class sub-folders (``<folder>/<class>/<image>``).
    """
    if not root:
        raise ValueError("no dataset given: pass --data-dir DIR (an ImageFolder: DIR/<class>/<image>, or DIR/val/...)")
    if not os.path.exists(root):
        raise FileNotFoundError(f"data dir {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data dir {root!r} is not a directory")
    folder = next((os.path.join(root, d) for d in split_dirs if os.path.isdir(os.path.join(root, d))), root)
    nested = datasets_below(root) if folder == root else []
    if nested:  # a folder of runs, plots and datasets: its "classes" would be their names
        raise ValueError(f"{root!r} is not an image folder but holds one: pass --data-dir {nested[0]}")
    extensions = get_img_extensions(as_set=True)

    def is_image(name: str) -> bool:
        return os.path.splitext(name)[1].lower() in extensions

    loose = sorted(f for f in os.listdir(folder) if is_image(f) and os.path.isfile(os.path.join(folder, f)))
    if loose:
        raise ValueError(
            f"{folder!r} holds images directly ({loose[0]!r}, ...); expected one sub-folder per class: "
            f"{folder}/<class>/<image>"
        )
    if not any(is_image(f) for _, _, files in os.walk(folder, followlinks=True) for f in files):
        raise ValueError(
            f"no images found under {folder!r} (extensions {', '.join(sorted(extensions))}); "
            f"expected {folder}/<class>/<image>"
        )
    return folder


def check_num_classes(class_to_idx: dict, num_classes: int, class_map: str = "") -> None:
    """Raise ``ValueError`` unless the dataset's class indices span exactly the model's ``num_classes`` outputs."""
    data_classes = max(class_to_idx.values()) + 1
    if data_classes != num_classes:
        source = f"class map {class_map!r}" if class_map else f"{len(class_to_idx)} class folders"
        raise ValueError(
            f"class count mismatch: the dataset has {data_classes} classes ({source}) but the model has "
            f"{num_classes} outputs; pass --num-classes {data_classes} for a checkpoint trained on this dataset, "
            "or --class-map to map folder names to the model's class indices"
        )


class ImageFolderDataset(ImageDataset):
    """timm's ``ImageDataset`` that names an unreadable image (a truncated or corrupt file) in a warning with its
    path. ``unreadable="mark"`` (evaluation) gives it target :data:`UNREADABLE_TARGET`, which
    :func:`sample_metrics` and :class:`MetricSums` leave out of every metric and count; ``unreadable="next"``
    (training) uses the next readable image instead, as timm does."""

    def __init__(self, *args, unreadable: str = "mark", **kwargs) -> None:
        if unreadable not in ("mark", "next"):
            raise ValueError(f"unreadable={unreadable!r}: expected 'mark' or 'next'")
        super().__init__(*args, **kwargs)
        self.unreadable = unreadable

    def _load(self, index: int) -> tuple[Image.Image, int | None]:
        file, target = self.reader[index][:2]
        try:
            img = Image.open(file)
            img = img.convert(self.input_img_mode) if self.input_img_mode else img
            img.load()
        finally:
            file.close()
        return img, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for _ in range(_MAX_UNREADABLE):
            try:
                img, target = self._load(index)
                break
            except UNREADABLE_IMAGE as e:
                path = self.filename(index, absolute=True)
                if self.unreadable == "mark":
                    _logger.warning(f"skipped unreadable image {path!r}: {e}")
                    img, target = Image.new(self.input_img_mode or "RGB", (1, 1)), UNREADABLE_TARGET
                    break
                _logger.warning(f"unreadable image {path!r} replaced by the next one: {e}")
                index = (index + 1) % len(self)
        else:
            raise RuntimeError(f"{_MAX_UNREADABLE} consecutive unreadable images, the last {path!r}")
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = UNREADABLE_TARGET
        elif target >= 0 and self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def sample_metrics(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> dict:
    """Per-sample cross-entropy (float32) and top-k hits (``k`` capped at the class count, as timm's ``accuracy``),
    ``readable``: False where the target is negative, which :class:`MetricSums` leaves out, and ``padding``: True
    for :data:`PADDING_TARGET` (a sharded dataset's repeat), which it does not count as skipped either."""
    logits = logits.float()
    readable, padding = target >= 0, target == PADDING_TARGET
    target = target.clamp_min(0)
    maxk = min(max(topk), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(target[:, None])
    metrics = {"loss": F.cross_entropy(logits, target, reduction="none")}
    for k in topk:
        metrics[f"top{k}"] = hits[:, : min(k, maxk)].any(dim=1)
    metrics["readable"], metrics["padding"] = readable, padding
    return metrics


class MetricSums:
    """Running sums of per-sample metrics; ``summary()`` gives means, in percent for top-k hits. Samples whose
    ``readable`` entry is False are left out (``count``) and, unless their ``padding`` entry is True, counted in
    ``skipped``."""

    def __init__(self) -> None:
        self.count = 0
        self.skipped = 0
        self.sums: dict[str, float] = {}

    def update(self, metrics: dict) -> None:
        counts = {len(v) for v in metrics.values()}
        if len(counts) != 1:
            raise ValueError(f"per-sample metrics of unequal lengths: { {k: len(v) for k, v in metrics.items()} }")
        size = counts.pop()
        metrics = dict(metrics)
        readable, padding = metrics.pop("readable", None), metrics.pop("padding", None)
        if readable is not None:
            readable = readable.bool()
            metrics = {k: v[readable] for k, v in metrics.items()}
            padded = int(padding.sum().item()) if padding is not None else 0
            self.skipped += size - int(readable.sum().item()) - padded
            size = int(readable.sum().item())
        self.count += size
        for name, values in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + values.double().sum().item()

    def summary(self) -> dict:
        if not self.count:
            raise ValueError("no samples were evaluated")
        return {
            name: (100.0 if name.startswith("top") else 1.0) * total / self.count for name, total in self.sums.items()
        }
