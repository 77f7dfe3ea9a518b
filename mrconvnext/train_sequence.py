"""Train and evaluate the MRConv sequence models on LRA, sCIFAR and Speech Commands with the paper's recipes.

One command per row of the paper's Tables 1 and 3; ``--task`` picks the reader (``mrconvnext.data``), the
model (``mrconv_<task>_base`` unless ``--model`` says otherwise) and the recipe of Tables 5/6 (Appendix D.1):
AdamW with a global learning rate and weight decay, the MRConv kernel parameters at lr 0.001 without weight
decay (``mrconv_param_groups``), cosine schedule with linear warmup. Every recipe value can be overridden by
its flag. Devices, mixed precision and several processes come from accelerate, so the script runs under
``python``, ``torchrun`` and ``accelerate launch``::

    python train_sequence.py --task listops --data-dir /data/lra_release/listops-1000
    python -m mrconvnext.train_sequence ...   # the same, from an installed package

``-b/--batch-size`` is the global batch of one update (the papers' figure), split evenly over the processes.
At the end, the weights of the best validation epoch are evaluated on the test split in the train form and
in the reparameterized form (one long kernel per layer; the accuracies agree), and for Speech Commands also
zero-shot at 8 kHz (test clips decimated by 2, Fourier kernels resampled with ``rate=2``; Table 3(b)).

The run folder (``--output/--experiment``) and the run flags are those of :mod:`mrconvnext.utils.training`
(``args.yaml`` with the resolved recipe, ``summary.csv``, ``checkpoints/``, ``last.pth``, ``model_best.pth``),
plus ``results.json``: the test accuracies (train form, reparameterized form, 8 kHz for speech).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

import timm
import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler
from timm.utils import reparameterize_model

import mrconvnext  # noqa: F401  (registers the models with timm)
from mrconvnext.data import TASKS, DataFormatError, create_dataset
from mrconvnext.layers.mrconv import BRANCH_NORMS
from mrconvnext.utils.checkpoint import ModelArgumentError, create_model_checked, read_checkpoint
from mrconvnext.utils.cli import HelpFormatter, add_model_kwargs_argument, out_of_range
from mrconvnext.utils.files import atomic_path
from mrconvnext.utils.optim import mrconv_param_groups
from mrconvnext.utils.training import PreflightError, TrainingRun, add_run_arguments, parse_args, run_main

# numeric flags checked before anything is built (mrconvnext.utils.cli.out_of_range); None (unset) is not checked
FLAG_RANGES = dict(
    positive="lr kernel_lr batch_size epochs seq_len".split(),
    non_negative="weight_decay kernel_weight_decay warmup_epochs min_lr clip_grad".split(),
    fractions=["drop"],
)

# Tables 5 and 6 (identical in these columns for the base and large models): global lr, weight decay, batch
# size and epochs per task; the kernel lr is 0.001 without weight decay throughout (Appendix D.1.1).
RECIPES = {
    "listops": dict(lr=0.003, weight_decay=0.05, batch_size=50, epochs=40),
    "text": dict(lr=0.005, weight_decay=0.05, batch_size=16, epochs=32),
    "retrieval": dict(lr=0.003, weight_decay=0.05, batch_size=64, epochs=20),
    "image": dict(lr=0.0045, weight_decay=0.05, batch_size=50, epochs=200),
    "pathfinder": dict(lr=0.005, weight_decay=0.03, batch_size=64, epochs=200),
    "pathx": dict(lr=0.004, weight_decay=0.03, batch_size=16, epochs=50),
    "scifar": dict(lr=0.0045, weight_decay=0.05, batch_size=50, epochs=300),
    "speech": dict(lr=0.005, weight_decay=0.05, batch_size=16, epochs=40),
}
KERNEL_LR = 0.001
TOKEN_TASKS = ("listops", "text", "retrieval")
ZERO_SHOT_RATE = 2  # Speech Commands at 8 kHz: every second sample of the 16 kHz clips


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=HelpFormatter
    )
    group = parser.add_argument_group("task and data")
    group.add_argument("--task", required=True, choices=TASKS)
    group.add_argument("--data-dir", required=True, help="the task's data in its public release layout")
    group.add_argument("-j", "--workers", type=int, default=2, help="data loader workers per process")

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help="registered sequence model, e.g. mrconv_listops_base (default: mrconv_<task>_base)",
    )
    group.add_argument(
        "--seq-len", type=int, default=None, help="token tasks: pad/cut to this length (default: the model's)"
    )
    group.add_argument("--drop", type=float, default=None, help="block dropout (default: the config's, Tables 5/6)")
    group.add_argument(
        "--branch-norm",
        choices=BRANCH_NORMS,
        default="batch",
        help="MRConv branch normalization: BatchNorm per resolution (paper) or a learned scale",
    )
    add_model_kwargs_argument(group)

    group = parser.add_argument_group("recipe (default: the task's row of Tables 5/6)")
    group.add_argument("--lr", type=float, default=None)
    group.add_argument("--weight-decay", type=float, default=None)
    group.add_argument("--kernel-lr", type=float, default=KERNEL_LR, help="MRConv kernel parameters' lr")
    group.add_argument("--kernel-weight-decay", type=float, default=0.0)
    group.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=None,
        help="global batch of one update, over all processes together (the paper's figure; train_imagenet.py's -b "
        "is per process)",
    )
    group.add_argument("--epochs", type=int, default=None)
    group.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup from 0 (S5's LRA scripts)")
    group.add_argument("--min-lr", type=float, default=0.0, help="cosine schedule's final lr")
    group.add_argument("--clip-grad", type=float, default=None, help="gradient norm clipping threshold (off)")

    add_run_arguments(parser, output="output/sequence")
    return parser


def resolve_recipe(args: argparse.Namespace) -> None:
    """Fill the unset recipe flags and ``--model`` from the task's row of Tables 5/6."""
    args.model = args.model or f"mrconv_{args.task}_base"
    for key, value in RECIPES[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ----------------------------------------------------------------------------------------------- pre-flight

RESUME_KEYS = ("task", "model", "seq_len", "branch_norm", "batch_size", "epochs")


def resume_meta(args: argparse.Namespace) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {key: getattr(args, key) for key in RESUME_KEYS} | {"model_kwargs": model_kwargs(args)}


def model_kwargs(args: argparse.Namespace) -> dict:
    """``timm.create_model`` keyword arguments of this run (also stored in the model files)."""
    kwargs = dict(args.model_kwargs)
    kwargs["mrconv_kwargs"] = {**kwargs.get("mrconv_kwargs", {}), "branch_norm": args.branch_norm}
    if args.seq_len is not None:
        kwargs["seq_len"] = args.seq_len
    if args.drop is not None:
        kwargs["drop_rate"] = args.drop
    return kwargs


def preflight(args: argparse.Namespace) -> dict:
    """Check flags and data before any model is built; returns the splits."""
    task_models = timm.list_models(f"mrconv_{args.task}_*")
    if args.model not in task_models:
        raise PreflightError(f"--model {args.model!r} is not a {args.task} model; expected one of {task_models}")
    problem = out_of_range(args, **FLAG_RANGES)
    if problem:
        raise PreflightError(problem)
    if args.seq_len is not None and args.task not in TOKEN_TASKS:
        raise PreflightError(f"--seq-len applies to the token tasks {TOKEN_TASKS}; {args.task} has a fixed length")
    config = timm.models.get_pretrained_cfg(args.model)
    seq_len = args.seq_len or math.prod(config.input_size[1:])
    try:
        splits = {split: create_dataset(args.task, args.data_dir, split, seq_len) for split in ("train", "val", "test")}
        if args.task == "speech":
            splits["test_8khz"] = create_dataset(args.task, args.data_dir, "test", seq_len, decimate=ZERO_SHOT_RATE)
    except DataFormatError as err:
        raise PreflightError(str(err)) from err
    num_classes, outputs = splits["train"].num_classes, args.model_kwargs.get("num_classes", config.num_classes)
    if outputs != num_classes:
        raise PreflightError(f"{args.model} would have {outputs} outputs but {args.task} has {num_classes} classes")
    return splits


# ------------------------------------------------------------------------------------------- train / eval


def evaluate(run: TrainingRun, model: nn.Module, loader, rate: float = 1.0) -> dict:
    """Loss and accuracy over a split (``rate``: Fourier kernels resampled, Section 5.3)."""

    def forward(batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths, targets = batch
        return model(x, lengths=lengths, rate=rate), targets

    metrics = run.evaluate(model, loader, forward, topk=(1,))
    return {"loss": metrics["loss"], "acc": metrics["top1"], "samples": metrics["samples"]}


def test_model(run: TrainingRun, model: nn.Module, loaders: dict) -> dict:
    """Test accuracy of ``model`` (eval mode) in its train form, reparameterized, and at 8 kHz for speech."""
    results = {"test_acc": evaluate(run, model, loaders["test"])["acc"]}
    if "test_8khz" in loaders:  # resampled Fourier kernels: the train form only
        results["test_acc_8khz"] = evaluate(run, model, loaders["test_8khz"], rate=ZERO_SHOT_RATE)["acc"]
    deployed = reparameterize_model(run.accelerator.unwrap_model(model))
    results["test_acc_reparameterized"] = evaluate(run, deployed, loaders["test"])["acc"]
    return results


# ------------------------------------------------------------------------------------------------------ main


def train(argv: Sequence[str] | None = None) -> dict:
    """Train, then test; returns the test results."""
    args = parse_args(create_parser(), argv)
    resolve_recipe(args)
    splits = preflight(args)
    with TrainingRun(args, name=args.model, resume_meta=resume_meta(args)) as run:
        return _train(args, run, splits)


def _train(args: argparse.Namespace, run: TrainingRun, splits: dict) -> dict:
    accelerator = run.accelerator
    if args.batch_size % accelerator.num_processes:
        raise PreflightError(
            f"--batch-size {args.batch_size} (global) is not divisible by {accelerator.num_processes} processes"
        )
    local_batch = args.batch_size // accelerator.num_processes
    if len(splits["train"]) < args.batch_size:
        raise PreflightError(f"{len(splits['train'])} training examples are fewer than one batch ({args.batch_size})")

    kwargs = model_kwargs(args)
    try:
        model = run.sync_batchnorm(create_model_checked(args.model, **kwargs))
    except ModelArgumentError as e:
        raise PreflightError(f"--model-kwargs: {e}") from e
    param_groups = mrconv_param_groups(model, args.weight_decay, args.kernel_lr, args.kernel_weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr)
    common = dict(num_workers=args.workers, persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(
        splits["train"], batch_size=local_batch, shuffle=True, drop_last=True, **common
    )
    eval_loaders = {
        name: torch.utils.data.DataLoader(dataset, batch_size=local_batch, shuffle=False, **common)
        for name, dataset in splits.items()
        if name != "train"
    }
    model, optimizer, train_loader, *prepared = run.prepare(model, optimizer, train_loader, *eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, prepared, strict=True))
    updates_per_epoch = len(train_loader)
    lr_scheduler = CosineLRScheduler(
        optimizer,
        t_initial=args.epochs * updates_per_epoch,
        lr_min=args.min_lr,
        warmup_t=round(args.warmup_epochs * updates_per_epoch),
        warmup_lr_init=0.0,
        t_in_epochs=False,
    )
    start_epoch = run.restore(lr_scheduler)
    loss = nn.CrossEntropyLoss()

    def loss_fn(batch: tuple) -> tuple[torch.Tensor, int, dict]:
        x, lengths, targets = batch
        logits = model(x, lengths=lengths)
        return loss(logits, targets), targets.shape[0], {"acc": 100.0 * (logits.argmax(dim=1) == targets).sum()}

    run.write_config(
        args.batch_size, model_kwargs=kwargs, per_process_batch=local_batch, updates_per_epoch=updates_per_epoch
    )
    num_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    recipe = ", ".join(f"{k} {getattr(args, k)}" for k in ("lr", "weight_decay", "kernel_lr", "batch_size", "epochs"))
    run.log(
        f"{args.task}: {args.model} ({num_params / 1e6:.3f}M parameters), recipe: {recipe}, warmup "
        f"{args.warmup_epochs} epoch(s), cosine to {args.min_lr}, dropout {accelerator.unwrap_model(model).drop_rate}, "
        f"branch norm {args.branch_norm}; {', '.join(f'{k} {len(v)}' for k, v in splits.items())} examples"
    )
    for epoch in range(start_epoch, args.epochs):
        metrics = run.train_one_epoch(
            epoch, model, train_loader, optimizer, lr_scheduler, loss_fn, updates_per_epoch, clip_grad=args.clip_grad
        )
        run.distribute_bn(model)
        row = {"epoch": epoch + 1, **{k: v for k, v in metrics.items() if k != "updates_per_rank"}}
        row.update({f"val_{k}": v for k, v in evaluate(run, model, eval_loaders["val"]).items()})
        saved = run.end_epoch(epoch, row, model, metric=row["val_acc"], task=args.task)
        run.log(
            f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}, acc {row['train_acc']:.2f}, "
            f"lr {row['lr']:.3e}, {row['samples_s']:.1f} samples/s | val loss {row['val_loss']:.4f}, "
            f"acc {row['val_acc']:.2f} | saved {saved}"
        )

    accelerator.wait_for_everyone()
    best = read_checkpoint(os.path.join(run.run_dir, "model_best.pth"))
    accelerator.unwrap_model(model).load_state_dict(best.state_dict)
    results = {
        "best_epoch": run.state.best_epoch,
        "val_acc": run.state.best_top1,
        **test_model(run, model, eval_loaders),
    }
    if accelerator.is_main_process:
        with atomic_path(os.path.join(run.run_dir, "results.json")) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
    zero_shot = f", 8 kHz zero-shot {results['test_acc_8khz']:.2f}" if "test_acc_8khz" in results else ""
    run.log(
        f"test accuracy (epoch {run.state.best_epoch}, best val {run.state.best_top1:.2f}): train form "
        f"{results['test_acc']:.2f}, reparameterized {results['test_acc_reparameterized']:.2f}{zero_shot}; "
        f"files in {run.run_dir}"
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(train, argv, "train_sequence.py")


if __name__ == "__main__":
    sys.exit(main())
