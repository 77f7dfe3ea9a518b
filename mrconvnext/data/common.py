"""Shared pieces of the readers: the error type, split names, unreadable images, text files, token padding."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from ..utils.cli import InputError

SPLITS = ("train", "val", "test")
# what PIL raises for an image it cannot decode: damaged files (OSError, some ValueErrors) and sizes over its
# decompression-bomb limit
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)


class DataFormatError(InputError):
    """A data file or folder is missing or does not have the layout of the public release."""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def find_dir(root: str, child: str, what: str, layout: str, source: str) -> str:
    """``root/child`` if it exists, else ``root`` itself when it already is that folder (its name is ``child``)."""
    if not os.path.isdir(root):
        raise DataFormatError(f"{what}: data directory {root!r} does not exist; expected {layout} (from {source})")
    nested = os.path.join(root, child)
    if os.path.isdir(nested):
        return nested
    return root


def require_file(path: str, what: str, layout: str, source: str) -> str:
    if not os.path.isfile(path):
        raise DataFormatError(f"{what}: missing file {path!r}; expected {layout} (from {source})")
    return path


def text_lines(path: str, layout: str) -> Iterator[str]:
    """The lines of the UTF-8 text file ``path``, line ends kept (``newline=""``, as ``csv`` wants them); a file
    that is no UTF-8 text (a binary file in its place) is a :class:`DataFormatError` naming it."""
    with open(path, encoding="utf-8", newline="") as f:
        try:
            yield from f
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: not UTF-8 text ({err}); expected {layout}") from err


def pad_tokens(ids: Sequence[int], length: int) -> tuple[torch.Tensor, int]:
    """``ids`` cut to ``length`` and right-padded with 0 (the padding id), with the true length (at least 1)."""
    ids = list(ids[:length]) or [0]
    out = torch.zeros(length, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out, len(ids)
