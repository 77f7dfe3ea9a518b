"""Readers for the Long Range Arena release (Tay et al., 2021) in the layouts S4 reads (state-spaces/s4).

Every item is ``(x, length, target)``: ``x`` token ids padded with 0 to the model length (``(2, L)`` and
``length`` of shape ``(2,)`` for Retrieval pairs) or a float image sequence ``(L, 1)`` (Pathfinder). The
public release is ``lra_release.gz`` from https://github.com/google-research/long-range-arena; IMDB for
the Text task comes from https://ai.stanford.edu/~amaas/data/sentiment/ (``aclImdb_v1.tar.gz``).

Vocabularies are fixed (S4 builds them from token frequencies; the sizes match the paper's Appendix D.2):

* ListOps (18): ``<pad> <unk> <eos>``, digits ``0-9``, ``[MIN [MAX [MED [SM`` and ``X`` for ``]``, after S4's
  tokenizer (drop ``(`` and ``)``, ``]`` -> ``X``, split on whitespace); ``<eos>`` appended as in S4.
* Text (129): ``<pad>``, ``<unk>`` and bytes 1-127 of the review (character level); other bytes are ``<unk>``.
* Retrieval (97): ``<pad>``, ``<unk>`` and the 95 printable ASCII characters; anything else is ``<unk>``.
"""

from __future__ import annotations

import csv
import os
import re

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import UNREADABLE_IMAGE, DataFormatError, check_split, find_dir, pad_tokens, require_file, text_lines

__all__ = [
    "LISTOPS_VOCAB",
    "ListOps",
    "ImdbText",
    "AanRetrieval",
    "Pathfinder",
    "listops_tokenize",
    "text_tokenize",
    "retrieval_tokenize",
]

LRA_SOURCE = "lra_release.gz, https://github.com/google-research/long-range-arena"
IMDB_SOURCE = "aclImdb_v1.tar.gz, https://ai.stanford.edu/~amaas/data/sentiment/"

LISTOPS_VOCAB = ("<pad>", "<unk>", "<eos>", *map(str, range(10)), "[MIN", "[MAX", "[MED", "[SM", "X")
_LISTOPS_IDS = {token: i for i, token in enumerate(LISTOPS_VOCAB)}
_LISTOPS_TRANSLATE = {ord("]"): "X", ord("("): None, ord(")"): None}
_TEXT_IDS = np.array([1] + [b + 1 for b in range(1, 128)] + [1] * 128, dtype=np.int64)  # byte -> id
_RETRIEVAL_IDS = np.array([c - 30 if 32 <= c <= 126 else 1 for c in range(256)], dtype=np.int64)

csv.field_size_limit(2**31 - 1)  # LRA rows hold whole documents


def listops_tokenize(source: str) -> list[int]:
    """S4's ListOps tokens of one ``Source`` expression, with ``<eos>`` appended."""
    tokens = source.translate(_LISTOPS_TRANSLATE).split()
    return [_LISTOPS_IDS.get(token, 1) for token in tokens] + [2]


def text_tokenize(text: bytes) -> np.ndarray:
    """Character-level ids (vocabulary of 129) of one review's bytes."""
    return _TEXT_IDS[np.frombuffer(text, dtype=np.uint8)]


def retrieval_tokenize(text: bytes) -> np.ndarray:
    """Character-level ids (vocabulary of 97) of one AAN document's bytes."""
    return _RETRIEVAL_IDS[np.frombuffer(text, dtype=np.uint8)]


def _parse_label(value: str, num_classes: int, path: str, line: int, layout: str) -> int:
    try:
        number = float(value)  # the AAN release writes labels as floats ('1.0')
    except ValueError:
        number = -1.0
    if not number.is_integer() or not 0 <= number < num_classes:
        raise DataFormatError(
            f"{path}, line {line}: label {value!r} is not a class in [0, {num_classes}); expected {layout}"
        )
    return int(number)


