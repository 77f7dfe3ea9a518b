"""Export a trained MRConvNeXt checkpoint in the layout timm's ``push_to_hf_hub`` writes.

    python -m mrconvnext.export --model mrconvnext_tiny --checkpoint ckpt.pth --output deploy/

By default every MRConv is reparameterized (paper Eqs. 8, 13, 18) and ``deploy/`` receives
``model.safetensors`` and ``config.json`` (its ``model_args`` carry ``deploy=True``), so that
``timm.create_model('local-dir:deploy/', pretrained=True)`` rebuilds the deploy model and loads it
strictly. ``--form train`` writes the train form instead (the form the default Hub cfgs expect).
Both files are written into a temporary directory and renamed into place, weights first.

``--format onnx`` writes ``deploy/model.onnx`` instead, for any registered model (MRConvNeXt and the
``mrconv_*`` sequence models): deploy form, dynamic batch, the planned input size in its metadata,
checked in onnxruntime against PyTorch (see :mod:`mrconvnext.onnx_export`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import to_2tuple
from timm.models import load_state_dict, split_model_name_tag
from timm.models._hub import save_for_hf

from .checkpoints import checkpoint_metadata
from .models.mrconvnext import MRConvNeXt
from .onnx_export import LONG_CONV_METHODS, export_onnx, load_checkpoint_model, planned_input

__all__ = ["export_model"]

_EXPORT_FILES = ("model.safetensors", "config.json")  # weights first: a config never names missing weights


def _verify(model_name: str, state_dict: dict[str, torch.Tensor], deployed: MRConvNeXt, model_args: dict) -> float:
    """Relative difference of the train form's (eval) and the deploy form's logits on random images."""
    train = timm.create_model(
        model_name,
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=state_dict, num_classes=deployed.num_classes),
        **model_args,
    ).eval()
    height, width = train.img_size
    images = torch.randn(2, deployed.in_chans, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = train(images).double()
        out = deployed.eval()(images).double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def export_model(
    model_name: str,
    checkpoint: str | Path,
    output: str | Path,
    use_ema: bool = True,
    model_args: dict[str, Any] | None = None,
    deploy: bool = True,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> tuple[MRConvNeXt, float | None]:
    """Write ``checkpoint`` (train or deploy form) to ``output/{model.safetensors,config.json}``.

    ``deploy=True`` reparameterizes every MRConv; ``deploy=False`` keeps the train form, which is what
    the models' default Hub cfgs expect (``pretrained=True`` then gives a fine-tunable model and
    ``deploy=True`` folds it on load). ``num_classes`` and ``in_chans`` are read from the checkpoint, and
    ``img_size`` and the MRConv ``norm`` too when a training script recorded them; ``model_args``
    (``img_size``, ``kernel_type``, ``mrconv_kwargs``, ...) must match the trained model.
    Returns the model and, for a deploy export of a train-form checkpoint with ``verify``, the relative
    difference between both forms' logits (nothing is written if it exceeds ``tolerance``).
    """
    if split_model_name_tag(model_name)[0] not in timm.list_models("mrconvnext*"):
        raise ValueError(f"{model_name!r} is not an MRConvNeXt; expected one of {timm.list_models('mrconvnext*')}")
    state_dict = load_state_dict(str(checkpoint), use_ema=use_ema)  # weights_only / safetensors, prefixes removed
    model_args = dict(model_args or {})
    model_args.pop("deploy", None)
    saved = checkpoint_metadata(checkpoint)
    if "img_size" in saved:
        model_args.setdefault("img_size", saved["img_size"])
    if "mrconv_norm" in saved:  # the train form of norm='scale' has other parameters than BatchNorm's
        model_args["mrconv_kwargs"] = {"norm": saved["mrconv_norm"], **model_args.get("mrconv_kwargs", {})}
    head = state_dict.get("head.fc.weight")
    num_classes = head.shape[0] if head is not None else 0
    stem = state_dict.get("stem.0.weight")
    if stem is not None:
        model_args.setdefault("in_chans", stem.shape[1])
    height, width = to_2tuple(model_args.get("img_size", 224))
    # the exported pretrained_cfg describes these weights: their classes and training input size, no source tag
    overlay = dict(
        state_dict=state_dict,
        num_classes=num_classes,
        input_size=(model_args.get("in_chans", 3), height, width),
        pool_size=(height // 32, width // 32),
        tag=None,
    )
    model = timm.create_model(
        model_name,
        pretrained=True,
        pretrained_cfg_overlay=overlay,
        num_classes=num_classes,
        deploy=deploy,
        **model_args,
    )
    error = None
    if deploy and verify and not any(k.endswith(".conv_dw.weight") for k in state_dict):  # train-form checkpoint
        error = _verify(model_name, state_dict, model, dict(model_args, num_classes=num_classes))
        if error > tolerance:
            raise RuntimeError(f"deploy form disagrees with the checkpoint: relative error {error:.2e} > {tolerance}")

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output, prefix=".export-") as tmp:
        save_for_hf(model, tmp, safe_serialization=True)
        for name in _EXPORT_FILES:
            os.replace(Path(tmp) / name, output / name)
    return model, error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registered model name, e.g. mrconvnext_tiny")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pth/.pth.tar) or .safetensors")
    parser.add_argument("--output", required=True, help="directory for model.safetensors + config.json")
    parser.add_argument("--form", choices=("deploy", "train"), default="deploy", help="reparameterized or train form")
    parser.add_argument("--no-ema", action="store_true", help="export 'state_dict' even if 'state_dict_ema' exists")
    parser.add_argument(
        "--img-size", type=int, default=None, help="training resolution (default: the checkpoint's, else 224)"
    )
    parser.add_argument("--model-args", default="{}", help="JSON dict of further model args, e.g. kernel_type")
    parser.add_argument("--no-verify", action="store_true", help="skip the train-vs-deploy logit check")
    parser.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors", help="output format")
    parser.add_argument(
        "--long-conv", choices=LONG_CONV_METHODS, default="auto", help="ONNX form of the long convolution"
    )
    parser.add_argument(
        "--lengths",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ONNX: add the padding-lengths input of sequence models (default: token models)",
    )
    args = parser.parse_args(argv)
    model_args = json.loads(args.model_args)
    if not isinstance(model_args, dict):
        parser.error(f"--model-args must be a JSON object, got {args.model_args!r}")
    if args.img_size is not None:
        model_args["img_size"] = args.img_size
    if args.format == "onnx":
        if args.form != "deploy":
            parser.error("--format onnx exports the deploy form only (a train-form checkpoint is reparameterized)")
        _main_onnx(args, model_args)
        return
    model, error = export_model(
        args.model,
        args.checkpoint,
        args.output,
        use_ema=not args.no_ema,
        model_args=model_args,
        deploy=args.form == "deploy",
        verify=not args.no_verify,
    )
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {Path(args.output) / 'model.safetensors'} and config.json: {args.model}, {args.form} form, {params:,} params"
    )
    if error is not None:
        print(f"train vs deploy form logits on random images: relative difference {error:.2e}")


def _main_onnx(args: argparse.Namespace, model_args: dict[str, Any]) -> None:
    model = load_checkpoint_model(args.model, args.checkpoint, use_ema=not args.no_ema, model_args=model_args)
    path, error = export_onnx(
        model,
        Path(args.output) / "model.onnx",
        method=args.long_conv,
        lengths=args.lengths,
        metadata=dict(model=args.model, checkpoint=Path(args.checkpoint).name),
        verify=not args.no_verify,
    )
    size = planned_input(model)
    size = f"img_size {size['img_size']}" if "img_size" in size else f"seq_len {size['seq_len']}"
    print(f"wrote {path}: {args.model}, deploy form, {size}, dynamic batch")
    if error is not None:
        print(f"onnxruntime vs PyTorch logits on random inputs: max relative error {error:.2e}")


if __name__ == "__main__":
    main()
