"""Export a trained checkpoint: safetensors in the layout timm's ``push_to_hf_hub`` writes, or ONNX.

    python -m mrconvnext.export --checkpoint ckpt.pth --output deploy/
    python -m mrconvnext.export --checkpoint ckpt.pth --output deploy/ --format onnx

The model, its planned size, branch norm, class count and evaluation data config come from the checkpoint
(:mod:`mrconvnext.utils.checkpoint`); ``--model`` and ``--model-kwargs`` are needed only for what a bare
state dict does not record. By default every MRConv is reparameterized (paper Eqs. 8, 13, 18), checked
against the train form on random inputs, and ``deploy/`` receives ``model.safetensors`` and ``config.json``
(its ``model_args`` carry ``deploy=True`` and its ``pretrained_cfg`` the run's data config), so that
``timm.create_model('local-dir:deploy/', pretrained=True)`` rebuilds the deploy model, loads it strictly and
evaluates it as the run did. ``--form train`` writes the train form instead. Both files are written into a
temporary directory and renamed into place, weights first.

``--format onnx`` writes ``deploy/model.onnx`` instead, for any registered model (MRConvNeXt and the
``mrconv_*`` sequence models): deploy form, dynamic batch, the planned input size in its metadata, checked in
onnxruntime against PyTorch (see :mod:`mrconvnext.utils.onnx`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.models._hub import save_for_hf
from timm.utils import reparameterize_model

from .layers.long_conv import LONG_CONV_METHODS
from .utils.checkpoint import (
    CheckpointError,
    add_checkpoint_arguments,
    create_model_from_checkpoint,
    is_mrconv_model,
    read_checkpoint,
)
from .utils.cli import HelpFormatter
from .utils.files import publish
from .utils.onnx import example_inputs, export_onnx, planned_input

__all__ = ["create_parser", "export_model", "main"]

_EXPORT_FILES = ("model.safetensors", "config.json")  # weights first: a config never names missing weights


def _form_difference(train: nn.Module, deployed: nn.Module) -> float:
    """Relative difference of the train form's (eval) and the deploy form's outputs on random inputs."""
    args = example_inputs(train, batch=2)
    with torch.no_grad():
        ref = train.eval()(*args).double()
        out = deployed.eval()(*args).double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _load(checkpoint: str | Path, model_name: str | None, use_ema: bool, model_args: dict[str, Any]) -> nn.Module:
    ckpt = read_checkpoint(checkpoint, use_ema)
    name = model_name or ckpt.arch
    if name and not is_mrconv_model(name):
        raise CheckpointError(f"{name!r} is not an MRConv model (mrconvnext_* or mrconv_*): nothing to export here")
    return create_model_from_checkpoint(ckpt, model_name, **model_args)


def export_model(
    checkpoint: str | Path,
    output: str | Path,
    model_name: str | None = None,
    *,
    use_ema: bool = True,
    deploy: bool = True,
    verify: bool = True,
    tolerance: float = 1e-4,
    **model_args: Any,
) -> tuple[nn.Module, float | None]:
    """Write ``checkpoint`` (train or deploy form) to ``output/{model.safetensors,config.json}``.

    ``deploy=True`` reparameterizes every MRConv; ``deploy=False`` keeps the train form, which is what the
    models' default Hub cfgs expect (``pretrained=True`` then gives a fine-tunable model and ``deploy=True``
    folds it on load). Returns the model and, for a deploy export of a train-form checkpoint with ``verify``,
    the relative difference between both forms' outputs (nothing is written if it exceeds ``tolerance``).
    """
    model = _load(checkpoint, model_name, use_ema, model_args)
    error = None
    if deploy and not model.deploy:
        deployed = reparameterize_model(model)
        if verify:
            error = _form_difference(model, deployed)
            if error > tolerance:
                raise RuntimeError(
                    f"deploy form disagrees with the checkpoint: relative error {error:.2e} > {tolerance}"
                )
        model = deployed
    elif not deploy and model.deploy:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is in deploy form: --form train cannot be written")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output, prefix=".export-") as tmp:
        save_for_hf(model, tmp, safe_serialization=True, model_args=dict(deploy=deploy))
        for name in _EXPORT_FILES:
            publish(Path(tmp) / name, output / name)
    return model, error


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--output", required=True, help="directory for model.safetensors + config.json (or model.onnx)")
    parser.add_argument("--form", choices=("deploy", "train"), default="deploy", help="reparameterized or train form")
    parser.add_argument("--no-ema", action="store_true", help="export 'state_dict' even if 'state_dict_ema' exists")
    parser.add_argument("--no-verify", action="store_true", help="skip the train-vs-deploy / onnxruntime check")
    parser.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors", help="output format")
    parser.add_argument("--long-conv", choices=LONG_CONV_METHODS, default="auto", help="ONNX long-convolution form")
    parser.add_argument(
        "--lengths",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ONNX: add the padding-lengths input of sequence models (default: token models)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = create_parser()
    args = parser.parse_args(argv)
    if args.format == "onnx" and args.form != "deploy":
        parser.error("--format onnx exports the deploy form only (a train-form checkpoint is reparameterized)")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"--output {args.output!r} is a file; expected a folder (the export's files are written into it)")
    try:
        if args.format == "onnx":
            _export_onnx(args)
            return 0
        model, error = export_model(
            args.checkpoint,
            args.output,
            args.model,
            use_ema=not args.no_ema,
            deploy=args.form == "deploy",
            verify=not args.no_verify,
            **args.model_kwargs,
        )
    except (CheckpointError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"mrconvnext.export: error: {e}", file=sys.stderr)
        return 1
    params = sum(p.numel() for p in model.parameters())
    name = model.pretrained_cfg["architecture"]
    print(
        f"wrote {Path(args.output) / 'model.safetensors'} and config.json: {name}, {args.form} form, {params:,} params"
    )
    if error is not None:
        print(f"train vs deploy form outputs on random inputs: relative difference {error:.2e}")
    return 0


def _export_onnx(args: argparse.Namespace) -> None:
    model = _load(args.checkpoint, args.model, not args.no_ema, args.model_kwargs)
    name = model.pretrained_cfg["architecture"]
    path, error = export_onnx(
        model,
        Path(args.output) / "model.onnx",
        method=args.long_conv,
        lengths=args.lengths,
        metadata=dict(model=name, checkpoint=Path(args.checkpoint).name),
        verify=not args.no_verify,
    )
    size = planned_input(model)
    size = f"img_size {size['img_size']}" if "img_size" in size else f"seq_len {size['seq_len']}"
    print(f"wrote {path}: {name}, deploy form, {size}, dynamic batch")
    if error is not None:
        print(f"onnxruntime vs PyTorch logits on random inputs: max relative error {error:.2e}")


if __name__ == "__main__":
    sys.exit(main())