class ListOps(Dataset):
    """LRA ListOps: ``listops-1000/basic_{train,val,test}.tsv`` with the header ``Source<TAB>Target``."""

    layout = "<root>/basic_{train,val,test}.tsv with header 'Source\\tTarget' (LRA listops-1000)"
    num_classes = 10

    def __init__(self, root: str, split: str, max_len: int) -> None:
        check_split(split)
        directory = find_dir(root, "listops-1000", "ListOps", self.layout, LRA_SOURCE)
        self.path = require_file(os.path.join(directory, f"basic_{split}.tsv"), "ListOps", self.layout, LRA_SOURCE)
        self.max_len = max_len
        self.sources: list[str] = []
        self.targets: list[int] = []
        reader = csv.reader(text_lines(self.path, self.layout), delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != ["Source", "Target"]:
            raise DataFormatError(f"{self.path}: header {header!r}, expected ['Source', 'Target'] ({self.layout})")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise DataFormatError(f"{self.path}, line {line}: {len(row)} columns, expected 2 ({self.layout})")
            self.targets.append(_parse_label(row[1], self.num_classes, self.path, line, self.layout))
            self.sources.append(row[0])
        if not self.sources:
            raise DataFormatError(f"{self.path}: no examples ({self.layout})")

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        ids = listops_tokenize(self.sources[index])
        if len(ids) > self.max_len:  # S4: truncate the tokens, then append <eos>
            ids = ids[: self.max_len - 1] + [2]
        x, length = pad_tokens(ids, self.max_len)
        return x, length, self.targets[index]


class ImdbText(Dataset):
    """LRA Text: IMDB reviews ``aclImdb/{train,test}/{neg,pos}/*.txt`` (labels 0 = neg, 1 = pos).

    The release has no validation split; ``'val'`` reads the test reviews, as S4 does.
    """

    layout = "<root>/aclImdb/{train,test}/{neg,pos}/*.txt"
    num_classes = 2

    def __init__(self, root: str, split: str, max_len: int) -> None:
        check_split(split)
        directory = find_dir(root, "aclImdb", "Text (IMDB)", self.layout, IMDB_SOURCE)
        split_dir = os.path.join(directory, "test" if split == "val" else split)
        self.max_len = max_len
        self.files: list[str] = []
        self.targets: list[int] = []
        for label, name in enumerate(("neg", "pos")):
            folder = os.path.join(split_dir, name)
            if not os.path.isdir(folder):
                raise DataFormatError(f"Text (IMDB): missing folder {folder!r}; expected {self.layout} ({IMDB_SOURCE})")
            files = sorted(e.path for e in os.scandir(folder) if e.name.endswith(".txt"))
            if not files:
                raise DataFormatError(f"Text (IMDB): no .txt reviews in {folder!r}; expected {self.layout}")
            self.files += files
            self.targets += [label] * len(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        with open(self.files[index], "rb") as f:
            text = f.read(self.max_len)
        x, length = pad_tokens(text_tokenize(text).tolist(), self.max_len)
        return x, length, self.targets[index]


class AanRetrieval(Dataset):
    """LRA Retrieval: ``new_aan_pairs.{train,eval,test}.tsv``, rows ``label id1 id2 text1 text2``, no header.

    Items are ``(x (2, L), lengths (2,), label)``: both documents cut to ``max_len`` characters each.
    """

    layout = "<root>/new_aan_pairs.{train,eval,test}.tsv, tab-separated 'label id1 id2 text1 text2', no header"
    num_classes = 2

    def __init__(self, root: str, split: str, max_len: int) -> None:
        check_split(split)
        directory = find_dir(root, "tsv_data", "Retrieval (AAN)", self.layout, LRA_SOURCE)
        name = f"new_aan_pairs.{'eval' if split == 'val' else split}.tsv"
        self.path = require_file(os.path.join(directory, name), "Retrieval (AAN)", self.layout, LRA_SOURCE)
        self.max_len = max_len
        self.pairs: list[tuple[bytes, bytes]] = []
        self.targets: list[int] = []
        with open(self.path, newline="", encoding="utf-8", errors="replace") as f:
            for line, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
                if len(row) != 5:
                    raise DataFormatError(f"{self.path}, line {line}: {len(row)} columns, expected 5 ({self.layout})")
                self.targets.append(_parse_label(row[0], self.num_classes, self.path, line, self.layout))
                self.pairs.append((row[3].encode()[:max_len], row[4].encode()[:max_len]))
        if not self.pairs:
            raise DataFormatError(f"{self.path}: no pairs ({self.layout})")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        docs = [pad_tokens(retrieval_tokenize(text).tolist(), self.max_len) for text in self.pairs[index]]
        x = torch.stack([doc for doc, _ in docs])
        return x, torch.tensor([length for _, length in docs]), self.targets[index]


class Pathfinder(Dataset):
    """LRA Pathfinder / Path-X: ``pathfinder{32,64,128,256}/<difficulty>/{imgs,metadata}``.

    ``metadata/*.npy`` are text files, one image per line: ``<imgs subfolder> <file name> <n> <label> ...``
    (paths relative to the difficulty folder). As S4, the images of one difficulty are split 80/10/10 into
    train/val/test by a fixed random permutation (seed 42). Pixels are scaled to ``[-1, 1]``; items are
    ``(x (resolution^2, 1), length, label)``.
    """

    num_classes = 2

    def __init__(self, root: str, split: str, resolution: int = 32, difficulty: str = "curv_contour_length_14") -> None:
        check_split(split)
        self.resolution = resolution
        self.layout = (
            f"<root>/pathfinder{resolution}/{difficulty}/metadata/*.npy (lines '<imgs dir> <file> <n> <label> ...') "
            f"and the {resolution}x{resolution} PNGs they name under <root>/pathfinder{resolution}/{difficulty}/imgs/"
        )
        base = find_dir(root, f"pathfinder{resolution}", "Pathfinder", self.layout, LRA_SOURCE)
        self.directory = os.path.join(base, difficulty)
        metadata = os.path.join(self.directory, "metadata")
        if not os.path.isdir(metadata):
            raise DataFormatError(f"Pathfinder: missing folder {metadata!r}; expected {self.layout} ({LRA_SOURCE})")
        files = [e.name for e in os.scandir(metadata) if e.name.endswith(".npy")]
        files.sort(key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])
        if not files:
            raise DataFormatError(f"Pathfinder: no metadata/*.npy files in {metadata!r}; expected {self.layout}")
        samples: list[tuple[str, int]] = []
        for name in files:
            path = os.path.join(metadata, name)
            for line, text in enumerate(text_lines(path, self.layout), start=1):
                fields = text.split()
                if not fields:
                    continue
                if len(fields) < 4:
                    raise DataFormatError(f"{path}, line {line}: {len(fields)} fields, expected {self.layout}")
                label = _parse_label(fields[3], self.num_classes, path, line, self.layout)
                samples.append((os.path.join(self.directory, fields[0], fields[1]), label))
        if not samples:
            raise DataFormatError(f"Pathfinder: the metadata files in {metadata!r} list no images")
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(42)).tolist()
        total, num_eval = len(samples), len(samples) // 10
        start, stop = {"train": (0, total - 2 * num_eval), "val": (total - 2 * num_eval, total - num_eval)}.get(
            split, (total - num_eval, total)
        )
        self.samples = [samples[i] for i in order[start:stop]]
        if not self.samples:
            raise DataFormatError(f"Pathfinder: {len(samples)} images leave none for the {split!r} split")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L"), dtype=np.float32)
        except UNREADABLE_IMAGE as err:
            raise DataFormatError(f"Pathfinder: cannot read image {path!r} ({err}); expected {self.layout}") from err
        if pixels.shape != (self.resolution, self.resolution):
            raise DataFormatError(
                f"Pathfinder: image {path!r} is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                f"{self.resolution}x{self.resolution}"
            )
        x = torch.from_numpy(pixels).reshape(-1, 1) / 127.5 - 1.0
        return x, x.shape[0], label
