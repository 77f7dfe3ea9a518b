"""ImageNet training for MRConvNeXt (and any timm model) with accelerate.

Defaults reproduce the ConvNeXt ImageNet-1k recipe that the MRConv paper uses for MRConvNeXt-T/S/B
"without any changes" (Section 5.4, Appendix D.5). Data, augmentation, losses, optimizer, scheduler and
EMA come from timm; devices, mixed precision, gradient accumulation, distributed sampling and
checkpoint state come from accelerate, so one script runs under ``python``, ``torchrun`` and
``accelerate launch`` (single GPU, multi-GPU, multi-node, CPU)::

    accelerate launch train_imagenet.py --data-dir /data/imagenet --model mrconvnext_tiny
    python -m mrconvnext.train_imagenet ...   # the same, from an installed package

``-b/--batch-size`` is the per-process batch of one optimizer update; with ``--grad-accum-steps A`` the
loader yields micro-batches of ``batch_size / A``. The global batch is ``batch_size * world_size`` and,
unless ``--lr`` is given, the learning rate is ``--lr-base`` scaled linearly from ``--lr-base-size``.
``--pretrained-path FILE`` fine-tunes a checkpoint (e.g. ``python -m mrconvnext.convert``'s output): the model its
record names, with a fresh classifier when its class count is not ``--num-classes``.

``--dataset`` reads ImageNet as an image folder, webdataset tar shards, parquet files or a ``datasets``
``save_to_disk`` folder (:mod:`mrconvnext.data.images`). The run folder (``--output/--experiment``:
``args.yaml``, ``summary.csv``, ``checkpoints/``, ``last.pth``, ``model_best.pth``) and the run flags (mid-epoch
checkpoints, stop signals, resume, non-finite losses, the numbers logged) are those of
:mod:`mrconvnext.utils.training`; ``last.pth`` and ``model_best.pth`` record the model, its planned size and the
evaluation data config with the weights (:mod:`mrconvnext.utils.checkpoint`), so validate, export and plot need
no model flag.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_arch_name, is_model_in_modules, resolve_model_input_args
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import mrconvnext  # noqa: F401  (registers the MRConvNeXt models with timm)
from mrconvnext.data import DataFormatError
from mrconvnext.data import transforms as mrconvnext_transforms
from mrconvnext.data.images import DEFAULT_SHUFFLE_WINDOW, create_image_dataset, datasets_below, has_image
from mrconvnext.layers.mrconv import BRANCH_NORMS, MRConv
from mrconvnext.utils.checkpoint import (
    CheckpointError,
    ModelArgumentError,
    create_model_checked,
    create_model_from_checkpoint,
)
from mrconvnext.utils.cli import HelpFormatter, add_model_kwargs_argument, out_of_range
from mrconvnext.utils.optim import mrconv_param_groups
from mrconvnext.utils.training import PreflightError, TrainingRun, add_run_arguments, parse_args, run_main

# numeric flags checked before anything is built (mrconvnext.utils.cli.out_of_range); None (unset) is not checked
FLAG_RANGES = dict(
    positive=(
        "batch_size validation_batch_size grad_accum_steps epochs val_interval img_size crop_pct lr_base_size "
        "train_num_samples val_num_samples shard_shuffle_window recount"
    ).split(),
    non_negative=(
        "lr lr_base min_lr warmup_lr warmup_epochs weight_decay clip_grad opt_eps mixup cutmix color_jitter"
    ).split(),
    fractions="drop drop_path smoothing model_ema_decay".split(),
    probabilities="reprob mixup_prob mixup_switch_prob".split(),
)

# Stochastic depth of the ConvNeXt ImageNet-1k recipe per architecture (T/S/B/L from ConvNeXt's training
# commands; atto and nano are not in the paper: small models underfit ImageNet, so they get little or no drop
# path). Other models keep their own default.
RECIPE_DROP_PATH = {
    "convnext_tiny": 0.1,
    "convnext_small": 0.4,
    "convnext_base": 0.5,
    "convnext_large": 0.5,
    "mrconvnext_atto": 0.0,
    "mrconvnext_nano": 0.05,
    "mrconvnext_tiny": 0.1,
    "mrconvnext_small": 0.4,
    "mrconvnext_base": 0.5,
}
EVAL_KEYS = ("loss", "top1", "top5", "samples")


def create_parser() -> argparse.ArgumentParser:
    """Command line; flag names follow timm's ``train.py`` wherever it has one."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=HelpFormatter
    )
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", required=True, help="ImageNet-style folder (train/, val/) or a dataset root")
    group.add_argument(
        "--dataset",
        default="",
        help="format of --data-dir: '' an image folder, wds (tar shards), parquet, hfds (save_to_disk), or a timm name",
    )
    group.add_argument("--train-split", default="train")
    group.add_argument("--val-split", default="val", help="'validation' in the webdataset and parquet ImageNet copies")
    group.add_argument(
        "--train-num-samples", type=int, default=None, help="wds/parquet: samples per epoch (default: all)"
    )
    group.add_argument("--val-num-samples", type=int, default=None, help="wds/parquet: samples validated")
    group.add_argument(
        "--shard-shuffle-window",
        type=int,
        default=DEFAULT_SHUFFLE_WINDOW,
        help="wds/parquet: samples are shuffled within windows of this many consecutive samples of shuffled shards",
    )
    group.add_argument("--num-classes", type=int, default=1000)
    group.add_argument("--img-size", type=int, default=224, help="train and eval image size")
    group.add_argument("--crop-pct", type=float, default=None, help="eval center crop (default: model's)")
    group.add_argument("--mean", type=float, nargs=3, default=None)
    group.add_argument("--std", type=float, nargs=3, default=None)
    group.add_argument("--interpolation", default="", help="eval resize interpolation (default: model's)")
    group.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=128,
        help="batch of one update per process (global batch = this x processes; train_sequence.py's -b is global)",
    )
    group.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    group.add_argument("-j", "--workers", type=int, default=8, help="data loader workers per process")
    group.add_argument("--pin-mem", action="store_true")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="mrconvnext_tiny", help="registered timm model name, e.g. mrconvnext_atto")
    group.add_argument(
        "--pretrained-path",
        default="",
        help="fine-tune from this checkpoint (e.g. convert's output): its record builds the model, a classifier "
        "of another class count is a fresh one for --num-classes (timm's pretrained=True, num_classes=N)",
    )
    group.add_argument("--drop-path", type=float, default=None, help="default: recipe value per architecture")
    group.add_argument("--drop", type=float, default=0.0, help="head dropout")
    group.add_argument(
        "--layer-scale-init-value", type=float, default=None, help="ls_init_value (default: model's; ConvNeXt 1e-6)"
    )
    add_model_kwargs_argument(group)
    group.add_argument(
        "--branch-norm",
        choices=BRANCH_NORMS,
        default="batch",
        help="MRConv normalisation (MRConvNeXt): BatchNorm per resolution, or Eq. 9 rescaling (one conv per step)",
    )

    group = parser.add_argument_group("optimizer")
    group.add_argument("--opt", default="adamw")
    group.add_argument("--opt-eps", type=float, default=1e-8)
    group.add_argument("--opt-betas", type=float, nargs=2, default=None)
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--clip-grad", type=float, default=None, help="gradient clipping threshold (off)")
    group.add_argument("--clip-mode", default="norm", choices=("norm", "value"))
    group.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --lr-base scaling")
    group.add_argument("--lr-base", type=float, default=4e-3, help="lr at a global batch of --lr-base-size")
    group.add_argument("--lr-base-size", type=int, default=4096)
    group.add_argument("--lr-base-scale", default="linear", choices=("linear", "sqrt"))
    group.add_argument(
        "--kernel-lr", type=float, default=None, help="own lr for MRConv kernel parameters (LRA recipe; off)"
    )
    group.add_argument("--kernel-weight-decay", type=float, default=0.0, help="with --kernel-lr")
    group.add_argument("--grad-accum-steps", type=int, default=1)

    group = parser.add_argument_group("schedule")
    group.add_argument("--sched", default="cosine")
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--warmup-epochs", type=int, default=20)
    group.add_argument("--warmup-lr", type=float, default=0.0)
    group.add_argument("--min-lr", type=float, default=1e-6)
    group.add_argument("--sched-on-updates", action=argparse.BooleanOptionalAction, default=True)

    group = parser.add_argument_group("augmentation and regularization")
    group.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy; 'none' to disable")
    group.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random resized crop scale")
    group.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), help="random resized crop ratio")
    group.add_argument("--hflip", type=float, default=0.5)
    group.add_argument("--vflip", type=float, default=0.0)
    group.add_argument("--color-jitter", type=float, default=0.4, help="used only without --aa")
    group.add_argument("--train-interpolation", default="bicubic")
    group.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    group.add_argument("--remode", default="pixel")
    group.add_argument("--recount", type=int, default=1)
    group.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0 disables)")
    group.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0 disables)")
    group.add_argument("--mixup-prob", type=float, default=1.0)
    group.add_argument("--mixup-switch-prob", type=float, default=0.5)
    group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    group.add_argument("--smoothing", type=float, default=0.1)
    group.add_argument(
        "--model-ema", action=argparse.BooleanOptionalAction, default=True, help="keep an EMA of the weights"
    )
    group.add_argument("--model-ema-decay", type=float, default=0.9999)

    group = parser.add_argument_group("imagenet run")
    group.add_argument("--channels-last", action="store_true")
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend")
    group.add_argument("--val-interval", type=int, default=1, help="validate every N epochs (and after the last)")
    add_run_arguments(parser, output="output/train")
    return parser


