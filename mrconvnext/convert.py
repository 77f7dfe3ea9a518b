"""Convert a timm ConvNeXt checkpoint into MRConvNeXt weights (train or deploy form); see
:mod:`mrconvnext.models.convnext_conversion` for how the taps are placed.

    python -m mrconvnext.convert CONVNEXT_CHECKPOINT OUTPUT --model mrconvnext_atto [--img-size 224]
        [--kernel-type fourier_sparse] [--deploy] [--calibrate-dir IMAGE_FOLDER]

The output keeps the ConvNeXt's classifier; ``train_imagenet.py --pretrained-path OUTPUT --num-classes N`` fine-tunes
it on N classes with a fresh one (as timm's ``pretrained=True, num_classes=N``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import timm
import torch
import torch.nn as nn
from timm.data import ImageDataset, create_transform, resolve_data_config

from .data.images import find_image_folder
from .models.convnext_conversion import HOLDING_KERNEL_TYPES, calibrate_batchnorm, stage_wraparound
from .utils.checkpoint import CheckpointError, checkpoint_record, read_checkpoint, save_checkpoint_file
from .utils.cli import HelpFormatter, out_of_range


def image_batches(
    model: nn.Module, folder: str, img_size: int, batch_size: int, num_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` shuffled batches of the ImageFolder ``folder`` (or ``folder/train``), eval transform."""
    config = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    dataset = ImageDataset(find_image_folder(folder, ("train",)), transform=create_transform(**config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    for index, batch in enumerate(loader):
        if index == num_batches:
            break
        yield batch


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a timm ConvNeXt checkpoint into an MRConvNeXt checkpoint", formatter_class=HelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="ConvNeXt weights: bare state dict or training checkpoint (.pth/.safetensors)"
    )
    parser.add_argument("output", help="MRConvNeXt checkpoint to write (.pth, or .safetensors)")
    parser.add_argument("--model", default="mrconvnext_tiny", help="MRConvNeXt variant of the ConvNeXt's size")
    parser.add_argument("--img-size", type=int, default=224, help="resolution the 1D kernels are planned for")
    parser.add_argument(
        "--kernel-type", default="fourier_sparse", choices=HOLDING_KERNEL_TYPES, help="MRConv kernels holding the taps"
    )
    parser.add_argument("--deploy", action="store_true", help="write the reparameterized (deploy) form")
    parser.add_argument("--calibrate-dir", default="", help="ImageFolder (DIR or DIR/train) for BatchNorm statistics")
    parser.add_argument("--calibrate-batches", type=int, default=8, help="batches of --calibrate-dir")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="calibration batch size")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = create_parser()
    args = parser.parse_args(argv)
    if args.deploy and args.calibrate_dir:
        parser.error("--calibrate-dir needs the train form (a deploy-form model has no BatchNorm)")
    problem = out_of_range(args, positive=["img_size", "calibrate_batches", "batch_size"])
    if problem:
        parser.error(problem)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        head = ckpt.state_dict.get("head.fc.weight")
        if head is None:
            raise CheckpointError(f"{args.checkpoint}: no head.fc.weight: not a timm ConvNeXt classifier checkpoint")
        size = (args.img_size, args.img_size)
        data_config = {**ckpt.pretrained_cfg, "input_size": (3, *size)}  # the ConvNeXt run's, at the planned size
        overlay = dict(state_dict=ckpt.state_dict, num_classes=head.shape[0], **data_config)
        model = timm.create_model(
            args.model,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            num_classes=head.shape[0],
            img_size=args.img_size,
            kernel_type=args.kernel_type,
            deploy=args.deploy,
        )
        note = ""
        if args.calibrate_dir:
            batches = image_batches(model, args.calibrate_dir, args.img_size, args.batch_size, args.calibrate_batches)
            note = f", BatchNorm statistics from {calibrate_batchnorm(model, batches)} images of {args.calibrate_dir}"
        save_checkpoint_file(checkpoint_record(model, data_config=resolve_data_config(model=model)), args.output)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"mrconvnext.convert: error: {e}", file=sys.stderr)
        return 1
    form = "deploy" if args.deploy else f"train form, {args.kernel_type}"
    wrap = ", ".join(f"{100 * fraction:.1f}%" for fraction in stage_wraparound(model))
    print(
        f"wrote {args.output}: {args.model} ({form}, img_size {args.img_size}, {head.shape[0]} classes) from "
        f"{args.checkpoint}{note}; positions wrapping per stage: {wrap}"
    )
    print(
        f"fine-tune it with train_imagenet.py --pretrained-path {args.output} --num-classes N (a fresh classifier "
        f"for N other than {head.shape[0]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
