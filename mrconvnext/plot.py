"""Pictures of a trained MRConv model: resolution weights per layer (paper Figure 3, right), merged kernels per
stage (Figure 5) and their magnitude spectra.

    python -m mrconvnext.plot --model mrconvnext_atto --checkpoint model_best.pth --out plots/

or, on a model in memory, ``plot_model(model, "plots/")``. Writes PNGs of 1000 x 800 pixels:

* ``alpha.png`` (train form only): for every MRConv layer (depth) and resolution ``i``, the share of resolution
  ``i`` in the layer's merged kernel, ``||alpha_i gamma_i / sigma_i k_i||`` with the BatchNorm folded in (Eqs. 13,
  18; ``alpha_i / z_i k_i`` for ``branch_norm='scale'``, Eq. 9), averaged over channels and normalised per layer: what
  each resolution contributes, where alpha alone would ignore the BatchNorm scales and the sub-kernels' norms.
  A deploy-form model has one kernel per layer and no resolutions left to show.
* ``kernels_1d.png``: the merged kernel (Eq. 13) of one layer per stage (MRConvNeXt: each stage's last block;
  sequence models: up to four layers spread over depth) for a few channels drawn with a fixed seed, over its lags:
  anti-causal half at negative lags, causal half at lags >= 0.
* ``kernels_2d.png`` (MRConvNeXt): the same kernels folded back onto the ``H x W`` feature map they convolve
  (row-major lags): the weight the centre pixel's output gives each input pixel.
* ``spectra.png``: magnitude of the merged kernel's frequency response (causal and anti-causal halves together).

Only the layers' public API is used: ``merged_kernel()``, ``alpha``, ``lengths``, ``bidirectional``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .layers.mrconv import MRConv
from .models.mrconvnext import MRConvNeXt
from .utils.checkpoint import CheckpointError, add_checkpoint_arguments, create_model_from_checkpoint, is_mrconv_model
from .utils.cli import HelpFormatter, out_of_range
from .utils.files import atomic_path

__all__ = ["PLOT_KINDS", "create_parser", "feature_map_kernel", "main", "plot_model", "resolution_shares"]

PLOT_KINDS = ("alpha", "kernels_1d", "kernels_2d", "spectra")
FIGSIZE, DPI = (10, 8), 100  # every PNG is 1000 x 800 pixels


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "mrconvnext.plot needs matplotlib: pip install matplotlib (or, in a clone of mrconvnext, pip install '.[plot]')"
        ) from e
    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def _mrconv_layers(model: nn.Module) -> list[tuple[str, MRConv]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MRConv)]


def _is_deploy(model: nn.Module) -> bool:
    return all(layer.deploy for _, layer in _mrconv_layers(model))


@torch.no_grad()
def resolution_shares(layer: MRConv) -> torch.Tensor:
    """``(N,)`` share of each resolution in the merged kernel: ``||c_i k_i||`` per channel (``c_i`` = alpha with
    the BatchNorm folded in), mean over channels, divided by its sum over resolutions. Train form only."""
    if layer.deploy or not hasattr(layer, "alpha"):
        raise ValueError(f"{layer!r} has no per-resolution weights alpha (deploy form or combine='concat')")
    single = copy.deepcopy(layer)
    norms = []
    for i in range(layer.num_resolutions):
        mask = torch.zeros_like(layer.alpha)
        mask[i] = 1
        single.alpha.copy_(layer.alpha * mask)  # only resolution i: merged_kernel() is its folded sub-kernel
        kernel = single.merged_kernel()[0].double()
        kernel = kernel if layer.bidirectional else kernel[None]
        norms.append(kernel.square().sum(dim=(0, 2)).sqrt().mean())
    norms = torch.stack(norms)
    return norms / norms.sum().clamp_min(1e-30)


def _kernel_layers(model: nn.Module) -> list[tuple[str, MRConv, tuple[int, int] | None]]:
    """``(title, layer, (H, W) or None)`` of the layers whose kernels are drawn: one per stage."""
    if isinstance(model, MRConvNeXt):
        height, width = model.img_size
        layers = []
        for index, (stage, info) in enumerate(zip(model.stages, model.feature_info, strict=True)):
            hw = (height // info["reduction"], width // info["reduction"])
            block = len(stage.blocks) - 1
            layers.append(
                (f"stage {index} (stages.{index}.blocks.{block}, {hw[0]}x{hw[1]})", stage.blocks[-1].conv_dw, hw)
            )
        return layers
    named = _mrconv_layers(model)
    picks = sorted({round(i * (len(named) - 1) / 3) for i in range(4)}) if len(named) > 4 else range(len(named))
    return [(f"layer {i} ({named[i][0]})", named[i][1], None) for i in picks]


def _channels(dim: int, count: int, seed: int) -> list[int]:
    """``count`` channels of ``dim``, drawn with ``seed`` (the same for every layer width and every run)."""
    return sorted(torch.randperm(dim, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def _lag_kernel(layer: MRConv) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged kernel over its lags: ``(lags, (D, len(lags)))``; anti-causal taps at lags ``-K .. -1``."""
    kernel = layer.merged_kernel()[0].detach().double().cpu()
    if not layer.bidirectional:
        return torch.arange(kernel.shape[-1]), kernel
    causal, anti = kernel[0], kernel[1]
    lags = torch.arange(-anti.shape[-1], causal.shape[-1])
    return lags, torch.cat([anti.flip(-1), causal], dim=-1)