# ----------------------------------------------------------------------------------------------- pre-flight


def _dataset_hint(data_dir: str) -> str:
    """Where the dataset is when ``data_dir`` holds one (``demo_output`` holding ``shapes/``), else ''."""
    nested = datasets_below(data_dir)
    return f"; {data_dir!r} holds a dataset: pass --data-dir {nested[0]}" if nested else ""


def _check_image_folder(data_dir: str, split: str) -> list[str]:
    """The class folders of ``data_dir/split``; raises unless every one holds images."""
    split_dir = os.path.join(data_dir, split)
    if not os.path.isdir(split_dir):
        raise PreflightError(
            f"data directory {data_dir!r} has no {split!r} folder (expected {split_dir}/<class>/*.jpg)"
            + _dataset_hint(data_dir)
        )
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    empty = [c for c in classes if not has_image(os.path.join(split_dir, c))]
    if len(empty) == len(classes):
        raise PreflightError(
            f"{split_dir!r} is empty: expected one folder of images per class{_dataset_hint(data_dir)}"
        )
    if empty:
        raise PreflightError(f"class folders without images in {split_dir!r}: {', '.join(empty[:5])}")
    return classes


def preflight(args: argparse.Namespace) -> None:
    """Check model, batch and data before anything is built."""
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=8, cutoff=0.75)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise PreflightError(f"unknown model {args.model!r}{hint}")
    problem = out_of_range(args, **FLAG_RANGES)
    if problem:
        raise PreflightError(problem)
    (smallest, largest), (narrowest, widest) = args.scale, args.ratio
    if not 0 < smallest <= largest <= 1:
        raise PreflightError(f"--scale {smallest} {largest}: expected 0 < min <= max <= 1 (shares of the image area)")
    if not 0 < narrowest <= widest:
        raise PreflightError(f"--ratio {narrowest} {widest}: expected 0 < min <= max (crop aspect ratios)")
    if args.batch_size % args.grad_accum_steps:
        raise PreflightError(
            f"--batch-size {args.batch_size} is not divisible by --grad-accum-steps {args.grad_accum_steps}"
        )
    if "checkpoint_path" in args.model_kwargs:
        raise PreflightError(
            "--model-kwargs checkpoint_path=... loads strictly (the same class count and form only): pass "
            f"--pretrained-path {args.model_kwargs['checkpoint_path']} to fine-tune from it"
        )
    if args.branch_norm != "batch" and not is_model_in_modules(args.model, ["mrconvnext"]):
        raise PreflightError(f"--branch-norm {args.branch_norm} needs an MRConvNeXt model, got {args.model!r}")
    micro_batch = args.batch_size // args.grad_accum_steps
    if (args.mixup > 0 or args.cutmix > 0) and micro_batch % 2:
        raise PreflightError(f"mixup/cutmix need an even micro-batch, got {micro_batch} (batch size / accum steps)")
    if args.dataset not in ("", "hfds"):
        return  # shard formats: their readers name the missing or malformed file (create_loaders)
    if not os.path.isdir(args.data_dir):
        raise PreflightError(f"data directory {args.data_dir!r} does not exist")
    if not os.listdir(args.data_dir):
        raise PreflightError(f"data directory {args.data_dir!r} is empty")
    if not args.dataset:
        train_classes = _check_image_folder(args.data_dir, args.train_split)
        if len(train_classes) != args.num_classes:
            raise PreflightError(
                f"{os.path.join(args.data_dir, args.train_split)!r} has {len(train_classes)} class folders but "
                f"--num-classes is {args.num_classes}; pass --num-classes {len(train_classes)} or fix the folder layout"
            )
        val_classes = _check_image_folder(args.data_dir, args.val_split)
        if train_classes != val_classes:
            missing = (
                (args.val_split, sorted(set(train_classes) - set(val_classes))),
                (args.train_split, sorted(set(val_classes) - set(train_classes))),
            )
            details = "; ".join(f"missing in {split!r}: {', '.join(names[:5])}" for split, names in missing if names)
            raise PreflightError(
                f"class folders differ between {args.train_split!r} and {args.val_split!r} in {args.data_dir!r}: "
                f"{details}"
            )


