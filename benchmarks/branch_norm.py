"""MRConv's BatchNorm form against ``branch_norm='scale'`` (paper Section 6, Eq. 9): accuracy and training step time.

    python benchmarks/digits_folder.py digits --size 32
    python benchmarks/branch_norm.py digits [--epochs 10] [--seeds 0 1 2] [--output output/branch_norm]

Accuracy: ``train_imagenet.py`` trains ``--model`` (``mrconvnext_atto``) at the data's image size once per seed
and ``--branch-norm``, with one recipe for both (``make demo``'s, without horizontal flips, which would turn
digits into other shapes); the table shows the last epoch's top-1 on ``val/`` (no choice of epoch on the
validation set), its mean and sample standard deviation over the seeds, and each seed's value.

Step time: one training step (forward, cross-entropy backward, AdamW update) of each form on one fixed batch,
run round-robin in this process as in ``benchmarks/benchmark.py``: the ratio is the median over rounds of
scale / batch with its range, so a shared machine's drifts cancel; absolute times are not comparable between
machines or loads and are not shown.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import timm
import torch
from benchmark import compare

import mrconvnext  # noqa: F401  (registers the models)

REPO_ROOT = Path(__file__).resolve().parents[1]
NORMS = ("batch", "scale")


def train_command(data_dir: Path, args: argparse.Namespace, norm: str, seed: int, output: Path) -> list[str]:
    """The ``train_imagenet.py`` run of one form and seed (the same recipe for both forms)."""
    cmd = [sys.executable, str(REPO_ROOT / "train_imagenet.py"), "--data-dir", str(data_dir), "--model", args.model]
    cmd += ["--num-classes", str(args.num_classes), "--img-size", str(args.img_size), "--epochs", str(args.epochs)]
    cmd += ["-b", str(args.batch_size), "--lr", "3e-3", "--warmup-epochs", "1", "--min-lr", "1e-5"]
    cmd += ["--weight-decay", "0.05", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0"]
    cmd += ["--smoothing", "0", "--drop-path", "0", "--scale", "0.8", "1", "--hflip", "0", "--color-jitter", "0"]
    cmd += ["--crop-pct", "1.0", "--workers", "1", "--seed", str(seed), "--branch-norm", norm]
    cmd += ["--output", str(output), "--experiment", f"{norm}-seed{seed}"]
    return cmd


def last_top1(run_dir: Path) -> float:
    with open(run_dir / "summary.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["eval_top1"])


def step_time_ratio(args: argparse.Namespace) -> tuple[float, float, float]:
    """Median (and range) over rounds of the scale form's training step time over the BatchNorm form's."""
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    targets = torch.randint(0, args.num_classes, (args.batch_size,))
    steps = {}
    for norm in NORMS:
        model = timm.create_model(
            args.model, img_size=args.img_size, num_classes=args.num_classes, mrconv_kwargs=dict(branch_norm=norm)
        ).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer) -> None:
            torch.nn.functional.cross_entropy(model(images), targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[norm] = step
    ratio = compare(steps, args.step_repeats, 2, torch.device("cpu")).ratio("scale", "batch")
    return ratio.median, ratio.low, ratio.high


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="ImageFolder with train/ and val/ (benchmarks/digits_folder.py)")
    parser.add_argument("--model", default="mrconvnext_atto")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--step-repeats", type=int, default=20, help="timed rounds of the step-time comparison")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "output" / "branch_norm")
    args = parser.parse_args(argv)
    if not (args.data_dir / "train").is_dir() or not (args.data_dir / "val").is_dir():
        parser.error(f"{args.data_dir} needs train/ and val/ folders (python benchmarks/digits_folder.py OUT)")

    top1: dict[str, list[float]] = {norm: [] for norm in NORMS}
    for seed in args.seeds:
        for norm in NORMS:
            run_dir = args.output / f"{norm}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (train_imagenet.py would pick another name)
            cmd = train_command(args.data_dir, args, norm, seed, args.output)
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
            top1[norm].append(last_top1(run_dir))
    ratio, low, high = step_time_ratio(args)

    threads = torch.get_num_threads()
    print(
        f"\n{args.model}, {args.img_size} px, {args.epochs} epochs, seeds {args.seeds}; step time: batch "
        f"{args.batch_size}, {args.step_repeats} rounds, {threads} thread{'s' * (threads > 1)} (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')})\n"
    )
    print("| MRConv norm | top-1 % (mean ± std) | top-1 % per seed | training step time vs batch |")
    print("|---|---|---|---|")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {"top1": top1, "step_time_ratio": [ratio, low, high], "args": config}
    for norm in NORMS:
        values = top1[norm]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        timing = "1 (baseline)" if norm == "batch" else f"{ratio:.2f} (range {low:.2f} - {high:.2f})"
        per_seed = ", ".join(f"{v:.2f}" for v in values)
        print(f"| `{norm}` | {statistics.mean(values):.2f} ± {spread:.2f} | {per_seed} | {timing} |")
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
