"""What both model families (MRConvNeXt, the sequence models) build and load with, on top of timm's builder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from ..layers.mrconv import MRConv

__all__ = ["ReparameterizeMixin", "build_mrconv_model", "select_state_dict"]

_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # EMA first, as timm's load_state_dict


class ReparameterizeMixin:
    """The one switch between a model's forms, as ``timm.utils.reparameterize_model`` expects it."""

    @property
    def deploy(self) -> bool:
        """Whether every MRConv is in its reparameterized form (also after ``timm.utils.reparameterize_model``)."""
        return all(module.deploy for module in self.modules() if isinstance(module, MRConv))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every MRConv into its deploy form in place (Eqs. 8, 13, 18); idempotent."""
        for module in self.modules():
            if isinstance(module, MRConv):
                module.reparameterize()


def select_state_dict(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model weights of a checkpoint file's dict: EMA weights when present, as timm's ``load_state_dict``."""
    for key in _CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def _has_weight_source(cfg: dict[str, Any]) -> bool:
    """Whether a pretrained cfg names any weights to load (timm's weight source keys)."""
    return any(cfg.get(key) is not None and cfg.get(key) != "" for key in ("state_dict", "file", "url", "hf_hub_id"))


def _missing_weights_error(
    variant: str, cfg: dict[str, Any], kwargs: dict[str, Any], error: OSError | None, unpublished: str
) -> RuntimeError:
    """A ``pretrained=True`` failure that names where it looked (if anywhere) and how to load local weights."""
    if not _has_weight_source(cfg):
        name = f"{variant}.{cfg['tag']}" if cfg.get("tag") else variant
        problem = f"No pretrained weights exist for {name}: no {unpublished} are published."
    else:
        if cfg.get("source") == "local-dir":
            where = f"local directory {cfg.get('file')!r}"
        elif cfg.get("file"):
            where = f"file {cfg['file']!r}"
        else:
            from huggingface_hub.constants import HF_HUB_CACHE

            where = f"Hugging Face Hub repo {cfg.get('hf_hub_id')!r} (cache {kwargs.get('cache_dir') or HF_HUB_CACHE})"
        problem = f"Could not load pretrained weights for {variant} from {where}: {type(error).__name__}: {error}"
    return RuntimeError(
        f"{problem}\n"
        f"To load local weights use timm.create_model({variant!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='/path/to/model.safetensors')) (a .pth training checkpoint works too), "
        f"timm.create_model('local-dir:/path/to/export_dir', pretrained=True) for a directory written by "
        f"`python -m mrconvnext.export`, or timm.create_model({variant!r}, checkpoint_path='/path/to/"
        f"checkpoint.pth') for a checkpoint in the same (train or deploy) form as the model."
    )


def build_mrconv_model(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    filter_fn: Callable[[dict[str, Any], nn.Module], dict[str, Any]],
    unpublished: str,
    **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg``; ``pretrained=True`` without a weight source, or with one that cannot be
    read, fails with an error that says how to load local weights (and before any hub access) and that no
    ``unpublished`` (e.g. "MRConvNeXt ImageNet weights") are published."""
    cfg: dict[str, Any] = {}
    if pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay")
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay).to_dict()
        if not _has_weight_source(cfg):
            raise _missing_weights_error(variant, cfg, kwargs, None, unpublished)
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    except OSError as e:  # hub, network and file errors (huggingface_hub's errors are OSErrors)
        if not pretrained:
            raise
        raise _missing_weights_error(variant, cfg, kwargs, e, unpublished) from e
