"""ImageNet validation of MRConvNeXt (and any timm) models, train form or reparameterized.

Flags follow timm's ``validate.py``. Evaluate a checkpoint on an ImageFolder (``DIR/<class>/<image>`` or
``DIR/val/<class>/<image>``)::

    python validate.py --data-dir /data/imagenet --model mrconvnext_tiny --checkpoint ckpt.pth [--reparam]
    python validate.py --data-dir /data/imagenet --model mrconvnext_tiny --checkpoint ckpt.pth --compare-reparam

``--reparam`` evaluates the deploy form (``timm.utils.reparameterize_model``: MRConv branches folded into one
kernel, paper Sec. 3.2); ``--compare-reparam`` evaluates both forms on the same batches and reports the largest
logit difference and how many top-1 predictions differ. Each model's result is printed to stdout as one JSON
line (logs and the progress bar go to stderr) and appended to ``--results-file`` (``.json``: a JSON list,
otherwise CSV). Several processes (``torchrun`` / ``accelerate launch``) shard the data; every image is counted
once.

Throughput is measured by ``benchmarks/throughput.py`` (train vs deploy form vs a baseline, one process).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import glob
import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
from accelerate import Accelerator
from timm.data import create_transform, resolve_input_data_config
from timm.models import is_model, list_models, resolve_model_input_args
from timm.utils import natural_key, reparameterize_model
from torch.utils.data import DataLoader
from tqdm import tqdm

from mrconvnext.data import DataFormatError
from mrconvnext.data.images import ImageFolderDataset, check_num_classes, create_image_dataset, find_image_folder
from mrconvnext.models.sequence import MRConvSequenceModel
from mrconvnext.utils.checkpoint import CheckpointError, create_model_checked, create_model_from_checkpoint
from mrconvnext.utils.cli import HelpFormatter, InputError, add_model_kwargs_argument, out_of_range
from mrconvnext.utils.evaluation import MetricSums, sample_metrics
from mrconvnext.utils.files import atomic_path
from mrconvnext.utils.training import set_default_num_threads

_logger = logging.getLogger("validate")


def create_parser() -> argparse.ArgumentParser:
    """Command line; flag names are timm's ``validate.py``'s."""
    parser = argparse.ArgumentParser(
        description="MRConvNeXt ImageNet validation (timm validate.py flags)", formatter_class=HelpFormatter
    )
    group = parser.add_argument_group("Dataset")
    group.add_argument("data", nargs="?", metavar="DIR", help="path to dataset (*deprecated*, use --data-dir)")
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        help="ImageFolder root (DIR/<class>/<image>, or DIR/val/<class>/...), or the --dataset shards' folder",
    )
    group.add_argument(
        "--dataset",
        default="",
        metavar="NAME",
        help="'' an image folder; wds, parquet, hfds: ImageNet as webdataset tars, parquet files or a save_to_disk "
        "folder (README 'Data formats'); other names go to timm's create_dataset",
    )
    group.add_argument("--split", default="validation", help="split of a --dataset (an image folder: val/ or DIR)")
    group.add_argument(
        "--class-map", default="", metavar="FILENAME", help="class name to index mapping file (.txt/.pkl)"
    )
    group.add_argument("--num-classes", type=int, default=None, help="number of classes (model default if unset)")
    group.add_argument("-j", "--workers", default=4, type=int, metavar="N", help="data loading workers")
    group.add_argument("--pin-mem", action="store_true", help="pin CPU memory in the DataLoader")

    group = parser.add_argument_group("Model")
    group.add_argument(
        "--model", "-m", default="", metavar="NAME", help="model name(s), comma separated (default: the checkpoint's)"
    )
    group.add_argument("--model-list", default="", metavar="FILENAME", help="file with one model name per line")
    group.add_argument("--pretrained", action="store_true", help="use the model's pretrained weights")
    group.add_argument("--checkpoint", default="", metavar="PATH", help="checkpoint file, or a folder of checkpoints")
    group.add_argument("--use-ema", action="store_true", help="use the EMA weights of the checkpoint if present")
    add_model_kwargs_argument(group)
    forms_group = group.add_mutually_exclusive_group()
    forms_group.add_argument("--reparam", action="store_true", help="reparameterize the model (deploy form) first")
    forms_group.add_argument("--compare-reparam", action="store_true", help="evaluate train and deploy forms, compare")

    group = parser.add_argument_group("Preprocessing (model pretrained cfg by default)")
    group.add_argument("--img-size", type=int, default=None, metavar="N", help="input image size")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N", help="input dims (c h w)")
    group.add_argument("--in-chans", type=int, default=None, metavar="N", help="input channels")
    group.add_argument("--crop-pct", type=float, default=None, metavar="PCT", help="center crop fraction")
    group.add_argument("--crop-mode", default=None, help="crop mode (center, squash, border)")
    group.add_argument("--interpolation", default="", metavar="NAME", help="resize interpolation (bilinear, bicubic)")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="normalization mean")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="normalization std")

    group = parser.add_argument_group("Inference")
    group.add_argument("-b", "--batch-size", default=256, type=int, metavar="N", help="batch size per process")
    group.add_argument("--device", default=None, choices=("cpu", "cuda"), help="device (default: cuda if available)")
    group.add_argument("--amp", action="store_true", help="mixed precision inference (torch.autocast)")
    group.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"), help="AMP dtype")
    group.add_argument("--channels-last", action="store_true", help="channels_last memory layout")
    group.add_argument(
        "--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND", help="torch.compile"
    )
    group.add_argument("--torchcompile-mode", default=None, help="torch.compile mode")

    group = parser.add_argument_group("Output")
    group.add_argument("--results-file", default="", metavar="FILENAME", help="append results (.json: JSON list; CSV)")
    return parser


class UsageError(InputError):
    """A problem with the user's input, reported as one message without a traceback."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp_context(args: argparse.Namespace, device: torch.device) -> Callable:
    if not args.amp:
        return nullcontext
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def _param_millions(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def resolve_device(args: argparse.Namespace) -> str:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def model_entries(args: argparse.Namespace) -> list[tuple[str | None, str]]:
    """``(model name, checkpoint)`` pairs: names from ``--model`` (comma list, wildcards) or ``--model-list``
    (None: the one each checkpoint records), each with every checkpoint of a ``--checkpoint`` folder (an
    export folder, with its ``config.json``, is one checkpoint)."""
    if args.model_list:
        if not os.path.isfile(args.model_list):
            raise UsageError(f"--model-list file {args.model_list!r} does not exist")
        with open(args.model_list) as f:
            requested = [line.split("#")[0].strip() for line in f]
    else:
        requested = args.model.split(",")
    names = []
    for name in filter(None, (n.strip() for n in requested)):
        if is_model(name) or ":" in name:  # registered (optionally with a pretrained tag), or hf-hub:/local-dir:
            names.append(name)
        elif any(c in name for c in "*?["):
            matches = list_models(name)
            if not matches:
                raise UsageError(f"no model matches {name!r}")
            names.extend(matches)
        else:
            close = difflib.get_close_matches(name.split(".")[0], list_models(), n=8, cutoff=0.75)
            similar = ", ".join(close) or "none"
            raise UsageError(f"unknown model {name!r} (similar registered models: {similar})")
    if not names and not args.checkpoint:
        raise UsageError("no model given: pass --checkpoint FILE, --model NAME[,NAME...] or --model-list FILE")
    names = names or [None]
    checkpoints = [args.checkpoint]
    if os.path.isdir(args.checkpoint) and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        found = [
            p for ext in ("*.pth.tar", "*.pth", "*.safetensors") for p in glob.glob(os.path.join(args.checkpoint, ext))
        ]
        if not found:
            raise UsageError(f"no checkpoints (*.pth.tar, *.pth, *.safetensors) in folder {args.checkpoint!r}")
        checkpoints = sorted(found, key=natural_key)
    return [(name, ckpt) for name in names for ckpt in checkpoints]


def build_model(args: argparse.Namespace, name: str | None, checkpoint: str, pretrained: bool) -> nn.Module:
    """The model to evaluate, in eval mode: from ``checkpoint`` (the model, planned size, branch norm, class count
    and data config it records, see :func:`~mrconvnext.utils.checkpoint.create_model_from_checkpoint`;
    ``--model-kwargs`` / ``--num-classes`` override them), else ``timm.create_model(name, pretrained=...)``, an
    MRConvNeXt planned for ``--img-size``."""
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    try:
        if checkpoint:
            return create_model_from_checkpoint(checkpoint, name, use_ema=args.use_ema, **kwargs)
        return create_model_checked(
            **resolve_model_input_args(name, vars(args), pretrained=pretrained, **kwargs)
        ).eval()
    except (CheckpointError, RuntimeError, ValueError, TypeError, OSError) as e:
        raise UsageError(f"cannot create model {name or 'of ' + checkpoint!r}: {e}") from e


def prepare_model(model: nn.Module, args: argparse.Namespace, device: torch.device) -> nn.Module:
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    return model


@torch.inference_mode()
def evaluate(
    forms: dict[str, nn.Module],
    loader: DataLoader,
    accelerator: Accelerator,
    args: argparse.Namespace,
    input_size: tuple,
    desc: str,
) -> dict:
    """Evaluate every form on the same batches; per-sample metrics are gathered across processes.

    Returns per-form metric means, ``num_images``, ``img_per_sec`` (end to end, as timm's rate), per-form mean
    forward time per batch, and with two forms the largest absolute logit difference and top-1 mismatch count.
    """
    device = accelerator.device
    amp_autocast = _amp_context(args, device)
    sums = {name: MetricSums() for name in forms}
    forward_s = dict.fromkeys(forms, 0.0)
    max_abs_diff, mismatches, num_batches = 0.0, 0, 0
    warmup = torch.randn(args.batch_size, *input_size, device=device)  # untimed: compilation, allocator, caches
    if args.channels_last:
        warmup = warmup.contiguous(memory_format=torch.channels_last)
    for model in forms.values():
        with amp_autocast():
            model(warmup)
    start = time.perf_counter()
    progress = tqdm(loader, desc=desc, disable=not accelerator.is_main_process, file=sys.stderr, dynamic_ncols=True)
    for images, target in progress:
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = {}
        for name, model in forms.items():
            _sync(device)
            t0 = time.perf_counter()
            with amp_autocast():
                logits[name] = model(images)
            _sync(device)
            forward_s[name] += time.perf_counter() - t0
        # an unreadable image has target -1 (ImageFolderDataset): sample_metrics marks it, MetricSums leaves it out
        batch = {f"{name}/{k}": v for name, out in logits.items() for k, v in sample_metrics(out, target).items()}
        if len(forms) == 2:
            first, second = (out.float() for out in logits.values())
            batch["diff/max_abs"] = (first - second).abs().amax(dim=1)
            batch["diff/top1"] = (first.argmax(dim=1) != second.argmax(dim=1)).float()
        batch = accelerator.gather_for_metrics(batch)
        for name in forms:
            sums[name].update({k.split("/")[1]: v for k, v in batch.items() if k.startswith(f"{name}/")})
        readable = batch[f"{next(iter(forms))}/readable"]
        if len(forms) == 2 and readable.any():
            max_abs_diff = max(max_abs_diff, batch["diff/max_abs"][readable].max().item())
            mismatches += int(batch["diff/top1"][readable].sum().item())
        num_batches += 1
        progress.set_postfix(top1=f"{sums[next(iter(forms))].summary()['top1']:.2f}", refresh=False)
    elapsed = time.perf_counter() - start
    first_sums = sums[next(iter(forms))]
    out = {
        "forms": {name: s.summary() for name, s in sums.items()},
        "num_images": first_sums.count,
        "skipped_images": first_sums.skipped,
        "img_per_sec": first_sums.count / elapsed,
        "batch_latency_ms": {name: 1e3 * t / num_batches for name, t in forward_s.items()},
    }
    if len(forms) == 2:
        out.update(max_abs_logit_diff=max_abs_diff, top1_mismatches=mismatches)
    return out


def validate(
    args: argparse.Namespace, name: str | None, checkpoint: str, folder: str, accelerator: Accelerator
) -> dict:
    """Evaluate one model (and checkpoint) on ``folder`` (an image folder, or the files of ``--dataset``); returns
    the result row."""
    model = build_model(args, name, checkpoint, pretrained=args.pretrained or not checkpoint)
    name = name or model.pretrained_cfg["architecture"]
    if isinstance(model, MRConvSequenceModel) and not model.image_input:  # image tasks (LRA Image, sCIFAR) do
        raise UsageError(
            f"{name} is a sequence model without image input: validate.py evaluates models of images "
            "(train_sequence.py reports a sequence model's test accuracy, in both forms)"
        )
    data_config = resolve_input_data_config(model, vars(args), use_test_size=True)
    transform = create_transform(**data_config, is_training=False)
    try:
        if args.dataset:
            dataset = create_image_dataset(
                args.dataset,
                folder,
                args.split,
                train=False,
                transform=transform,
                batch_size=args.batch_size,
                num_classes=model.num_classes,
            )
        else:
            dataset = ImageFolderDataset(
                folder,
                class_map=args.class_map,
                input_img_mode="RGB" if data_config["input_size"][0] == 3 else "L",
                transform=transform,
            )
            check_num_classes(dataset.reader.class_to_idx, model.num_classes, args.class_map)
    except (AssertionError, OSError, ValueError, pickle.UnpicklingError) as e:  # timm asserts on a missing class map
        raise UsageError(str(e)) from e
    if not args.dataset and not len(dataset):
        raise UsageError(f"no class folder of {folder!r} is named in class map {args.class_map!r}")

    if args.compare_reparam:
        forms = {"train": model, "deploy": reparameterize_model(model)}
    elif args.reparam:
        forms = {"deploy": reparameterize_model(model)}
    else:
        forms = {"train": model}
    params = {form: _param_millions(m) for form, m in forms.items()}
    forms = {form: prepare_model(m, args, accelerator.device) for form, m in forms.items()}
    _logger.info(f"Model {name} ({', '.join(f'{k}: {v}M params' for k, v in params.items())}), data {data_config}")

    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=args.pin_mem)
    if not getattr(dataset, "shards_over_processes", False):  # sharded formats give each process its share
        loader = accelerator.prepare_data_loader(loader)
    try:
        result = evaluate(forms, loader, accelerator, args, data_config["input_size"], name)
    except DataFormatError as e:  # a shard read during the pass: truncated, a record without image or label
        raise UsageError(str(e)) from e

    main_form = next(iter(forms))
    metrics = result["forms"][main_form]
    row = {
        "model": name,
        "top1": round(metrics["top1"], 4),
        "top1_err": round(100 - metrics["top1"], 4),
        "top5": round(metrics["top5"], 4),
        "top5_err": round(100 - metrics["top5"], 4),
        "loss": round(metrics["loss"], 6),
        "num_images": result["num_images"],
        "skipped_images": result["skipped_images"],
        "param_count": params[main_form],
        "img_size": data_config["input_size"][-1],
        "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"],
        "reparam": main_form == "deploy",
        "batch_size": args.batch_size,
        "img_per_sec": round(result["img_per_sec"], 2),
        "batch_latency_ms": round(result["batch_latency_ms"][main_form], 3),
    }
    if args.compare_reparam:
        deploy = result["forms"]["deploy"]
        row.update(
            deploy_top1=round(deploy["top1"], 4),
            deploy_top5=round(deploy["top5"], 4),
            deploy_loss=round(deploy["loss"], 6),
            deploy_param_count=params["deploy"],
            deploy_batch_latency_ms=round(result["batch_latency_ms"]["deploy"], 3),
            max_abs_logit_diff=result["max_abs_logit_diff"],
            top1_mismatches=result["top1_mismatches"],
        )
    if checkpoint:
        row["checkpoint"] = checkpoint
    return row


