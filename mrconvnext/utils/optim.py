"""Optimizer parameter groups for models with MRConv layers (paper Appendix D.1.1).

The paper follows S4D: AdamW with a global learning rate and weight decay, and a separate,
smaller learning rate with no weight decay for the convolution-kernel parameters. Norm
parameters (the per-branch BatchNorms of MRConv included), biases, the branch weights ``alpha``
and other 1-D parameters get no weight decay, as is standard in timm.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from ..layers.mrconv import MRConv

__all__ = ["mrconv_param_groups"]


def mrconv_param_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    kernel_lr: float = 1e-3,
    kernel_weight_decay: float = 0.0,
    no_weight_decay_list: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into three AdamW groups.

    * kernel: the sub-kernel parameters of every :class:`MRConv` (train form) or its merged kernel
      (deploy form), with ``lr=kernel_lr`` and ``weight_decay=kernel_weight_decay``;
    * no decay: MRConv branch norms, ``alpha`` and bias, every parameter with ``ndim <= 1`` or a
      name ending in ``.bias``, and names matching ``no_weight_decay_list`` or ``model.no_weight_decay()``
      (fnmatch patterns, as in timm);
      ``weight_decay=0`` and the optimizer's learning rate;
    * decay: everything else, with ``weight_decay`` and the optimizer's learning rate.

    Every trainable parameter is in exactly one group; empty groups are dropped. Works for any
    model containing MRConv or MRConv2d layers (sequence models and MRConvNeXt alike)::

        optimizer = torch.optim.AdamW(mrconv_param_groups(model, 0.05, kernel_lr=1e-3), lr=0.01)
    """
    kernel_ids: set[int] = set()
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if not isinstance(module, MRConv):
            continue
        if module.deploy:
            kernel_ids.add(id(module.weight))
            no_decay_ids.add(id(module.bias))
            continue
        kernel_ids.update(id(p) for p in module.kernel.parameters())
        for name in ("norm", "alpha"):
            if hasattr(module, name):
                part = getattr(module, name)
                no_decay_ids.update(id(p) for p in (part.parameters() if isinstance(part, nn.Module) else [part]))
    skip = set(no_weight_decay_list)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())

    kernel, no_decay, decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in kernel_ids:
            kernel.append(param)
        elif (
            id(param) in no_decay_ids
            or param.ndim <= 1
            or name.endswith(".bias")
            or any(fnmatch.fnmatch(name, pattern) for pattern in skip)
        ):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": kernel, "weight_decay": kernel_weight_decay, "lr": kernel_lr},
    ]
    return [group for group in groups if group["params"]]