# -------------------------------------------------------------------------------------------------- helpers


def resolve_drop_path(args: argparse.Namespace) -> float | None:
    """``--drop-path``, else the recipe value of the model's architecture (None: the model's own default)."""
    if args.drop_path is not None:
        return args.drop_path
    return RECIPE_DROP_PATH.get(get_arch_name(args.model))


def resolve_lr(args: argparse.Namespace, global_batch: int) -> float:
    """``--lr``, else ``--lr-base`` scaled (linearly by default) from ``--lr-base-size`` to ``global_batch``."""
    if args.lr is not None:
        return args.lr
    ratio = global_batch / args.lr_base_size
    return args.lr_base * (ratio if args.lr_base_scale == "linear" else math.sqrt(ratio))


def describe_lr(args: argparse.Namespace, global_batch: int, lr: float) -> str:
    """Where the peak learning rate comes from, for the log."""
    if args.lr is not None:
        return f"lr {lr:.3e} (--lr)"
    ratio = f"global batch {global_batch} / --lr-base-size {args.lr_base_size}"
    scaled = ratio if args.lr_base_scale == "linear" else f"sqrt({ratio})"
    return f"lr {lr:.3e} = --lr-base {args.lr_base} x {scaled} ({args.lr_base_scale})"


def schedule_warnings(args: argparse.Namespace, num_epochs: int, total_updates: int) -> list[str]:
    """Settings under which a (short) run cannot learn what the flags suggest."""
    warnings = []
    if args.warmup_epochs >= num_epochs:
        warnings.append(
            f"--warmup-epochs {args.warmup_epochs} >= --epochs {num_epochs}: the lr rises from --warmup-lr "
            f"{args.warmup_lr} for the whole run and never reaches its peak; lower --warmup-epochs for a short run"
        )
    if args.model_ema and total_updates * (1 - args.model_ema_decay) < 1:
        warnings.append(
            f"--model-ema-decay {args.model_ema_decay} averages over about {1 / (1 - args.model_ema_decay):.0f} "
            f"updates but the run has {total_updates}: the EMA weights (state_dict_ema, which timm loads first) "
            "stay close to the initial ones; lower --model-ema-decay or pass --no-model-ema for a short run"
        )
    return warnings