def read_results(path: str) -> list[dict]:
    """The rows already in a results file (none if it is missing or empty)."""
    if not os.path.isfile(path) or not os.path.getsize(path):
        return []
    with open(path, newline="") as f:
        if not path.lower().endswith(".json"):
            return list(csv.DictReader(f))
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise UsageError(f"results file {path!r} is not a JSON list of results: {e}") from e
    if not isinstance(rows, list):
        raise UsageError(f"results file {path!r} is not a JSON list of results")
    return rows


def write_results(path: str, rows: list[dict]) -> None:
    """Append ``rows`` to ``path`` (a JSON list for ``.json``, else CSV over the union of columns), atomically."""
    rows = read_results(path) + rows
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        if path.lower().endswith(".json"):
            json.dump(rows, f, indent=2)
            f.write("\n")
        else:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)


def _run(args: argparse.Namespace) -> int:
    problem = out_of_range(args, positive="batch_size img_size crop_pct".split(), non_negative=["workers"])
    if problem:
        raise UsageError(problem)
    entries = model_entries(args)
    if args.results_file:
        read_results(args.results_file)  # fail before evaluating, not after
    if args.dataset:
        folder = args.data_dir or args.data
        if not folder:
            raise UsageError(f"--dataset {args.dataset} needs --data-dir DIR, the folder of its files")
    else:
        try:
            folder = find_image_folder(args.data_dir or args.data)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from e
    threads = set_default_num_threads(args.workers)
    accelerator = Accelerator(cpu=resolve_device(args) == "cpu")
    is_main = accelerator.is_main_process
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    _logger.info(threads)

    rows, failed = [], 0
    try:
        for name, checkpoint in entries:
            try:
                row = validate(args, name, checkpoint, folder, accelerator)
            except UsageError as e:
                if len(entries) == 1:
                    raise
                failed += 1
                print(f"validate.py: error: {e}", file=sys.stderr)
                continue
            rows.append(row)
            if is_main:
                print(json.dumps(row), flush=True)
        if is_main and args.results_file and rows:
            write_results(args.results_file, rows)
    finally:
        # destroys the process group: gloo's threads left running at interpreter exit can abort the
        # process ("terminate called without an active exception") after the results are printed
        accelerator.end_training()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = create_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return _run(args)
    except UsageError as e:
        print(f"validate.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
