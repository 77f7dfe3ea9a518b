"""CIFAR-10 as pixel sequences: LRA Image (grayscale) and sequential CIFAR (sCIFAR, RGB).

Reads the public python release ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``: pickled dicts
with ``data`` (N, 3072) uint8 rows R|G|B of 32x32 and ``labels``), the files torchvision's ``CIFAR10``
reads. torchvision's class only accepts the exact release checksums, so this reader checks the structure
instead and says what is wrong. Items are ``(x (1024, C), 1024, label)``, pixels in row-major order.
Normalization as S4: grayscale (ITU-R 601 luma) with mean 122.6/255, std 61.0/255 (LRA Image); RGB with
the CIFAR-10 channel statistics (sCIFAR). The train batches are split 45000/5000 into train/val by a fixed
random permutation (seed 42), as S4 does.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import DataFormatError, check_split, find_dir, require_file

__all__ = ["CifarSequences"]

CIFAR_SOURCE = "cifar-10-python.tar.gz, https://www.cs.toronto.edu/~kriz/cifar.html"
LAYOUT = "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch} (the CIFAR-10 python release)"
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_GRAY_STATS = (122.6 / 255.0, 61.0 / 255.0)
_RGB_STATS = (torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616]))


# the globals a batch's numpy arrays unpickle with (numpy 1 and 2 module names, pickle protocols 2 to 5; Python 3
# writes bytes as _codecs.encode(str, 'latin1') in protocol 2)
_BATCH_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{module}", name)
    for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))
}


class _BatchUnpickler(pickle.Unpickler):
    """Plain containers and numpy arrays only: a file naming any other global is refused before it is called
    (``pickle.load`` would call it)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _BATCH_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR-10 batch holds")
        return super().find_class(module, name)


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()
        data, labels = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch["labels"], dtype=np.int64)
    except Exception as err:  # bytes that are no batch fail anywhere in the unpickler (ImportError, OverflowError, ...)
        raise DataFormatError(
            f"{path}: not a CIFAR-10 batch ({type(err).__name__}: {err}); expected a pickled dict with 'data' "
            f"(N, 3072) uint8 and 'labels' ({LAYOUT})"
        ) from err
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataFormatError(f"{path}: 'data' {data.shape} and {len(labels)} labels, expected (N, 3072) and N labels")
    bad = labels[(labels < 0) | (labels > 9)]
    if len(bad):
        raise DataFormatError(f"{path}: label {int(bad[0])} is not a CIFAR-10 class in [0, 10)")
    return data, labels


class CifarSequences(Dataset):
    """CIFAR-10 images as 1024-step sequences; ``grayscale=True`` for LRA Image, False for sCIFAR."""

    num_classes = 10

    def __init__(self, root: str, split: str, grayscale: bool) -> None:
        check_split(split)
        directory = find_dir(root, "cifar-10-batches-py", "CIFAR-10", LAYOUT, CIFAR_SOURCE)
        names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        batches = [
            _read_batch(require_file(os.path.join(directory, n), "CIFAR-10", LAYOUT, CIFAR_SOURCE)) for n in names
        ]
        data = np.concatenate([d for d, _ in batches])
        labels = np.concatenate([t for _, t in batches])
        if split != "test":
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(42)).numpy()
            num_val = len(data) // 10
            keep = order[: len(data) - num_val] if split == "train" else order[len(data) - num_val :]
            data, labels = data[keep], labels[keep]
        self.grayscale = grayscale
        self.pixels = torch.from_numpy(data).view(-1, 3, 1024)
        self.targets = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        rgb = self.pixels[index].t().float() / 255.0  # (1024, 3)
        if self.grayscale:
            mean, std = _GRAY_STATS
            x = (rgb @ _LUMA)[:, None].sub(mean).div(std)
        else:
            x = (rgb - _RGB_STATS[0]) / _RGB_STATS[1]
        return x, x.shape[0], int(self.targets[index])
