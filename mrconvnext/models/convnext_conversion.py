"""Convert timm ConvNeXt weights into MRConvNeXt, in train or deploy form.

ConvNeXt and MRConvNeXt differ only in the blocks' depthwise convs. A ``k x k`` depthwise conv on an
``H x W`` map, flattened row-major, is a 1D convolution whose taps sit at the offsets ``s = dy * W + dx``
(``|dy|, |dx| <= k // 2``): the conv reads ``u[t + s]``, which :func:`~mrconvnext.layers.fft_conv.fft_conv`'s
bidirectional kernel holds at causal lag ``-s`` (``s <= 0``) or anti-causal index ``s - 1`` (``s > 0``).
The two agree at every position whose taps stay in their row; where ``x + dx`` leaves the row the 1D form
reads the neighbouring row instead of the zero padding (:func:`wraparound_fraction` counts those positions).
On maps narrower than ``k`` two taps can share an offset; the one that is inside the map at more positions
is kept.

Placement (MRConv paper Eq. 12, eval mode): the taps go into the shortest resolution ``h`` that can hold
them, with ``alpha_h = 1``; every other resolution keeps its fresh initialisation with ``alpha_i = 0``, so
its output is gated off but its ``alpha`` receives gradients from the first fine-tuning step. Resolution
``h``'s BatchNorm is the identity in eval mode (``gamma = sqrt(1 + eps)``, ``beta`` = the conv bias).
In train mode BatchNorm normalises by batch statistics instead, which would rescale every channel of the
converted function: :func:`calibrate_batchnorm` sets the running statistics to those of real data while
keeping each branch's eval-mode affine map, so that train-mode outputs start close to the eval-mode ones
(up to the batch-to-batch variation of the statistics).

Kernel types that can hold the taps: ``'dense'`` (free taps), ``'sparse'`` and ``'fourier_sparse'`` (the
sparse positions are set to the offsets; in ``'fourier_sparse'`` resolution ``h``'s Fourier part starts at
zero) and ``'dilated'`` only when ``kernel_size`` exceeds the largest offset (its dilation-1 resolution has
``kernel_size`` contiguous taps; the default kernel sizes are too short from stage 1 on). ``'fourier'``
cannot: a resolution holds ``ceil(l_0 / 2)`` low-frequency modes, not ``k * k`` arbitrary taps.
Neither can ``branch_norm='scale'`` (no bias), ``combine='concat'`` or causal (``bidirectional=False``) layers.

The command line tool is :mod:`mrconvnext.convert`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from timm.models.convnext import checkpoint_filter_fn as convnext_layout

from ..layers.fft_conv import fft_conv
from ..layers.mrconv import MRConv

__all__ = [
    "HOLDING_KERNEL_TYPES",
    "calibrate_batchnorm",
    "convert_convnext",
    "flattened_taps",
    "is_convnext_state_dict",
    "stage_wraparound",
    "wraparound_fraction",
]

HOLDING_KERNEL_TYPES = ("dense", "sparse", "fourier_sparse", "dilated")

_DW_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight$")
_FB_DW_KEY = re.compile(r"^stages\.\d+\.\d+\.dwconv\.weight$")


def is_convnext_state_dict(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` holds ConvNeXt depthwise convs (4-D ``conv_dw.weight``; timm or original layout)."""
    return any((_DW_KEY.match(k) or _FB_DW_KEY.match(k)) and getattr(v, "ndim", 0) == 4 for k, v in state_dict.items())


