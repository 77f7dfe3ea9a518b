#!/usr/bin/env python3
"""Train and evaluate the MRConv sequence models on LRA, sCIFAR and Speech Commands with the paper's recipes.

One command per row of the paper's Tables 1 and 3; ``--task`` picks the reader (``mrconvnext.data``), the
model (``mrconv_<task>_base`` unless ``--model`` says otherwise) and the recipe of Tables 5/6 (Appendix D.1):
AdamW with a global learning rate and weight decay, the MRConv kernel parameters at lr 0.001 without weight
decay (``mrconv_param_groups``), cosine schedule with linear warmup. Every recipe value can be overridden by
its flag. Devices, mixed precision and several processes come from accelerate, so the script runs under
``python``, ``torchrun`` and ``accelerate launch``::

    python train_sequence.py --task listops --data-dir /data/lra_release/listops-1000

``-b/--batch-size`` is the global batch of one update (the papers' figure), split evenly over the processes.
At the end, the weights of the best validation epoch are evaluated on the test split in the train form and
in the reparameterized form (one long kernel per layer; the accuracies agree), and for Speech Commands also
zero-shot at 8 kHz (test clips decimated by 2, Fourier kernels resampled with ``rate=2``; Table 3(b)).

Output directory layout (``--output/--experiment``)::

    args.yaml                 run configuration and recipe
    summary.csv               one row per epoch (train loss/accuracy, val loss/accuracy, lr, time)
    checkpoints/epoch_NNNN/   accelerate state after NNNN epochs, renamed into place when complete
    last.pth, model_best.pth  plain {'state_dict', 'arch', 'model_kwargs', ...} files for timm.create_model
    results.json              test accuracies (train form, reparameterized form, 8 kHz for speech)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime

import timm
import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from timm.scheduler import CosineLRScheduler
from timm.utils import ParseKwargs
from tqdm.auto import tqdm

import mrconvnext  # noqa: F401  (registers the models with timm)
from mrconvnext.data import TASKS, DataFormatError, create_dataset
from mrconvnext.evaluation import MetricSums, sample_metrics
from mrconvnext.optim import mrconv_param_groups
from mrconvnext.training import (
    CSV_FILE,
    META_FILE,
    MetricsLog,
    PreflightError,
    TrainState,
    atomic_torch_save,
    find_checkpoint,
    save_checkpoint,
)

_logger = get_logger("train_sequence")

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    group = parser.add_argument_group("task and data")
    group.add_argument("--task", required=True, choices=TASKS)
    group.add_argument("--data-dir", required=True, help="the task's data in its public release layout")
    group.add_argument("-j", "--workers", type=int, default=2, help="data loader workers per process")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="default: mrconv_<task>_base")
    group.add_argument(
        "--seq-len", type=int, default=None, help="token tasks: pad/cut to this length (default: the model's)"
    )
    group.add_argument("--drop", type=float, default=None, help="block dropout (default: the config's, Tables 5/6)")
    group.add_argument(
        "--mrconv-norm",
        choices=("batch", "scale"),
        default="batch",
        help="MRConv branch normalization: BatchNorm per resolution (paper) or a learned scale",
    )
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="extra create_model kwargs")

    group = parser.add_argument_group("recipe (default: the task's row of Tables 5/6)")
    group.add_argument("--lr", type=float, default=None)
    group.add_argument("--weight-decay", type=float, default=None)
    group.add_argument("--kernel-lr", type=float, default=KERNEL_LR, help="MRConv kernel parameters' lr")
    group.add_argument("--kernel-weight-decay", type=float, default=0.0)
    group.add_argument("-b", "--batch-size", type=int, default=None, help="global batch of one update")
    group.add_argument("--epochs", type=int, default=None)
    group.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup from 0 (S5's LRA scripts)")
    group.add_argument("--min-lr", type=float, default=0.0, help="cosine schedule's final lr")
    group.add_argument("--clip-grad", type=float, default=None, help="gradient norm clipping threshold (off)")

    group = parser.add_argument_group("run")
    group.add_argument(
        "--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="default: accelerate config"
    )
    group.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is available")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--log-interval", type=int, default=10, help="progress bar postfix every N updates")
    group.add_argument("--output", default="output/sequence", help="base directory of experiment folders")
    group.add_argument("--experiment", default="", help="experiment folder name (default: time-model)")
    group.add_argument("--resume", default="", help="checkpoint folder, or a run folder to resume its latest one")
    group.add_argument("--checkpoint-hist", type=int, default=1, help="epoch checkpoints kept")
    return parser


def resolve_recipe(args: argparse.Namespace) -> None:
    """Fill the unset recipe flags and ``--model`` from the task's row of Tables 5/6."""
    args.model = args.model or f"mrconv_{args.task}_base"
    for key, value in RECIPES[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ----------------------------------------------------------------------------------------------- pre-flight

RESUME_KEYS = ("task", "model", "seq_len", "mrconv_norm", "batch_size", "epochs")


def resume_meta(args: argparse.Namespace) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint (JSON values, as in ``meta.json``)."""
    meta = {key: getattr(args, key) for key in RESUME_KEYS} | {"model_kwargs": model_kwargs(args)}
    return json.loads(json.dumps(meta))


def model_kwargs(args: argparse.Namespace) -> dict:
    """``timm.create_model`` keyword arguments of this run (also stored in the model files)."""
    kwargs = dict(args.model_kwargs)
    kwargs["mrconv_kwargs"] = {**kwargs.get("mrconv_kwargs", {}), "norm": args.mrconv_norm}
    if args.seq_len is not None:
        kwargs["seq_len"] = args.seq_len
    if args.drop is not None:
        kwargs["drop_rate"] = args.drop
    return kwargs


def preflight(args: argparse.Namespace) -> tuple[dict, str | None]:
    """Check flags, data and resume checkpoint before any model is built; returns the splits and the checkpoint."""
    task_models = timm.list_models(f"mrconv_{args.task}_*")
    if args.model not in task_models:
        raise PreflightError(f"--model {args.model!r} is not a {args.task} model; expected one of {task_models}")
    for name in ("lr", "kernel_lr", "batch_size", "epochs", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise PreflightError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
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
    if not args.resume:
        return splits, None
    checkpoint = find_checkpoint(args.resume)
    with open(os.path.join(checkpoint, META_FILE)) as f:
        meta = json.load(f)
    for key, value in resume_meta(args).items():
        if meta.get(key) != value:
            raise PreflightError(
                f"--resume {checkpoint!r} was trained with --{key.replace('_', '-')} {meta.get(key)}, this run has {value}"
            )
    return splits, checkpoint


# ------------------------------------------------------------------------------------------- train / eval


def train_one_epoch(
    epoch: int,
    model: nn.Module,
    loader,
    optimizer,
    lr_scheduler,
    accelerator: Accelerator,
    args: argparse.Namespace,
    updates_per_epoch: int,
) -> dict:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    num_updates = epoch * updates_per_epoch
    loss_sum = torch.zeros((), device=accelerator.device)
    hits = torch.zeros((), device=accelerator.device)
    updates = samples = 0
    start = time.perf_counter()
    progress = tqdm(
        total=updates_per_epoch,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
        mininterval=2.0,
    )
    for x, lengths, targets in loader:
        logits = model(x, lengths=lengths)
        loss = loss_fn(logits, targets)
        accelerator.backward(loss)
        if args.clip_grad is not None:
            accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
        hits += (logits.detach().argmax(dim=1) == targets).sum()
        updates += 1
        num_updates += 1
        samples += targets.shape[0]
        lr_scheduler.step_update(num_updates=num_updates)
        if accelerator.is_main_process and updates % args.log_interval == 0:  # .item() syncs the device
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3e}")
        progress.update()
    progress.close()
    elapsed = time.perf_counter() - start
    totals = accelerator.reduce(torch.stack([loss_sum, hits, torch.tensor(float(samples), device=hits.device)]))
    return {
        "train_loss": totals[0].item() / (updates * accelerator.num_processes),
        "train_acc": 100.0 * totals[1].item() / totals[2].item(),
        "lr": optimizer.param_groups[0]["lr"],
        "samples_s": totals[2].item() / elapsed,
        "epoch_time": elapsed,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, rate: float = 1.0) -> dict:
    """Loss and accuracy over a split; ``gather_for_metrics`` drops the samples the sharded sampler repeats."""
    model.eval()
    sums = MetricSums()
    for x, lengths, targets in loader:
        with accelerator.autocast():
            logits = model(x, lengths=lengths, rate=rate)
        sums.update(accelerator.gather_for_metrics(sample_metrics(logits, targets, topk=(1,))))
    summary = sums.summary()
    return {"loss": summary["loss"], "acc": summary["top1"], "samples": sums.count}


def test_model(model: nn.Module, loaders: dict, accelerator: Accelerator) -> dict:
    """Test accuracy of ``model`` (eval mode) in its train form, reparameterized, and at 8 kHz for speech."""
    results = {"test_acc": evaluate(model, loaders["test"], accelerator)["acc"]}
    if "test_8khz" in loaders:  # resampled Fourier kernels: the train form only
        results["test_acc_8khz"] = evaluate(model, loaders["test_8khz"], accelerator, rate=ZERO_SHOT_RATE)["acc"]
    deployed = copy.deepcopy(accelerator.unwrap_model(model)).eval()
    deployed.reparameterize()
    results["test_acc_reparameterized"] = evaluate(deployed, loaders["test"], accelerator)["acc"]
    return results


# ------------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, then test; returns the test results."""
    args = create_parser().parse_args(argv)
    resolve_recipe(args)
    splits, checkpoint = preflight(args)

    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=args.cpu or not has_accelerator,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        step_scheduler_with_optimizer=False,
    )
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        return run(args, splits, checkpoint, accelerator)
    finally:
        accelerator.end_training()