def create_model(args: argparse.Namespace) -> nn.Module:
    """``timm.create_model`` with the recipe's drop path; arguments left at None keep the model's defaults.

    Models built for one input size (pretrained cfg ``fixed_input_size``: MRConvNeXt, whose kernels are planned
    for the training sequence lengths) get ``img_size=--img-size`` by timm's rule (``resolve_model_input_args``).
    MRConvNeXt also gets ``--branch-norm``.
    """
    kwargs = dict(
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=resolve_drop_path(args),
        ls_init_value=args.layer_scale_init_value,
    )
    kwargs.update(args.model_kwargs)
    if is_model_in_modules(args.model, ["mrconvnext"]):
        kwargs["mrconv_kwargs"] = {**kwargs.get("mrconv_kwargs", {}), "branch_norm": args.branch_norm}
    kwargs = resolve_model_input_args(args.model, {"img_size": args.img_size}, **kwargs)
    try:
        return load_pretrained(args, **kwargs) if args.pretrained_path else create_model_checked(**kwargs)
    except ModelArgumentError as e:
        raise PreflightError(f"--model-kwargs: {e}") from e


def load_pretrained(args: argparse.Namespace, model_name: str, **kwargs) -> nn.Module:
    """``--pretrained-path``: the checkpoint's model (its recorded arguments, overridden by this run's) with its
    weights, through :func:`~mrconvnext.utils.checkpoint.create_model_from_checkpoint`; its classifier replaced by a
    fresh one (``reset_classifier``) when the checkpoint has another class count than ``--num-classes``."""
    kwargs = {k: v for k, v in kwargs.items() if k != "num_classes" and v is not None}
    try:
        model = create_model_from_checkpoint(args.pretrained_path, model_name, **kwargs)
    except (CheckpointError, FileNotFoundError) as e:
        raise PreflightError(f"--pretrained-path: {e}") from e
    if model.num_classes != args.num_classes:
        model.reset_classifier(args.num_classes)
    return model.train()


