"""Evaluation helpers shared by ``validate.py`` and training: per-sample metrics and the targets that mark
samples left out of them.

Metrics are kept per sample (not per batch, unlike ``timm.utils.accuracy``) so that a distributed run can
gather them with ``Accelerator.gather_for_metrics``, which drops the samples a sharded loader repeats to even
out the last batch; every image is then counted exactly once, and an unreadable one not at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNREADABLE_TARGET = -1  # an image evaluation could not read (ImageFolderDataset): left out, counted as skipped
PADDING_TARGET = -2  # a sharded dataset's repeat that evens out the processes' shares: left out, not counted


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