def flattened_taps(height: int, width: int, kernel_size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Where each tap of a ``kernel_size`` 2D conv goes in the bidirectional 1D kernel on the flattened map.

    Returns ``(ky, kx, direction, index)`` per placed tap: offset ``s = dy * W + dx`` at causal index
    ``-s`` (direction 0) or anti-causal index ``s - 1`` (direction 1). Taps that are inside the map at no
    position are left out; of taps sharing an offset (maps narrower than the kernel) the one inside the
    map at most positions is kept.
    """
    kh, kw = kernel_size
    best: dict[int, tuple[tuple[int, int, int, int], int, int]] = {}
    for ky in range(kh):
        for kx in range(kw):
            dy, dx = ky - kh // 2, kx - kw // 2
            count = max(0, height - abs(dy)) * max(0, width - abs(dx))
            if count == 0:
                continue
            offset = dy * width + dx
            rank = (count, -abs(dy))
            if offset not in best or rank > best[offset][1:]:
                best[offset] = ((ky, kx, 0, -offset) if offset <= 0 else (ky, kx, 1, offset - 1), *rank)
    return [entry[0] for _, entry in sorted(best.items())]


def wraparound_fraction(height: int, width: int, kernel_size: tuple[int, int] = (7, 7)) -> float:
    """Fraction of the ``height x width`` positions where the 1D form differs from the zero-padded 2D conv.

    A position is exact when the 1D kernel applies the same taps to the same inputs as the 2D conv;
    it wraps when some placed tap reads an input of the flattened map that the 2D conv reads as padding
    or with another tap (the receptive field crosses a row edge).
    """
    kh, kw = kernel_size
    length = height * width
    taps = [(ky - kh // 2, kx - kw // 2) for ky, kx, _, _ in flattened_taps(height, width, kernel_size)]
    wrapped = 0
    for y in range(height):
        for x in range(width):
            inside = {(dy, dx) for dy, dx in taps if 0 <= y + dy < height and 0 <= x + dx < width}
            needed = {
                (ky - kh // 2, kx - kw // 2)
                for ky in range(kh)
                for kx in range(kw)
                if 0 <= y + ky - kh // 2 < height and 0 <= x + kx - kw // 2 < width
            }
            reads = {(dy, dx) for dy, dx in taps if 0 <= (y + dy) * width + x + dx < length}
            wrapped += not (reads == inside == needed)
    return wrapped / length


def _stage_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """``(H, W)`` of each stage's feature map at the ``img_size`` an MRConvNeXt is planned for."""
    height, width = model.img_size
    return [(height // info["reduction"], width // info["reduction"]) for info in model.feature_info]


def _layer_geometry(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(H, W)`` of the feature map each block's MRConv2d is planned for, by module name."""
    return {
        f"stages.{stage_idx}.blocks.{block_idx}.conv_dw": size
        for stage_idx, (stage, size) in enumerate(zip(model.stages, _stage_sizes(model), strict=True))
        for block_idx in range(len(stage.blocks))
    }


def stage_wraparound(model: nn.Module) -> list[float]:
    """:func:`wraparound_fraction` of each stage of an MRConvNeXt at the ``img_size`` it is planned for."""
    return [wraparound_fraction(h, w) for h, w in _stage_sizes(model)]


def _check_layer(layer: MRConv, name: str) -> None:
    problems = []
    if not layer.bidirectional:
        problems.append("bidirectional=False (a causal kernel cannot hold the taps below and right of a pixel)")
    if not layer.deploy:
        if layer.combine != "sum":
            problems.append(f"combine={layer.combine!r} (no per-resolution alpha to gate the resolutions)")
        if layer.branch_norm != "batch":
            problems.append(f"branch_norm={layer.branch_norm!r} (no bias to hold the conv bias)")
        if layer.kernel_type not in HOLDING_KERNEL_TYPES:
            problems.append(
                f"kernel_type={layer.kernel_type!r} (band-limited: ceil(kernel_size / 2) Fourier modes per resolution "
                f"cannot hold arbitrary taps)"
            )
    if problems:
        raise ValueError(
            f"cannot convert ConvNeXt weights into {name}: " + "; ".join(problems) + ". Convertible MRConvNeXt "
            f"layers are bidirectional with combine='sum', branch_norm='batch' and kernel_type in {HOLDING_KERNEL_TYPES}, "
            f"or deploy=True."
        )


def _sparse_positions(
    positions: torch.Tensor, weights: torch.Tensor, lags: list[torch.Tensor], values: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse ``(dirs, D, l_0)`` positions/weights holding ``values[d]`` at ``lags[d]``, padded with zero-weight
    taps at a random choice of the existing positions (kept sorted, as drawn)."""
    new_positions, new_weights = [], []
    for direction, (lag, value) in enumerate(zip(lags, values, strict=True)):
        old = positions[direction]  # (D, l_0)
        taken = (old[..., None] == lag.to(old.device)).any(-1)
        order = (torch.rand(old.shape, device=old.device) + 2 * taken).argsort(-1)
        spare = old.gather(-1, order[..., : old.shape[-1] - lag.numel()])
        pos = torch.cat([lag.to(old).expand(old.shape[0], -1), spare], dim=-1)
        val = torch.cat([value.to(weights), weights.new_zeros(spare.shape)], dim=-1)
        pos, sort = pos.sort(-1)
        new_positions.append(pos)
        new_weights.append(val.gather(-1, sort))
    return torch.stack(new_positions), torch.stack(new_weights)


@torch.no_grad()
def _convert_layer(
    layer: MRConv, weight: torch.Tensor, bias: torch.Tensor, height: int, width: int, name: str
) -> dict[str, torch.Tensor]:
    """The state dict of ``layer`` (train or deploy form) computing the depthwise conv ``(weight, bias)``."""
    _check_layer(layer, name)
    taps = flattened_taps(height, width, tuple(weight.shape[-2:]))
    kernel_len = 1 + max(index for *_, index in taps)
    # (2, D, kernel_len) bidirectional 1D kernel holding the taps
    kernel = weight.new_zeros(2, layer.dim, kernel_len, dtype=torch.float64)
    for ky, kx, direction, index in taps:
        kernel[direction, :, index] = weight[:, 0, ky, kx].double()
    layer = copy.deepcopy(layer)
    if layer.deploy:
        if kernel_len > layer.deploy_kernel_len:
            raise ValueError(f"{name}: deploy kernel of length {layer.deploy_kernel_len} < {kernel_len} needed")
        layer.weight.zero_()
        layer.weight[..., :kernel_len] = kernel
        layer.bias.copy_(bias)
        return layer.state_dict()

    sub = layer.kernel
    if layer.kernel_type == "dilated":
        holders = [0] if kernel_len <= min(sub.kernel_size, sub.lengths[0]) else []
    elif layer.kernel_type == "dense":
        holders = [i for i, n in enumerate(layer.lengths) if n >= kernel_len]
    else:
        taps_per_direction = max(sum(1 for t in taps if t[2] == d) for d in (0, 1))
        fits = taps_per_direction <= sub.kernel_size
        holders = [i for i, n in enumerate(layer.lengths) if n >= kernel_len and fits]
    if not holders:
        raise ValueError(
            f"cannot convert ConvNeXt weights into {name} (kernel_type={layer.kernel_type!r}, "
            f"kernel_size={layer.kernel_size}, lengths={layer.lengths}): the {tuple(weight.shape[-2:])} taps on the "
            f"{height}x{width} map reach lag {kernel_len - 1}, and no resolution holds them; use a larger kernel_size "
            f"or kernel_type 'dense', 'sparse' or 'fourier_sparse'."
        )
    h = holders[0]
    if layer.kernel_type == "dense":
        sub.weights[h].zero_()
        sub.weights[h][..., :kernel_len] = kernel
    elif layer.kernel_type == "dilated":
        sub.weight[h].zero_()
        sub.weight[h][..., :kernel_len] = kernel
    else:
        sparse = sub.sparse if layer.kernel_type == "fourier_sparse" else sub
        lags = [torch.tensor(sorted(t[3] for t in taps if t[2] == d), dtype=torch.long) for d in (0, 1)]
        values = [kernel[d][:, lag] for d, lag in enumerate(lags)]
        positions, weights = _sparse_positions(sparse.positions[h], sparse.weight[h], lags, values)
        sparse.positions[h] = positions
        sparse.weight[h] = weights
        if layer.kernel_type == "fourier_sparse":
            sub.fourier.modes[h].zero_()  # starts at zero, trained from the first step (scale 1)
            sub.scale[:, h] = 1.0
    norm = layer.norm
    layer.alpha.zero_()
    layer.alpha[h] = 1.0
    norm.running_mean[h] = 0.0
    norm.running_var[h] = 1.0
    norm.weight[h] = (1.0 + norm.eps) ** 0.5
    norm.bias[h] = bias
    return layer.state_dict()


def _check_depthwise(state_dict: dict[str, torch.Tensor], model: nn.Module, variant: str) -> None:
    """Clear errors for a checkpoint that is not a ConvNeXt, or a ConvNeXt of another size."""
    if not is_convnext_state_dict(state_dict):
        raise ValueError(
            f"not a timm ConvNeXt checkpoint: no 4-D stages.N.blocks.M.conv_dw.weight among its {len(state_dict)} "
            f"tensors (first keys: {list(state_dict)[:4]})"
        )
    have = {k[: -len(".weight")]: tuple(v.shape) for k, v in state_dict.items() if _DW_KEY.match(k)}
    want = {name: (layer.dim, 1) for name, layer in model.named_modules() if isinstance(layer, MRConv)}
    problems = [
        f"{k}: checkpoint {shape[:2]}, model {want.get(k, 'has no such layer')}"
        for k, shape in have.items()
        if shape[:2] != want.get(k)
    ]
    problems += [f"{k}: missing" for k in want if k not in have]
    if problems:
        depths = [sum(1 for k in have if k.startswith(f"stages.{i}.")) for i in range(len(model.stages))]
        channels = [have.get(f"stages.{i}.blocks.0.conv_dw", (0,))[0] for i in range(len(model.stages))]
        raise ValueError(
            f"the ConvNeXt checkpoint (depths {depths}, widths {channels}) does not match {variant} (depths "
            f"{[len(s.blocks) for s in model.stages]}, widths {[s.blocks[0].conv_dw.dim for s in model.stages]}): "
            + "; ".join(problems[:4])
            + (f"; ... ({len(problems) - 4} more)" if len(problems) > 4 else "")
        )


def convert_convnext(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A ConvNeXt state dict (timm or original layout, already unwrapped) as ``model``'s state dict.

    Every tensor outside the depthwise convs is passed on unchanged; each block's ``conv_dw`` weight and
    bias become the train-form (or, for ``deploy=True`` models, deploy-form) MRConv2d weights described in
    the module docstring, for the map size ``model.img_size`` plans each stage for.
    """
    variant = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    if any(_FB_DW_KEY.match(k) for k in state_dict):
        state_dict = convnext_layout(state_dict, model)  # original FB layout -> timm's
    _check_depthwise(state_dict, model, variant)
    geometry = _layer_geometry(model)
    out = {}
    for key, value in state_dict.items():
        match = _DW_KEY.match(key)
        if key.endswith(".conv_dw.bias") or (match and int(match[2]) >= len(model.stages[int(match[1])].blocks)):
            continue
        if not match:
            out[key] = value
            continue
        name = key[: -len(".weight")]
        layer = model.get_submodule(name)
        bias = state_dict.get(name + ".bias", torch.zeros(value.shape[0]))
        converted = _convert_layer(layer, value, bias, *geometry[name], name=name)
        out.update({f"{name}.{k}": v for k, v in converted.items()})
    return out


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[Any]) -> int:
    """Set the running statistics of every train-form MRConv's BatchNorms to those of its branch outputs on
    ``batches`` (images, or ``(images, targets)`` pairs), keeping each branch's eval-mode affine map.

    Eval-mode outputs do not change (``gamma`` and ``beta`` absorb the new statistics, Eq. 18), so one pass
    sees every layer's exact inputs; afterwards train-mode batch statistics vary around the running ones and
    the first fine-tuning steps compute close to the converted function. Returns the number of images seen.
    """
    layers = [m for m in model.modules() if isinstance(m, MRConv) and not m.deploy and hasattr(m, "norm")]
    sums: dict[MRConv, list[torch.Tensor]] = {}

    def collect(layer: MRConv, args: tuple[torch.Tensor, ...]) -> None:
        u = args[0].flatten(2).double()
        kernels = [k.double() for k in layer.kernel()]
        branches = torch.stack([fft_conv(u, k if layer.bidirectional else k[0], layer.bidirectional) for k in kernels])
        stats = [branches.sum((1, 3)), branches.square().sum((1, 3)), u.shape[0] * u.shape[-1]]
        sums[layer] = [a + b for a, b in zip(sums[layer], stats, strict=True)] if layer in sums else stats

    was_training = model.training
    hooks = [layer.register_forward_pre_hook(collect) for layer in layers]
    images = 0
    try:
        model.eval()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            images += x.shape[0]
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if images == 0:
        raise ValueError("calibrate_batchnorm got no batches")
    for layer, (total, squares, count) in sums.items():
        norm = layer.norm
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0) * (count / max(count - 1, 1))  # unbiased, as BatchNorm
        scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
        shift = norm.bias.double() - norm.running_mean.double() * scale
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.weight.copy_(scale * torch.sqrt(var + norm.eps))
        norm.bias.copy_(shift + mean * scale)
    return images
