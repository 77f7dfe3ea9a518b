"""MRConvNeXt: ConvNeXt with 1D multi-resolution global convolutions (MRConv paper, Section 5.4, Appendix D.5).

Every block's 7x7 depthwise conv is replaced by an :class:`~mrconvnext.layers.mrconv.MRConv2d` that flattens
the ``H x W`` feature map row-major into one sequence and convolves it with a bidirectional global
kernel; everything else (stem, downsampling, LayerNorm + MLP, layer scale, head) is timm's ConvNeXt.

Paper defaults (Appendix D.5): at 224 x 224 the four stages see sequences of length
``[3136, 784, 196, 49]``, the initial kernel lengths are ``[196, 49, 28, 28]``, at most 5 resolutions,
bidirectional kernels, Fourier + sparse sub-kernels. The sequence lengths a model plans its kernels for
follow ``img_size``. Other input sizes run (kernels are cut or zero-padded to the input length), but a
1D kernel over flattened rows is tied to the feature-map width it was trained at: the lag that means
"one row down" at the training width means something else at another width, so the first such input warns
(:func:`check_planned_size`). The pretrained cfgs declare ``fixed_input_size`` so that timm's scripts
(``resolve_model_input_args``) plan the model for the size of their data; the model itself runs at any size.

Checkpoints: :func:`checkpoint_filter_fn` accepts timm / training-script layouts (``state_dict``,
``state_dict_ema``, ``model``, ``model_ema`` keys or a bare state dict, ``module.`` / ``_orig_mod.``
prefixes) in train or deploy form, and reparameterizes train-form MRConv weights on load into a
``deploy=True`` model; timm ConvNeXt checkpoints of the same size are converted on load
(:mod:`~mrconvnext.models.convnext_conversion`). No ImageNet weights are published: the default cfgs are tagged ``untrained``
(timm's convention: nothing listed by ``timm.list_pretrained``), and ``pretrained=True`` without a weight
source raises at once an error that says how to load local weights.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module, to_2tuple, to_ntuple
from timm.models import generate_default_cfgs, register_model
from timm.models._helpers import clean_state_dict
from timm.models.convnext import ConvNeXt

from ..layers.mrconv import MRConv2d, default_strides, fold_train_form, mrconv_form, train_form_twins
from ._builder import ReparameterizeMixin, build_mrconv_model, select_state_dict
from .convnext_conversion import convert_convnext, is_convnext_state_dict

__all__ = ["MRConvNeXt", "PointwiseConv2d", "check_planned_size", "checkpoint_filter_fn"]


def check_planned_size(x: torch.Tensor, img_size: tuple[int, int]) -> torch.Tensor:
    """``x`` unchanged, after a warning when its ``H x W`` is not the ``img_size`` the MRConv kernels were planned
    for: their lags over flattened rows belong to the planned width (Appendix D.5). Python's default filter shows
    it once per call site and pair of sizes. A leaf of ``torch.fx`` traces (``torch.fx.wrap``): traced graphs warn
    too."""
    size = (x.shape[-2], x.shape[-1])
    if size != img_size:

        def named(hw: tuple[int, int]) -> object:
            return hw[0] if hw[0] == hw[1] else hw

        warnings.warn(
            f"MRConvNeXt planned for img_size={named(img_size)} gets {size[0]} x {size[1]} inputs: its kernels' "
            f"row lags belong to the planned width; create the model with img_size={named(size)} to plan it for "
            f"this size (timm's scripts: --img-size {size[0]}, or --model-kwargs img_size={named(size)})",
            stacklevel=3,
        )
    return x


torch.fx.wrap("check_planned_size")


@register_notrace_module  # a leaf of timm's FX traces: the path depends on the input's strides
class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters, same state dict) that runs a channels-last input as one ``F.linear``.

    The ``conv_mlp`` blocks (atto, nano) get channels-last views from timm's ``LayerNorm2d``; with more than one
    thread, oneDNN's 1x1 convolution of such an input returns the weight gradient with channels-last strides,
    unlike the contiguous weight, so DDP's gradient buckets warn ("Grad strides do not match bucket view
    strides") and copy it every step. Through ``F.linear`` on the ``(B, H, W, C)`` view the weight gradient comes
    from a contiguous view of the weight: the parameter's own layout, which ``.to(memory_format=...)`` leaves
    contiguous (a 1x1 weight has the same memory in both layouts). Other inputs take ``nn.Conv2d``'s path.
    """

    @classmethod
    def sharing(cls, conv: nn.Conv2d) -> PointwiseConv2d:
        """A :class:`PointwiseConv2d` holding ``conv``'s own weight and bias."""
        pointwise = cls(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None, device="meta")
        pointwise.weight, pointwise.bias = conv.weight, conv.bias
        return pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(0, 2, 3, 1)
        if not rows.is_contiguous():
            return super().forward(x)
        return F.linear(rows, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)

    def _apply(self, fn, recurse=True):
        return super()._apply(lambda t: default_strides(fn(t)), recurse)