def feature_map_kernel(layer: MRConv, height: int, width: int) -> torch.Tensor:
    """``(D, H, W)``: the weight the centre pixel's output (row ``H // 2``, column ``W // 2``) gives each input
    pixel of an ``H x W`` map, i.e. the merged kernel at lag ``t_centre - t`` of the row-major index ``t``."""
    lags, kernel = _lag_kernel(layer)
    centre = (height // 2) * width + width // 2
    index = centre - torch.arange(height * width) - lags[0]  # lag of each input pixel, as an index into lags
    valid = (index >= 0) & (index < len(lags))
    maps = kernel.new_zeros(layer.dim, height * width)
    maps[:, valid] = kernel[:, index[valid]]
    return maps.view(layer.dim, height, width)


def _plot_alpha(model: nn.Module, title: str):
    layers = [(name, layer) for name, layer in _mrconv_layers(model) if hasattr(layer, "alpha")]
    if not layers:
        raise ValueError(f"{title}: no MRConv layer has per-resolution weights alpha (combine='concat' layers only)")
    width = max(layer.num_resolutions for _, layer in layers)
    shares = torch.full((len(layers), width), float("nan"))
    for row, (_, layer) in enumerate(layers):
        shares[row, : layer.num_resolutions] = resolution_shares(layer).float()
    fig = _figure()
    ax = fig.add_subplot()
    image = ax.imshow(shares.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=float(shares.nan_to_num().max()))
    fig.colorbar(image, ax=ax, label="share of the merged kernel's norm (per layer, sums to 1)")
    if len(layers) * width <= 200:
        for row, (_, layer) in enumerate(layers):
            for col, length in enumerate(layer.lengths):
                color = "black" if shares[row, col] > 0.6 * shares.nan_to_num().max() else "white"
                text = f"l={length}\n{float(shares[row, col]):.0%}"
                ax.text(col, row, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(width))
    ax.set_xlabel("resolution i (sub-kernel length l_i = l_0 * 2^i, cut to the sequence length)")
    ax.set_yticks(range(len(layers)), [name for name, _ in layers], fontsize=max(4, min(9, 300 // len(layers))))
    ax.set_ylabel("layer (depth)")
    norms = {layer.branch_norm for _, layer in layers}
    folded = (
        "alpha_i / z_i (branch_norm='scale', Eq. 9)" if norms == {"scale"} else "alpha_i gamma_i / sigma_i (BN folded)"
    )
    ax.set_title(f"{title}: resolution shares ||{folded} * k_i||, channel mean", fontsize=10)
    return fig


def _plot_kernels_1d(model: nn.Module, title: str, channels: int, seed: int):
    layers = _kernel_layers(model)
    fig = _figure()
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    for ax, (name, layer, _) in zip(axes, layers, strict=True):
        lags, kernel = _lag_kernel(layer)
        for channel in _channels(layer.dim, channels, seed):
            ax.plot(lags.numpy(), kernel[channel].numpy(), linewidth=0.8, label=f"channel {channel}")
        if layer.bidirectional:
            ax.axvline(-0.5, color="grey", linewidth=0.6, linestyle="--")
        ax.set_title(f"{name}: lengths {layer.lengths}", fontsize=9)
        ax.set_ylabel("weight")
        ax.legend(fontsize=6, loc="upper right")
    halves = "anti-causal (lag < 0) | causal (lag >= 0)" if layers[0][1].bidirectional else "causal"
    axes[-1].set_xlabel(f"lag ({halves})")
    fig.suptitle(f"{title}: merged kernels (Eq. 13)", fontsize=11)
    return fig


def _plot_kernels_2d(model: MRConvNeXt, title: str, channels: int, seed: int):
    layers = _kernel_layers(model)
    fig = _figure()
    axes = fig.subplots(len(layers), channels, squeeze=False)
    for row, (name, layer, (height, width)) in enumerate(layers):
        maps = feature_map_kernel(layer, height, width)
        for col, channel in enumerate(_channels(layer.dim, channels, seed)):
            bound = float(maps[channel].abs().max().clamp_min(1e-12))
            ax = axes[row, col]
            image = ax.imshow(maps[channel].numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
            ax.plot([width // 2], [height // 2], marker="+", color="black", markersize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"channel {channel}", fontsize=8)
            fig.colorbar(image, ax=ax, shrink=0.8)
        axes[row, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(
        f"{title}: merged kernels folded onto the feature map (row-major lags)\n"
        "weight each input pixel gets in the output of the centre (+) pixel",
        fontsize=10,
    )
    return fig


def _plot_spectra(model: nn.Module, title: str, channels: int, seed: int):
    layers = _kernel_layers(model)
    fig = _figure()
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    for ax, (name, layer, _) in zip(axes, layers, strict=True):
        lags, kernel = _lag_kernel(layer)
        n = 1 << max(1, (2 * len(lags) - 1).bit_length())
        magnitude = torch.fft.rfft(kernel, n=n).abs()  # a shift of the lag origin does not change the magnitude
        chosen = _channels(layer.dim, channels, seed)
        decibels = 20 * torch.log10(magnitude[chosen] / magnitude[chosen].max().clamp_min(1e-30)).clamp_min(-80)
        frequency = torch.fft.rfftfreq(n)
        for channel, values in zip(chosen, decibels, strict=True):
            ax.plot(frequency.numpy(), values.numpy(), linewidth=0.8, label=f"channel {channel}")
        ax.set_title(f"{name}: |FFT| of the merged kernel", fontsize=9)
        ax.set_ylabel("dB re. peak")
        ax.legend(fontsize=6, loc="upper right")
    axes[-1].set_xlabel("frequency (cycles per sequence step; 0.5 = Nyquist), floor at -80 dB")
    fig.suptitle(f"{title}: magnitude spectra of the merged kernels", fontsize=11)
    return fig


def plot_model(
    model: nn.Module,
    out_dir: str | Path,
    title: str | None = None,
    kinds: tuple[str, ...] | None = None,
    channels: int = 4,
    seed: int = 0,
) -> list[Path]:
    """Write ``out_dir/<kind>.png`` for each of ``kinds`` (default: every kind the model has) and return the paths.

    ``title`` names the model in the figures (default: its pretrained cfg's architecture or class name);
    ``channels`` kernels per layer are drawn, chosen with ``seed``. Asking a deploy-form model for ``'alpha'``,
    or a model without a 2D feature map for ``'kernels_2d'``, raises a ``ValueError`` that says why.
    """
    layers = _mrconv_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MRConv layers to plot")
    title = title or getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    deploy = _is_deploy(model)
    if kinds is None:
        kinds = tuple(k for k in PLOT_KINDS if _available(model, k, deploy) is None)
    for kind in kinds:
        if kind not in PLOT_KINDS:
            raise ValueError(f"unknown plot kind {kind!r}; expected some of {list(PLOT_KINDS)}")
        reason = _available(model, kind, deploy)
        if reason:
            raise ValueError(f"cannot plot {kind!r} for {title}: {reason}")
    channels = max(1, min(channels, min(layer.dim for _, layer in layers)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in kinds:
        path = out_dir / f"{kind}.png"
        if kind == "alpha":
            fig = _plot_alpha(model, title)
        elif kind == "kernels_1d":
            fig = _plot_kernels_1d(model, title, channels, seed)
        elif kind == "kernels_2d":
            fig = _plot_kernels_2d(model, title, channels, seed)
        else:
            fig = _plot_spectra(model, title, channels, seed)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        paths.append(path)
    return paths


def _available(model: nn.Module, kind: str, deploy: bool) -> str | None:
    """Why ``kind`` cannot be drawn for ``model`` (None if it can)."""
    if kind == "alpha" and deploy:
        return (
            "the model is in deploy form: each MRConv holds one merged kernel and the per-resolution weights alpha "
            "are folded into it (Eq. 13); plot a train-form checkpoint to see them"
        )
    if kind == "alpha" and not any(hasattr(layer, "alpha") for _, layer in _mrconv_layers(model)):
        return "its MRConv layers concatenate sub-kernels with a fixed decay (combine='concat') and have no alpha"
    if kind == "kernels_2d" and not isinstance(model, MRConvNeXt):
        return "only MRConvNeXt convolves 2D feature maps"
    return None


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "), formatter_class=HelpFormatter
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--plots", nargs="+", choices=PLOT_KINDS, default=None, help="default: all the model has")
    parser.add_argument("--channels", type=int, default=4, help="kernels drawn per layer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the channel choice")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = create_parser()
    args = parser.parse_args(argv)
    problem = out_of_range(args, positive=["channels"])
    if problem:
        parser.error(problem)
    try:
        if args.model and not is_mrconv_model(args.model):
            raise ValueError(f"cannot plot {args.model!r}: expected an MRConvNeXt or MRConv sequence model")
        model = create_model_from_checkpoint(args.checkpoint, args.model, **args.model_kwargs)
        title = f"{model.pretrained_cfg['architecture']} ({'deploy' if _is_deploy(model) else 'train'} form)"
        if args.plots is None and _is_deploy(model):
            print(
                f"alpha.png skipped: {args.checkpoint} is a deploy-form checkpoint ({_available(model, 'alpha', True)})"
            )
        paths = plot_model(model, args.out, title, tuple(args.plots) if args.plots else None, args.channels, args.seed)
    except (CheckpointError, ValueError, RuntimeError, FileNotFoundError, ImportError) as e:
        print(f"mrconvnext.plot: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