def create_train_transform(args: argparse.Namespace, data_config: dict):
    """The recipe's training augmentation: random resized crop, flip, RandAugment, random erasing (timm)."""
    return mrconvnext_transforms.create_train_transform(
        data_config["input_size"],
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=None if args.aa.lower() == "none" else args.aa,
        interpolation=args.train_interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
    )


def create_loaders(
    args: argparse.Namespace, data_config: dict, accelerator: Accelerator
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """The ``--dataset`` format's datasets (:func:`mrconvnext.data.images.create_image_dataset`) with timm's
    transforms in plain DataLoaders; ``TrainingRun.prepare`` shards them (sharded formats shard themselves)."""
    micro_batch = args.batch_size // args.grad_accum_steps
    val_batch = args.validation_batch_size or micro_batch
    common = dict(
        root=args.data_dir, seed=args.seed, shuffle_window=args.shard_shuffle_window, num_classes=args.num_classes
    )
    try:
        train_set = create_image_dataset(
            args.dataset,
            split=args.train_split,
            train=True,
            transform=create_train_transform(args, data_config),
            batch_size=micro_batch,
            num_samples=args.train_num_samples,
            **common,
        )
        val_set = create_image_dataset(
            args.dataset,
            split=args.val_split,
            train=False,
            transform=create_transform(**data_config, is_training=False),
            batch_size=val_batch,
            num_samples=args.val_num_samples,
            **common,
        )
    except DataFormatError as err:
        raise PreflightError(str(err)) from err
    sharded = getattr(train_set, "shards_over_processes", False)
    images = train_set.num_samples if sharded else len(train_set)
    if (len(train_set) if sharded else images // accelerator.num_processes) < micro_batch:
        raise PreflightError(
            f"{images} training images are fewer than one global micro-batch "
            f"({micro_batch} x {accelerator.num_processes} processes)"
        )
    loader = dict(num_workers=args.workers, pin_memory=args.pin_mem, persistent_workers=False)
    # a sharded dataset shuffles itself (and a DataLoader refuses shuffle=True for an iterable dataset)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=micro_batch, shuffle=not sharded, drop_last=True, **loader
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=val_batch, shuffle=False, **loader)
    return train_loader, val_loader


# ------------------------------------------------------------------------------------------------------ main


def resume_meta(args: argparse.Namespace) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    keys = ("model", "num_classes", "img_size", "branch_norm", "model_kwargs", "model_ema")
    return {key: getattr(args, key) for key in keys}


def train(argv: Sequence[str] | None = None) -> dict:
    """Train; returns the last epoch's metrics row."""
    args = parse_args(create_parser(), argv)
    preflight(args)
    with TrainingRun(
        args,
        name=f"{args.model.replace('/', '_')}-{args.img_size}",
        resume_meta=resume_meta(args),
        unit="img",
        gradient_accumulation_steps=args.grad_accum_steps,
        dynamo_plugin=TorchDynamoPlugin(backend=args.torchcompile) if args.torchcompile else None,
    ) as run:
        return _train(args, run)


def _train(args: argparse.Namespace, run: TrainingRun) -> dict:
    accelerator = run.accelerator
    global_batch = args.batch_size * accelerator.num_processes
    lr = resolve_lr(args, global_batch)
    model = run.sync_batchnorm(create_model(args))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(
        {
            "input_size": (3, args.img_size, args.img_size),
            "crop_pct": args.crop_pct,
            "mean": args.mean,
            "std": args.std,
            "interpolation": args.interpolation,
        },
        model=model,
    )
    if args.kernel_lr is not None and not any(isinstance(m, MRConv) for m in model.modules()):
        raise PreflightError(f"--kernel-lr given but {args.model} has no MRConv layers")
    train_loader, val_loader = create_loaders(args, data_config, accelerator)
    optimizer = create_optimizer_v2(
        model,
        opt=args.opt,
        lr=lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        eps=args.opt_eps,
        **({"betas": tuple(args.opt_betas)} if args.opt_betas else {}),
        param_group_fn=(
            (lambda m: mrconv_param_groups(m, args.weight_decay, args.kernel_lr, args.kernel_weight_decay))
            if args.kernel_lr is not None
            else None
        ),
    )
    model, optimizer, train_loader, val_loader = run.prepare(model, optimizer, train_loader, val_loader)
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
        min_lr=args.min_lr,
        step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    model_ema = ModelEmaV3(accelerator.unwrap_model(model), decay=args.model_ema_decay) if args.model_ema else None
    start_epoch = run.restore(lr_scheduler, *([model_ema] if model_ema else []))

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=args.num_classes,
        )
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    def images_of(images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if args.channels_last else images

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
        images, targets = batch
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        return train_loss_fn(model(images_of(images)), targets), images.shape[0], {}

    def classify(net: nn.Module) -> Callable:
        return lambda batch: (net(images_of(batch[0])), batch[1])

    def update_ema(num_updates: int) -> None:
        model_ema.update(accelerator.unwrap_model(model), step=num_updates)

    run.write_config(
        global_batch,
        lr=lr,
        drop_path=resolve_drop_path(args),
        micro_batch=args.batch_size // args.grad_accum_steps,
        updates_per_epoch=updates_per_epoch,
        data_config=data_config,
    )
    num_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    images = len(train_loader) * (args.batch_size // args.grad_accum_steps) * accelerator.num_processes
    run.log(f"model {args.model}: {num_params / 1e6:.2f}M parameters, {images} training images per epoch")
    run.log(describe_lr(args, global_batch, lr) + f", {args.warmup_epochs} warmup epochs, {args.sched} schedule")
    for warning in schedule_warnings(args, num_epochs, updates_per_epoch * num_epochs):
        run.log(f"warning: {warning}")

    row: dict = {}
    for epoch in range(start_epoch, num_epochs):
        train_metrics = run.train_one_epoch(
            epoch,
            model,
            train_loader,
            optimizer,
            lr_scheduler,
            loss_fn,
            updates_per_epoch,
            clip_grad=args.clip_grad,
            clip_mode=args.clip_mode,
            on_update=update_ema if model_ema is not None else None,
        )
        run.distribute_bn(model)
        row = {"epoch": epoch + 1, **{k: v for k, v in train_metrics.items() if k != "updates_per_rank"}}
        validate = (epoch + 1) % args.val_interval == 0 or epoch + 1 == num_epochs
        # the same CSV columns every epoch: empty where this epoch was not validated
        for prefix, net in (("eval", model), ("ema", model_ema.module if model_ema is not None else None)):
            if net is not None:
                metrics = run.evaluate(net, val_loader, classify(net)) if validate else dict.fromkeys(EVAL_KEYS)
                row.update({f"{prefix}_{k}": v for k, v in metrics.items()})
        lr_scheduler.step(epoch + 1)
        saved = run.end_epoch(
            epoch,
            row,
            model,
            metric=row["eval_top1"] if validate else None,
            model_ema=model_ema.module if model_ema is not None else None,
            data_config=data_config,
        )
        summary = (
            f"epoch {epoch + 1}/{num_epochs}: train loss {row['train_loss']:.4f}, lr {row['lr']:.3e}, "
            f"{row['samples_s']:.1f} img/s, updates/rank {train_metrics['updates_per_rank']}, "
            f"ETA {timedelta(seconds=round(row['eta_run_s']))}"
        )
        if validate:
            summary += f" | val loss {row['eval_loss']:.4f}, top-1 {row['eval_top1']:.2f}, top-5 {row['eval_top5']:.2f}"
        if validate and model_ema is not None:
            summary += f" | EMA top-1 {row['ema_top1']:.2f}"
        run.log(f"{summary} | saved {saved}")

    run.log(f"best top-1 {run.state.best_top1:.2f} at epoch {run.state.best_epoch}; model files in {run.run_dir}")
    return row


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(train, argv, "train_imagenet.py")


if __name__ == "__main__":
    sys.exit(main())