class MRConvNeXt(ReparameterizeMixin, ConvNeXt):
    """ConvNeXt whose depthwise convs are bidirectional multi-resolution global convolutions.

    Args:
        img_size: training resolution the per-stage sequence lengths ``(H / s) * (W / s)`` are planned for.
        kernel_sizes: initial kernel length ``l_0`` per stage (cut to the stage's sequence length).
        kernel_type: MRConv sub-kernel parameterization (``'fourier_sparse'`` is the paper's best).
        max_resolutions: cap on the number of resolutions per layer.
        bidirectional: causal + anti-causal kernels, so every position sees the whole feature map.
        deploy: build the reparameterized single-kernel form of every MRConv directly.
        mrconv_kwargs: further keyword arguments passed unchanged to every ``MRConv2d``.
        **kwargs: ConvNeXt arguments (``depths``, ``dims``, ``num_classes``, ``drop_path_rate``, ...).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        kernel_sizes: int | tuple[int, ...] = (196, 49, 28, 28),
        kernel_type: str = "fourier_sparse",
        max_resolutions: int | None = 5,
        bidirectional: bool = True,
        deploy: bool = False,
        mrconv_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        # 1x1 placeholders for the depthwise convs, replaced by MRConv2d below
        super().__init__(kernel_sizes=1, device=device, dtype=dtype, **kwargs)
        self.img_size = to_2tuple(img_size)
        # timm's record of the planned size (get_model_args); any input size runs (check_planned_size warns), although
        # the cfgs' fixed_input_size has timm's scripts plan the model for their data size
        self._traits = {"img_size": self.img_size, "fixed_input_size": False}
        kernel_sizes = to_ntuple(len(self.stages))(kernel_sizes)
        if len(kernel_sizes) != len(self.stages):
            raise ValueError(f"kernel_sizes needs one length per stage ({len(self.stages)}), got {kernel_sizes}")
        self._mrconv_args = dict(
            kernel_type=kernel_type,
            bidirectional=bidirectional,
            max_resolutions=max_resolutions,
            **(mrconv_kwargs or {}),
        )
        self._kernel_sizes = kernel_sizes
        self.mrconv_cfgs = self.plan(self.img_size)
        for stage, cfg in zip(self.stages, self.mrconv_cfgs, strict=True):
            for block in stage.blocks:
                with torch.device(device) if device is not None else nullcontext():
                    block.conv_dw = MRConv2d(**cfg, deploy=deploy)
                if dtype is not None:
                    block.conv_dw.to(dtype=dtype)
                if block.use_conv_mlp:
                    block.mlp.fc1, block.mlp.fc2 = (
                        PointwiseConv2d.sharing(fc) for fc in (block.mlp.fc1, block.mlp.fc2)
                    )
        self.register_load_state_dict_pre_hook(_check_planned_size)

    def plan(self, img_size: tuple[int, int]) -> list[dict[str, Any]]:
        """The MRConv2d arguments of each stage at ``img_size``: sequence length ``(H / s) * (W / s)`` of the
        stage's stride ``s``, kernel length ``l_0`` cut to it (Appendix D.5)."""
        height, width = img_size
        cfgs = []
        for stage_idx, (info, kernel_size) in enumerate(zip(self.feature_info, self._kernel_sizes, strict=True)):
            reduction = info["reduction"]
            seq_len = (height // reduction) * (width // reduction)
            if seq_len < 1:
                raise ValueError(
                    f"img_size={img_size} is too small: stage {stage_idx} (stride {reduction}) has no pixels"
                )
            cfgs.append(
                dict(dim=info["num_chs"], seq_len=seq_len, kernel_size=min(kernel_size, seq_len), **self._mrconv_args)
            )
        return cfgs

    def planned_img_size(self, state_dict: dict[str, torch.Tensor]) -> int | None:
        """The square ``img_size`` (a multiple of 32) whose MRConv shapes are those of ``state_dict``, None if none.

        Compared on the first block of every stage, in the form (train or deploy) the state dict holds; the
        model's own size is tried first, as shapes do not always single out one size.
        """
        deploy = mrconv_form(state_dict) == "deploy"
        prefixes = [f"stages.{i}.blocks.0.conv_dw." for i in range(len(self.stages))]
        have = [{k[len(p) :]: tuple(v.shape) for k, v in state_dict.items() if k.startswith(p)} for p in prefixes]
        for size in dict.fromkeys([self.img_size[0], *range(32, 2049, 32)]):
            with torch.device("meta"):
                layers = [MRConv2d(**cfg, deploy=deploy) for cfg in self.plan((size, size))]
            if [{k: tuple(v.shape) for k, v in layer.state_dict().items()} for layer in layers] == have:
                return size
        return None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(check_planned_size(x, self.img_size))

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """timm's ConvNeXt ``forward_intermediates`` (``features_only`` models call it)."""
        return super().forward_intermediates(check_planned_size(x, self.img_size), *args, **kwargs)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Per-branch gains and shifts (BN affine, alpha, Fourier/sparse mixing scales) stored as ``(N, D)``.

        They are per-channel parameters that timm leaves undecayed when they are 1-D (one BatchNorm
        per branch); stacking them per resolution must not change that.
        """
        return {"*.conv_dw.norm.*", "*.conv_dw.alpha", "*.conv_dw.kernel.scale"}


def planned_size_error(model: MRConvNeXt, state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why ``state_dict`` cannot load into ``model`` when it was planned for another image size, else None."""

    def conv_shapes(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in weights.items() if ".conv_dw." in k}

    if conv_shapes(state_dict) == conv_shapes(model.state_dict()):
        return None
    planned = model.planned_img_size(state_dict)
    if planned is None or (planned, planned) == model.img_size:
        return None
    height, width = model.img_size
    return (
        f"the state dict's MRConv kernels were planned for img_size={planned}, this model's for "
        f"img_size={height if height == width else model.img_size}: create it with img_size={planned} "
        f"(timm's scripts: --model-kwargs img_size={planned})"
    )


def _check_planned_size(module: MRConvNeXt, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: one clear error for a state dict planned for another image size."""
    own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    error = planned_size_error(module, own)
    if error:
        raise RuntimeError(f"Error loading a state dict into {type(module).__name__}: {error}")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: MRConvNeXt) -> dict[str, torch.Tensor]:
    """Map a checkpoint of any supported layout to ``model``'s keys, or explain why it cannot load.

    Accepts a bare state dict or a training checkpoint dict (``state_dict_ema`` / ``model_ema`` /
    ``state_dict`` / ``model``), strips ``module.`` / ``_orig_mod.`` prefixes, and reparameterizes
    train-form MRConv weights when ``model`` is in deploy form. timm ConvNeXt weights of the same size are
    converted (:func:`~mrconvnext.models.convnext_conversion.convert_convnext`). The input conv's channel count may
    differ, and the classifier too when the model's ``num_classes`` differs from the pretrained cfg's
    (timm's ``load_pretrained`` then adapts the stem and drops the head); any other missing,
    unexpected or differently shaped tensor raises a ``RuntimeError`` naming them.
    """
    state_dict = clean_state_dict(select_state_dict(state_dict))
    if is_convnext_state_dict(state_dict):  # timm ConvNeXt weights
        state_dict = convert_convnext(state_dict, model)
    # the keys and shapes the checkpoint must have: the model's, in train form where the checkpoint is
    branches = train_form_twins(state_dict, model)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(branches))}
    for prefix, layer in branches.items():
        expected.update({prefix + k: v for k, v in layer.state_dict().items()})
    cfg = getattr(model, "pretrained_cfg", {})
    classifier = cfg.get("classifier") or "head.fc"
    # load_pretrained drops the classifier when the model's class count differs from the cfg's
    replaced_head = model.num_classes != cfg.get("num_classes", model.num_classes)
    classifier_keys = {f"{classifier}.weight", f"{classifier}.bias"} if replaced_head else set()
    first_conv_weight = f"{cfg.get('first_conv') or 'stem.0'}.weight"

    def shape_ok(key: str) -> bool:
        have, want = tuple(state_dict[key].shape), tuple(expected[key].shape)
        if have == want or key in classifier_keys:
            return True
        # input-channel count of the stem may differ: timm's adapt_input_conv handles it
        return key == first_conv_weight and len(have) == 4 and have[:1] + have[2:] == want[:1] + want[2:]

    missing = [k for k in expected if k not in state_dict and k not in classifier_keys]
    unexpected = [k for k in state_dict if k not in expected and k not in classifier_keys]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state_dict
        if k in expected and not shape_ok(k)
    ]
    if missing or unexpected or mismatched:
        form = "deploy" if model.deploy else "train"
        problems = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = "; ".join(items[:8]) + (f"; ... ({len(items) - 8} more)" if len(items) > 8 else "")
                problems.append(f"{len(items)} {title}: {shown}")
        hint = ""
        if any(k.startswith(f"{classifier}.weight:") for k in mismatched):
            hint += (
                " To keep a checkpoint head of another class count, pass pretrained_cfg_overlay=dict(..., "
                "num_classes=N); to replace it, pass num_classes= to create_model."
            )
        planned = planned_size_error(model, state_dict)
        if planned:
            hint += f" In short: {planned}."
        elif any(".conv_dw." in k for k in missing + unexpected + mismatched):
            hint += (
                " MRConv shapes follow img_size, kernel_sizes, kernel_type and max_resolutions: create the model "
                f"with the values the checkpoint was trained with (this one has img_size={model.img_size})."
            )
        if form == "train" and mrconv_form(state_dict) == "deploy" and any(".conv_dw." in k for k in unexpected):
            hint += " The checkpoint looks reparameterized: create the model with deploy=True to load it."
        raise RuntimeError(
            f"Checkpoint is incompatible with {type(model).__name__} ({form} form, "
            f"{cfg.get('architecture', 'unknown architecture')}): " + " | ".join(problems) + "." + hint
        )
    return fold_train_form(state_dict, branches)


def _create_mrconvnext(variant: str, pretrained: bool = False, **kwargs: Any) -> MRConvNeXt:
    feature_cfg = dict(out_indices=(0, 1, 2, 3), feature_cls="getter")
    unpublished = "MRConvNeXt ImageNet weights"
    return build_mrconv_model(
        MRConvNeXt, variant, pretrained, checkpoint_filter_fn, unpublished, feature_cfg=feature_cfg, **kwargs
    )


def _cfg(hf_hub_id: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "hf_hub_id": hf_hub_id,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "fixed_input_size": True,  # the kernels are planned for one size: timm's scripts pass theirs as img_size
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_name": "Reparameterized Multi-Resolution Convolutions for Long Sequence Modelling",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "mrconvnext_atto.untrained": _cfg(),
        "mrconvnext_nano.untrained": _cfg(),
        "mrconvnext_tiny.untrained": _cfg(),
        "mrconvnext_small.untrained": _cfg(),
        "mrconvnext_base.untrained": _cfg(),
    }
)


@register_model
def mrconvnext_atto(pretrained: bool = False, **kwargs: Any) -> MRConvNeXt:
    """ConvNeXt-atto depths/widths (timm's, with its 1x1-conv MLP) and MRConv depthwise convs."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True)
    return _create_mrconvnext("mrconvnext_atto", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mrconvnext_nano(pretrained: bool = False, **kwargs: Any) -> MRConvNeXt:
    """ConvNeXt-nano depths/widths (timm's, with its 1x1-conv MLP) and MRConv depthwise convs."""
    model_args = dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True)
    return _create_mrconvnext("mrconvnext_nano", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mrconvnext_tiny(pretrained: bool = False, **kwargs: Any) -> MRConvNeXt:
    """MRConvNeXt-T (Section 5.4): ConvNeXt-T depths/widths."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    return _create_mrconvnext("mrconvnext_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mrconvnext_small(pretrained: bool = False, **kwargs: Any) -> MRConvNeXt:
    """MRConvNeXt-S (Section 5.4): ConvNeXt-S depths/widths."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
    return _create_mrconvnext("mrconvnext_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mrconvnext_base(pretrained: bool = False, **kwargs: Any) -> MRConvNeXt:
    """MRConvNeXt-B (Section 5.4): ConvNeXt-B depths/widths."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))
    return _create_mrconvnext("mrconvnext_base", pretrained=pretrained, **dict(model_args, **kwargs))
