"""Write scikit-learn's handwritten digits as an ImageFolder: real images, available offline.

``python benchmarks/digits_folder.py OUT [--size 32] [--val-fraction 0.25] [--seed 0]``

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set (1797 images, 8x8, 17
grey levels, 10 classes, written by 43 people). This writes ``OUT/train/<digit>/*.png`` and
``OUT/val/<digit>/*.png`` (a split stratified by class, fixed by ``--seed``), each image upscaled to
``--size`` pixels with bilinear interpolation and stored as RGB, so ``train_imagenet.py --data-dir OUT``
and ``validate.py --data-dir OUT/val`` read it like ImageNet.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(out: str | Path, size: int = 32, val_fraction: float = 0.25, seed: int = 0) -> Path:
    """Write the digits as ``out/{train,val}/<class>/<index>.png``; returns ``out``. Written into a temporary
    folder next to ``out`` and renamed into place, so an interrupted run leaves no half-written data set."""
    from sklearn.datasets import load_digits

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another output folder")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = round(len(indices) * val_fraction)
        for split, split_indices in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = staging / split / str(label)
            folder.mkdir(parents=True)
            for index in split_indices:
                grey = (digits.images[index] * (255 / 16)).round().astype(np.uint8)
                image = Image.fromarray(grey).resize((size, size), Image.BILINEAR).convert("RGB")
                image.save(folder / f"{index:04d}.png")
    os.replace(staging, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (must not exist)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="fraction of each class held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    args = parser.parse_args()
    out = write_digits_folder(args.out, args.size, args.val_fraction, args.seed)
    counts = {split: sum(1 for _ in (out / split).rglob("*.png")) for split in ("train", "val")}
    print(f"wrote {out}: {counts['train']} train / {counts['val']} val images, 10 classes, {args.size}x{args.size}")


if __name__ == "__main__":
    main()