def run(args: argparse.Namespace, splits: dict, checkpoint: str | None, accelerator: Accelerator) -> dict:
    if args.batch_size % accelerator.num_processes:
        raise PreflightError(
            f"--batch-size {args.batch_size} (global) is not divisible by {accelerator.num_processes} processes"
        )
    local_batch = args.batch_size // accelerator.num_processes
    if len(splits["train"]) < args.batch_size:
        raise PreflightError(f"{len(splits['train'])} training examples are fewer than one batch ({args.batch_size})")
    set_seed(args.seed, device_specific=True)  # different dropout draws per process

    if checkpoint:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    else:  # chosen once (timestamp, free name) and shared with every process
        name = args.experiment or f"{datetime.now():%Y%m%d-%H%M%S}-{args.model}"
        run_dir = os.path.join(args.output, name)
        if accelerator.is_main_process:
            index = 0
            while os.path.exists(run_dir):
                index += 1
                run_dir = os.path.join(args.output, f"{name}-{index}")
        run_dir = broadcast_object_list([run_dir])[0]

    kwargs = model_kwargs(args)
    model = timm.create_model(args.model, **kwargs)
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
    model, optimizer, train_loader, *prepared = accelerator.prepare(
        model, optimizer, train_loader, *eval_loaders.values()
    )
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
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state)
    if checkpoint:
        accelerator.load_state(checkpoint)  # last: restores the RNG states saved with it
    start_epoch = state.epoch
    if start_epoch >= args.epochs:
        raise PreflightError(f"--resume {checkpoint!r} already completed {start_epoch} of {args.epochs} epochs")

    config = {
        **vars(args),
        "model_kwargs": kwargs,
        "world_size": accelerator.num_processes,
        "per_process_batch": local_batch,
        "updates_per_epoch": updates_per_epoch,
        "mixed_precision": accelerator.mixed_precision,
        "run_dir": run_dir,
    }
    num_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    recipe = ", ".join(f"{k} {getattr(args, k)}" for k in ("lr", "weight_decay", "kernel_lr", "batch_size", "epochs"))
    _logger.info(
        f"{args.task}: {args.model} ({num_params / 1e6:.3f}M parameters), recipe: {recipe}, warmup "
        f"{args.warmup_epochs} epoch(s), cosine to {args.min_lr}, dropout {accelerator.unwrap_model(model).drop_rate}, "
        f"mrconv norm {args.mrconv_norm}; {', '.join(f'{k} {len(v)}' for k, v in splits.items())} examples",
        main_process_only=True,
    )
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.yaml"), "w") as f:
            yaml.safe_dump(json.loads(json.dumps(config)), f, sort_keys=False)
        metrics_log = MetricsLog(os.path.join(run_dir, CSV_FILE), start_epoch)
    if checkpoint:
        _logger.info(f"resumed from {checkpoint}: continuing at epoch {start_epoch + 1}")

    plain_meta = {"arch": args.model, "task": args.task, "model_kwargs": kwargs, "mrconv_norm": args.mrconv_norm}
    for epoch in range(start_epoch, args.epochs):
        train_loader.set_epoch(epoch)
        row = {"epoch": epoch + 1}
        row.update(
            train_one_epoch(epoch, model, train_loader, optimizer, lr_scheduler, accelerator, args, updates_per_epoch)
        )
        row.update({f"val_{k}": v for k, v in evaluate(model, eval_loaders["val"], accelerator).items()})
        state.epoch = epoch + 1
        improved = row["val_acc"] > state.best_top1
        if improved:
            state.best_top1, state.best_epoch = row["val_acc"], epoch + 1
        model_state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            plain = {**plain_meta, "epoch": epoch + 1, "metric": row["val_acc"], "state_dict": model_state}
            atomic_torch_save(plain, os.path.join(run_dir, "last.pth"))
            if improved:
                atomic_torch_save(plain, os.path.join(run_dir, "model_best.pth"))
            metrics_log.append(row)
        meta = resume_meta(args) | {"epoch": epoch + 1}
        saved = save_checkpoint(accelerator, run_dir, epoch + 1, meta, args.checkpoint_hist)
        _logger.info(
            f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}, acc {row['train_acc']:.2f}, "
            f"lr {row['lr']:.3e}, {row['samples_s']:.1f} samples/s | val loss {row['val_loss']:.4f}, "
            f"acc {row['val_acc']:.2f} | saved {saved}",
            main_process_only=True,
        )

    accelerator.wait_for_everyone()
    best = torch.load(os.path.join(run_dir, "model_best.pth"), map_location="cpu", weights_only=True)
    accelerator.unwrap_model(model).load_state_dict(best["state_dict"])
    results = {
        "best_epoch": state.best_epoch,
        "val_acc": state.best_top1,
        **test_model(model, eval_loaders, accelerator),
    }
    if accelerator.is_main_process:
        tmp = os.path.join(run_dir, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, os.path.join(run_dir, "results.json"))
    zero_shot = f", 8 kHz zero-shot {results['test_acc_8khz']:.2f}" if "test_acc_8khz" in results else ""
    _logger.info(
        f"test accuracy (epoch {state.best_epoch}, best val {state.best_top1:.2f}): train form "
        f"{results['test_acc']:.2f}, reparameterized {results['test_acc_reparameterized']:.2f}{zero_shot}; "
        f"files in {run_dir}",
        main_process_only=True,
    )
    return results


if __name__ == "__main__":
    try:
        main()
    except PreflightError as err:
        sys.exit(f"train_sequence.py: error: {err}")
