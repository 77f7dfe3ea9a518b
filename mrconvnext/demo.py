"""``make demo``: build a small shapes dataset, train MRConvNeXt-atto on it, validate train and deploy forms.

``python -m mrconvnext.demo [--output demo_output] [--epochs N]`` (from the repository or an installed package: it runs
the ``train_imagenet`` and ``validate`` modules with ``python -m``)

1. Draws an ImageFolder (``train/`` and ``val/``) of filled shapes (circle, square, triangle, cross) with
   random size, position, rotation and bright colour on a random dark background with pixel noise; a
   learnable task whose chance accuracy is 25%.
2. Trains ``mrconvnext_atto`` at 32x32 with ``train_imagenet.py`` in one process, with the ImageNet
   recipe's heavy augmentation turned down for a task this small.
3. Runs ``validate.py`` on the trained checkpoint twice: the train form (multi-resolution branches with
   BatchNorm) and the reparameterized deploy form (one kernel per layer, Section 3.3), and prints both
   accuracies, throughputs and their difference.
4. Writes the trained model's plots with ``python -m mrconvnext.plot`` into ``demo_output/plots/``: resolution
   shares per layer, merged kernels per stage over their lags and on the feature map, their spectra. Without
   matplotlib (the ``plot`` extra) it says so and skips them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .utils.cli import HelpFormatter, out_of_range

SHAPES = ("circle", "square", "triangle", "cross")


def _polygon(shape: str, center: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = radius / math.sqrt(2)
    elif shape == "triangle":
        corners = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        scale = radius
    else:  # cross: a plus sign of width 2/3 of its arm length
        w = 1 / 3
        corners = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w)]
        corners += [(-1, -w), (-w, -w)]
        scale = radius
    cos, sin = math.cos(angle), math.sin(angle)
    return [(center[0] + scale * (x * cos - y * sin), center[1] + scale * (x * sin + y * cos)) for x, y in corners]


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``shape`` with random geometry, colours and pixel noise."""
    background = rng.integers(0, 100, 3)  # dark background, bright shape: always visible, colours still random
    foreground = rng.integers(150, 256, 3)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.2, 0.4) * size
    center = tuple(rng.uniform(radius, size - radius, 2))
    fill = tuple(int(c) for c in foreground)
    if shape == "circle":
        draw.ellipse([center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius], fill=fill)
    else:
        draw.polygon(_polygon(shape, center, radius, rng.uniform(0, 2 * math.pi)), fill=fill)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-15, 16, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def make_shapes_dataset(
    root: str | os.PathLike,
    train_per_class: int = 300,
    val_per_class: int = 100,
    size: int = 64,
    classes: tuple[str, ...] = SHAPES,
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/<shape>/*.png`` (deterministic in ``seed``); skipped if already complete."""
    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for shape in classes:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                draw_shape(shape, size, rng).save(folder / f"{shape}_{index:04d}.png")
    marker.touch()
    return root


def _run(module: str, args: list[str]) -> float:
    """``python -m module args`` as a user would type it; a failed step ends the demo with one line (the step's
    own error is above it)."""
    print("$ python -m", module, " ".join(args), flush=True)
    start = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", module, *args]).returncode
    if status:
        raise SystemExit(f"mrconvnext.demo: error: python -m {module} exited with status {status}")
    return time.perf_counter() - start


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train and validate MRConvNeXt-atto on a generated shapes dataset", formatter_class=HelpFormatter
    )
    parser.add_argument("--output", default="demo_output", help="folder for the dataset, the run and the plots")
    parser.add_argument("--model", default="mrconvnext_atto", help="MRConvNeXt model to train (a registered name)")
    parser.add_argument("--img-size", type=int, default=32, help="image size of the dataset and the model")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = create_parser()
    args = parser.parse_args(argv)
    problem = out_of_range(args, positive=["img_size", "epochs"])
    if problem:
        parser.error(problem)

    start = time.perf_counter()
    data_dir = make_shapes_dataset(Path(args.output) / "shapes", size=args.img_size)
    print(f"dataset: {data_dir} ({len(SHAPES)} classes: {', '.join(SHAPES)}; 300 train / 100 val images each)")
    run_dir = Path(args.output) / "train"
    train_cmd = ["--data-dir", str(data_dir)]
    train_cmd += ["--model", args.model, "--num-classes", str(len(SHAPES)), "--img-size", str(args.img_size)]
    train_cmd += ["--epochs", str(args.epochs), "-b", "32"]
    train_cmd += ["--lr", "3e-3", "--warmup-epochs", "1", "--min-lr", "1e-5", "--weight-decay", "0.05"]
    # the ImageNet recipe's heavy regularization would stop a tiny model learning in minutes
    train_cmd += ["--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--smoothing", "0"]
    train_cmd += ["--drop-path", "0", "--scale", "0.8", "1", "--color-jitter", "0", "--crop-pct", "1.0"]
    train_cmd += ["--no-model-ema"]  # an EMA of decay 0.9999 barely moves in 370 updates
    train_cmd += ["--workers", "1", "--output", str(run_dir.parent), "--experiment", run_dir.name]
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (the dataset is kept)
    train_s = _run("mrconvnext.train_imagenet", train_cmd)

    results = {}
    for form, extra in (("train form", []), ("deploy form", ["--reparam"])):
        results_file = run_dir / f"validate_{'deploy' if extra else 'train'}.json"
        cmd = ["--data-dir", str(data_dir / "val"), "--checkpoint", str(run_dir / "model_best.pth")]  # it records
        cmd += ["--workers", "1", "--results-file", str(results_file), *extra]  # model, size, crop and norm
        _run("mrconvnext.validate", cmd)
        results[form] = json.loads(results_file.read_text())[-1]  # validate.py appends rows to a JSON list

    print(f"\n{'form':<12}{'top-1 %':>9}{'top-5 %':>9}{'loss':>8}{'images/s':>10}")
    for form, result in results.items():
        print(
            f"{form:<12}{result['top1']:>9.2f}{result['top5']:>9.2f}{result['loss']:>8.4f}{result['img_per_sec']:>10.1f}"
        )
    diff = abs(results["train form"]["top1"] - results["deploy form"]["top1"])
    print(f"top-1 difference train vs deploy: {diff:.2f} points; chance is {100 / len(SHAPES):.0f}%")
    plot_cmd = ["--checkpoint", str(run_dir / "model_best.pth"), "--out", str(Path(args.output) / "plots")]
    if importlib.util.find_spec("matplotlib") is None:
        print(
            "plots skipped: matplotlib is not installed (the plot extra: pip install matplotlib, or pip install "
            f"'.[plot]' in a clone of mrconvnext); then python -m mrconvnext.plot {' '.join(plot_cmd)}"
        )
    else:
        _run("mrconvnext.plot", plot_cmd)
    print(f"training took {train_s:.0f} s, the whole demo {time.perf_counter() - start:.0f} s")
    if diff > 0.5:
        raise SystemExit(f"train and deploy forms disagree: top-1 differs by {diff:.2f} points")


if __name__ == "__main__":
    main()
