"""Evaluation helpers shared by ``validate.py`` and training: image-folder checks and per-sample metrics.

Metrics are kept per sample (not per batch, unlike ``timm.utils.accuracy``) so that a distributed run can
gather them with ``Accelerator.gather_for_metrics``, which drops the samples a sharded loader repeats to even
out the last batch; every image is then counted exactly once.
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


class EvalImageDataset(ImageDataset):
    """timm's ``ImageDataset`` for evaluation: an unreadable image is reported and gets target -1 (to be left
    out of every metric and count) instead of being silently replaced by the next image, as timm does."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        file, target = self.reader[index][:2]
        try:
            img = Image.open(file)
            img = img.convert(self.input_img_mode) if self.input_img_mode else img
            img.load()
        except OSError as e:
            _logger.warning(f"skipped unreadable image {self.filename(index, absolute=True)!r}: {e}")
            img, target = Image.new(self.input_img_mode or "RGB", (1, 1)), -1
        finally:
            file.close()
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif target >= 0 and self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def sample_metrics(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> dict:
    """Per-sample cross-entropy (float32) and top-k hits (``k`` capped at the class count, as timm's ``accuracy``)."""
    logits = logits.float()
    maxk = min(max(topk), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(target[:, None])
    metrics = {"loss": F.cross_entropy(logits, target, reduction="none")}
    for k in topk:
        metrics[f"top{k}"] = hits[:, : min(k, maxk)].any(dim=1)
    return metrics


class MetricSums:
    """Running sums of per-sample metrics; ``summary()`` gives means, in percent for top-k hits."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, float] = {}

    def update(self, metrics: dict) -> None:
        counts = {len(v) for v in metrics.values()}
        if len(counts) != 1:
            raise ValueError(f"per-sample metrics of unequal lengths: { {k: len(v) for k, v in metrics.items()} }")
        self.count += counts.pop()
        for name, values in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + values.double().sum().item()

    def summary(self) -> dict:
        if not self.count:
            raise ValueError("no samples were evaluated")
        return {
            name: (100.0 if name.startswith("top") else 1.0) * total / self.count for name, total in self.sums.items()
        }
