"""A ConvNeXt -> MRConvNeXt conversion on real images, before any fine-tuning.

``python benchmarks/convnext_conversion.py CONVNEXT_CHECKPOINT --data-dir DIR [--model mrconvnext_atto] [--img-size 32]``

Evaluates on ``DIR/val`` (eval transform of the model's cfg at ``--img-size``) the ConvNeXt checkpoint and its
conversion (:mod:`mrconvnext.convert`): the train form in eval mode and the deploy form; and, as in the first
fine-tuning step, the train form in train mode (BatchNorm normalises by batch statistics) without and with
:func:`~mrconvnext.models.calibrate_batchnorm` on ``--calibrate-batches`` batches of ``DIR/train``. Prints a
Markdown table: top-1, the fraction of top-1 predictions that agree with ConvNeXt, and the logit difference
``||z - z_ConvNeXt|| / ||z_ConvNeXt||`` over the whole set; then the fraction of positions whose receptive
field wraps around a row edge, per stage, at ``--img-size`` and at 224.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import timm
import torch
from timm.data import ImageDataset, create_transform, resolve_data_config
from timm.models import load_state_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mrconvnext.convert import image_batches  # noqa: E402
from mrconvnext.models import calibrate_batchnorm, stage_wraparound  # noqa: E402
from mrconvnext.models.mrconvnext import checkpoint_filter_fn  # noqa: E402


@torch.no_grad()
def logits_and_labels(model: torch.nn.Module, loader: torch.utils.data.DataLoader, train_mode: bool = False):
    model = copy.deepcopy(model).train(train_mode)  # train mode updates running statistics: work on a copy
    outputs, labels = [], []
    for images, targets in loader:
        outputs.append(model(images))
        labels.append(targets)
    return torch.cat(outputs), torch.cat(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="timm ConvNeXt checkpoint (bare state dict or training checkpoint)")
    parser.add_argument("--data-dir", required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--model", default="mrconvnext_atto")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--kernel-type", default="fourier_sparse")
    parser.add_argument("--calibrate-batches", type=int, default=8)
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="also the batch of the train-mode rows")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    state_dict = load_state_dict(args.checkpoint, use_ema=True)
    num_classes = state_dict["head.fc.weight"].shape[0]
    convnext = timm.create_model(args.model.replace("mrconvnext", "convnext"), num_classes=num_classes).eval()
    convnext.load_state_dict(state_dict)
    forms = {}
    for deploy in (False, True):
        model = timm.create_model(
            args.model, num_classes=num_classes, img_size=args.img_size, kernel_type=args.kernel_type, deploy=deploy
        )
        model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model))
        forms[deploy] = model.eval()
    calibrated = copy.deepcopy(forms[False])
    batches = image_batches(calibrated, args.data_dir, args.img_size, args.batch_size, args.calibrate_batches)
    seen = calibrate_batchnorm(calibrated, batches)

    config = resolve_data_config({"input_size": (3, args.img_size, args.img_size)}, model=convnext)
    dataset = ImageDataset(os.path.join(args.data_dir, "val"), transform=create_transform(**config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    reference, labels = logits_and_labels(convnext, loader)
    rows = [
        ("ConvNeXt (eval)", reference),
        ("converted, train form (eval)", logits_and_labels(forms[False], loader)[0]),
        ("converted, deploy form", logits_and_labels(forms[True], loader)[0]),
        ("converted, train form in train mode, BN not calibrated", logits_and_labels(forms[False], loader, True)[0]),
        (f"converted, train form in train mode, BN calibrated ({seen} images)", logits_and_labels(calibrated, loader, True)[0]),
    ]  # fmt: skip
    print(f"{len(dataset)} images of {args.data_dir}/val at {args.img_size} px, {args.model} ({args.kernel_type})")
    print("| model | top-1 | top-1 agrees with ConvNeXt | logit difference vs ConvNeXt |")
    print("|---|---|---|---|")
    for name, logits in rows:
        top1 = 100 * (logits.argmax(1) == labels).double().mean().item()
        agree = 100 * (logits.argmax(1) == reference.argmax(1)).double().mean().item()
        diff = ((logits - reference).norm() / reference.norm()).item()
        print(f"| {name} | {top1:.2f} | {agree:.2f} | {diff:.4f} |")
    for size in dict.fromkeys((args.img_size, 224)):
        model = timm.create_model(args.model, img_size=size, device="meta")
        wrap = ", ".join(f"{100 * fraction:.1f}%" for fraction in stage_wraparound(model))
        print(f"positions wrapping per stage at {size} px: {wrap}")


if __name__ == "__main__":
    main()
