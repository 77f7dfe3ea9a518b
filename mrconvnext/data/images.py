"""ImageNet-style image data in the formats ImageNet is stored in, for ``train_imagenet.py``.

``--dataset`` names the format of ``--data-dir`` (:func:`create_image_dataset`):

``''`` (an image folder)
    ``DIR/<split>/<class>/<image>``, read by timm's ``ImageDataset`` (as
    :class:`ImageFolderDataset`: an unreadable image is logged with its path).
``wds`` (or timm's spelling ``wds/NAME``)
    webdataset tar shards in the layout of ``timm/imagenet-1k-wds``: ``DIR/imagenet1k-train-0000.tar``, ...; a
    sample is a run of members that share a key (``KEY.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` the image,
    ``KEY.cls`` its label as decimal text, others such as ``KEY.json`` ignored); ``DIR/_info.json`` (or
    ``_info.yaml``) lists each split's ``filenames`` and ``shard_lengths`` (the metadata timm's ``ReaderWds``
    reads). Without it a split is every ``*.tar`` whose name holds the split as a ``-`` / ``_`` / ``.``
    separated word, and the shards' lengths are counted from their tar headers at start.
``parquet``
    parquet files in the layout of ``ILSVRC/imagenet-1k`` on the Hugging Face Hub: ``DIR/data/<split>-*.parquet``
    (or ``DIR/<split>-*.parquet``) with an ``image`` column (``{bytes, path}``, as ``datasets.Image`` stores
    images) and an integer ``label`` column; lengths are read from the parquet footers.
``hfds``
    a ``datasets.DatasetDict`` (or one ``Dataset``) written by ``save_to_disk``, with ``image`` and ``label``
    columns (:class:`HfDiskImageDataset`, random access).
``hfds/NAME`` and other map-style timm names
    timm's ``create_dataset`` (``hfds/NAME``: ``datasets.load_dataset(NAME)`` with ``--data-dir`` as its cache).

Tar and parquet shards are read by :class:`ShardedImageDataset`, an iterable dataset that splits every epoch
exactly over processes and loader workers and can start an epoch at any batch (a mid-epoch resume), which
timm's ``ReaderWds`` cannot: it gives each worker whole shards and cuts its stream at an estimated length
(its own comment: a worker can miss or repeat samples), skips truncated or malformed records with a warning,
and has no position to resume from. Here every process and worker gets its own samples of one epoch order
(shards shuffled per epoch, then samples shuffled within windows of consecutive samples), each seen once per
epoch, and a truncated shard or a record without an image or a label is an error naming the file.

In training, the random draws of a sample's augmentation are seeded by ``(seed, epoch, sample)``
(:func:`sample_seed`, :class:`SampleSeededDataset`): the same run gives every sample the same crop, flip,
RandAugment and erasing draws whatever the number of processes and workers, the loader's prefetching or a
restart in the middle of an epoch.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from timm.data import ImageDataset, get_img_extensions
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..utils.evaluation import PADDING_TARGET, UNREADABLE_TARGET
from .common import UNREADABLE_IMAGE, DataFormatError

_logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_SPLIT_DIRS",
    "IMAGE_EXTENSIONS",
    "SHARD_FORMATS",
    "HfDiskImageDataset",
    "ImageFolderDataset",
    "ParquetShardReader",
    "SampleSeededDataset",
    "Shard",
    "ShardedImageDataset",
    "TarShardReader",
    "check_num_classes",
    "create_image_dataset",
    "datasets_below",
    "find_image_folder",
    "has_image",
    "list_parquet_shards",
    "list_tar_shards",
    "sample_seed",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the members a wds sample's image is read from, in this order
LABEL_EXTENSION = "cls"
INFO_FILES = ("_info.json", "_info.yaml")
SHARD_FORMATS = ("wds", "parquet")
DEFAULT_SHUFFLE_WINDOW = 4096
_READER_CACHE = 16  # open shards (tar indexes, parquet files) kept per loader worker
_TAR_END_BYTES = 1024  # a complete tar ends with two zero blocks of 512 bytes after its last member
EVAL_SPLIT_DIRS = ("val", "validation", "valid", "eval", "evaluation", "test")
_MAX_UNREADABLE = 10  # consecutive unreadable training images before the loader gives up (timm's default)


# ------------------------------------------------------------------------------------------ image folders


def has_image(folder: str) -> bool:
    """Whether ``folder`` holds an image file, at any depth (stops at the first one)."""
    extensions = get_img_extensions(as_set=True)
    for _, _, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(name)[1].lower() in extensions for name in files):
            return True
    return False


def datasets_below(root: str) -> list[str]:
    """The sub-folders of ``root`` that are dataset roots themselves: a ``train/`` or ``val/`` (or other evaluation
    split) folder of theirs holds images, e.g. ``demo_output/shapes`` of ``demo_output``."""
    splits = ("train", *EVAL_SPLIT_DIRS)
    children = sorted(e.path for e in os.scandir(root) if e.is_dir())
    return [
        path
        for path in children
        if any(os.path.isdir(os.path.join(path, s)) and has_image(os.path.join(path, s)) for s in splits)
    ]


def find_image_folder(root: str, split_dirs: tuple[str, ...] = EVAL_SPLIT_DIRS) -> str:
    """The ImageFolder to evaluate: ``root`` itself, or its first existing ``split_dirs`` child (``root/val``).

    Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a bad path and ``ValueError`` when the folder
    holds no images or holds images that are not in class sub-folders (``<folder>/<class>/<image>``).
    """
    if not root:
        raise ValueError("no dataset given: pass --data-dir DIR (an ImageFolder: DIR/<class>/<image>, or DIR/val/...)")
    if not os.path.exists(root):
        raise FileNotFoundError(f"data dir {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data dir {root!r} is not a directory")
    folder = next((os.path.join(root, d) for d in split_dirs if os.path.isdir(os.path.join(root, d))), root)
    nested = datasets_below(root) if folder == root else []
    if nested:  # a folder of runs, plots and datasets: its "classes" would be their names
        raise ValueError(f"{root!r} is not an image folder but holds one: pass --data-dir {nested[0]}")
    extensions = get_img_extensions(as_set=True)

    def is_image(name: str) -> bool:
        return os.path.splitext(name)[1].lower() in extensions

    loose = sorted(f for f in os.listdir(folder) if is_image(f) and os.path.isfile(os.path.join(folder, f)))
    if loose:
        raise ValueError(
            f"{folder!r} holds images directly ({loose[0]!r}, ...); expected one sub-folder per class: "
            f"{folder}/<class>/<image>"
        )
    if not any(is_image(f) for _, _, files in os.walk(folder, followlinks=True) for f in files):
        raise ValueError(
            f"no images found under {folder!r} (extensions {', '.join(sorted(extensions))}); "
            f"expected {folder}/<class>/<image>"
        )
    return folder


def check_num_classes(class_to_idx: dict, num_classes: int, class_map: str = "") -> None:
    """Raise ``ValueError`` unless the dataset's class indices span exactly the model's ``num_classes`` outputs."""
    data_classes = max(class_to_idx.values()) + 1
    if data_classes != num_classes:
        source = f"class map {class_map!r}" if class_map else f"{len(class_to_idx)} class folders"
        raise ValueError(
            f"class count mismatch: the dataset has {data_classes} classes ({source}) but the model has "
            f"{num_classes} outputs; pass --num-classes {data_classes} for a checkpoint trained on this dataset, "
            "or --class-map to map folder names to the model's class indices"
        )


class ImageFolderDataset(ImageDataset):
    """timm's ``ImageDataset`` that names an unreadable image (a truncated or corrupt file) in a warning with its
    path. ``unreadable="mark"`` (evaluation) gives it target :data:`UNREADABLE_TARGET`, which
    :func:`sample_metrics` and :class:`MetricSums` leave out of every metric and count; ``unreadable="next"``
    (training) uses the next readable image instead, as timm does."""

    def __init__(self, *args, unreadable: str = "mark", **kwargs) -> None:
        if unreadable not in ("mark", "next"):
            raise ValueError(f"unreadable={unreadable!r}: expected 'mark' or 'next'")
        super().__init__(*args, **kwargs)
        self.unreadable = unreadable

    def _load(self, index: int) -> tuple[Image.Image, int | None]:
        file, target = self.reader[index][:2]
        try:
            img = Image.open(file)
            img = img.convert(self.input_img_mode) if self.input_img_mode else img
            img.load()
        finally:
            file.close()
        return img, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for _ in range(_MAX_UNREADABLE):
            try:
                img, target = self._load(index)
                break
            except UNREADABLE_IMAGE as e:
                path = self.filename(index, absolute=True)
                if self.unreadable == "mark":
                    _logger.warning(f"skipped unreadable image {path!r}: {e}")
                    img, target = Image.new(self.input_img_mode or "RGB", (1, 1)), UNREADABLE_TARGET
                    break
                _logger.warning(f"unreadable image {path!r} replaced by the next one: {e}")
                index = (index + 1) % len(self)
        else:
            raise RuntimeError(f"{_MAX_UNREADABLE} consecutive unreadable images, the last {path!r}")
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = UNREADABLE_TARGET
        elif target >= 0 and self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


# ------------------------------------------------------------------------------------------ seeded draws


@contextmanager
def sample_seed(*key: int) -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU) global random draws inside the block seeded by ``key``. In the main
    process the states outside the block are left as they were (the training's own draws); a loader worker's
    are not kept (nothing else draws there, and saving NumPy's state costs more than the seeding). The CUDA
    generators are not touched."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state()) if not get_worker_info() else None
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])


class SampleSeededDataset(Dataset):
    """``dataset[index]`` with the random draws of its transform seeded by ``(seed, epoch, index)``;
    ``set_epoch`` (called by the training runner each epoch) picks the epoch."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with sample_seed(self.seed, self.epoch, index):
            return self.dataset[index]


def check_label(label: int, num_classes: int | None, where: str, key: str) -> int:
    """``label``, after checking that it is one of the model's ``num_classes`` outputs (shards hold labels, not a
    class list): else an error naming ``where`` (the file) and ``key`` (the sample)."""
    if num_classes is not None and not 0 <= label < num_classes:
        raise DataFormatError(
            f"{where}: {key} has label {label}, not one of the model's {num_classes} classes "
            f"(0 .. {num_classes - 1}, --num-classes {num_classes})"
        )
    return label


def _decode(data: bytes, path: str, key: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")  # decodes every pixel: a damaged image fails here
    except UNREADABLE_IMAGE as e:
        raise DataFormatError(f"{path}: cannot decode the image of sample {key!r}: {e}") from e


# ------------------------------------------------------------------------------------------ tar shards


@dataclass(frozen=True)
class Shard:
    """One file of samples and the number of samples it holds."""

    path: str
    num_samples: int


_KEY_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")  # webdataset's key / extension split: key up to the first dot


class TarShardReader:
    """Random access to the samples of one webdataset tar: the member offsets come from one pass over the tar
    headers (no image data is read); ``expected`` (from ``_info``) is checked against what the file holds."""

    def __init__(self, path: str, expected: int | None = None) -> None:
        self.path = path
        self.samples: list[tuple[str, tuple[int, int], int]] = []  # key, (offset, size) of the image, label
        size = os.path.getsize(path)
        self.file = open(path, "rb")  # noqa: SIM115  (kept open while the shard is read)
        groups: list[tuple[str, dict[str, tuple[int, int]]]] = []  # consecutive members sharing a key
        try:
            with tarfile.open(fileobj=self.file, mode="r:") as tar:
                for info in tar:
                    match = _KEY_EXT.match(info.name) if info.isfile() else None
                    if match is None:
                        continue
                    if info.offset_data + info.size > size:
                        raise DataFormatError(
                            f"{path}: truncated: member {info.name!r} needs {info.offset_data + info.size} bytes, "
                            f"the file has {size}"
                        )
                    if not groups or groups[-1][0] != match.group(1):
                        groups.append((match.group(1), {}))
                    groups[-1][1][match.group(2).lower()] = (info.offset_data, info.size)
                end = tar.offset
            for key, members in groups:
                self._add(key, members)
        except tarfile.TarError as e:
            self.file.close()
            raise DataFormatError(f"{path}: not a readable tar file: {e}") from e
        except DataFormatError:
            self.file.close()
            raise
        if size - end < _TAR_END_BYTES:
            self.file.close()
            raise DataFormatError(
                f"{path}: truncated: the tar ends after {len(self.samples)} samples without its end-of-archive blocks"
            )
        if expected is not None and len(self.samples) != expected:
            self.file.close()
            raise DataFormatError(
                f"{path}: holds {len(self.samples)} samples but the shard metadata (_info) lists {expected}"
            )

    def _add(self, key: str, members: dict[str, tuple[int, int]]) -> None:
        image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image is None:
            raise DataFormatError(
                f"{self.path}: sample {key!r} has no image (members: {sorted(members)}; expected one of "
                f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)})"
            )
        if LABEL_EXTENSION not in members:
            raise DataFormatError(f"{self.path}: sample {key!r} has no label (.{LABEL_EXTENSION} member)")
        text = self._read(*members[LABEL_EXTENSION], key)
        try:
            label = int(text.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise DataFormatError(f"{self.path}: sample {key!r} has label {text[:20]!r}, expected an integer") from None
        self.samples.append((key, image, label))

    def _read(self, offset: int, size: int, key: str) -> bytes:
        self.file.seek(offset)
        data = self.file.read(size)
        if len(data) != size:
            raise DataFormatError(f"{self.path}: truncated in sample {key!r}")
        return data

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[str, bytes, int]:
        """``(key, image bytes, label)`` of sample ``index``."""
        key, (offset, size), label = self.samples[index]
        return key, self._read(offset, size, key), label

    def close(self) -> None:
        self.file.close()


def _counted_shards(paths: list[str], open_shard: Callable[[str], Any]) -> list[Shard]:
    """``paths`` as shards, each opened once to count its samples (and check it)."""
    shards = []
    for path in paths:
        reader = open_shard(path)
        shards.append(Shard(path, len(reader)))
        reader.close()
    return shards


def _split_words(name: str) -> list[str]:
    return re.split(r"[-_.]", name)


def _load_info(root: str) -> tuple[dict, str] | tuple[None, None]:
    for name in INFO_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    info = json.load(f) if name.endswith(".json") else yaml.safe_load(f)
            except (OSError, ValueError, yaml.YAMLError) as e:
                raise DataFormatError(f"{path}: unreadable shard metadata: {e}") from e
            if not isinstance(info or {}, dict):
                raise DataFormatError(f"{path}: shard metadata is a {type(info).__name__}, expected a mapping")
            return info or {}, path
    return None, None


def list_tar_shards(root: str, split: str) -> list[Shard]:
    """The tar shards of ``split`` in ``root`` with their sample counts (from ``_info``, else counted)."""
    if not os.path.isdir(root):
        raise DataFormatError(f"webdataset folder {root!r} does not exist")
    info, info_path = _load_info(root)
    if info is not None:
        splits = info.get("splits") or {}
        if split not in splits:
            raise DataFormatError(f"{info_path} has no split {split!r} (splits: {', '.join(splits) or 'none'})")
        entry = splits[split]
        names, lengths = entry.get("filenames") or [], entry.get("shard_lengths") or []
        if not names or len(names) != len(lengths):
            raise DataFormatError(
                f"{info_path}: split {split!r} needs 'filenames' and 'shard_lengths' of equal length, got "
                f"{len(names)} and {len(lengths)}"
            )
        shards = [Shard(os.path.join(root, n), int(c)) for n, c in zip(names, lengths, strict=True)]
        missing = [s.path for s in shards if not os.path.isfile(s.path)]
        if missing:
            raise DataFormatError(f"{info_path} lists {len(missing)} missing shard(s) of {split!r}: {missing[0]}, ...")
        return shards
    names = sorted(n for n in os.listdir(root) if n.endswith(".tar") and split in _split_words(n[: -len(".tar")]))
    if not names:
        raise DataFormatError(
            f"no tar shards of split {split!r} in {root!r}: expected {root}/_info.json (timm's webdataset "
            f"metadata) or files such as {root}/imagenet1k-{split}-0000.tar"
        )
    return _counted_shards([os.path.join(root, name) for name in names], TarShardReader)


# ------------------------------------------------------------------------------------------ parquet shards


class ParquetShardReader:
    """Random access to the rows of one parquet file with ``image`` (``{bytes, path}``) and ``label`` columns;
    the row group of the last row read is kept decoded."""

    def __init__(self, path: str, expected: int | None = None) -> None:
        import pyarrow.parquet as pq

        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged or truncated file
            raise DataFormatError(f"{path}: not a readable parquet file: {e}") from e
        columns = self.file.schema_arrow.names
        missing = [c for c in ("image", "label") if c not in columns]
        if missing:
            raise DataFormatError(
                f"{path}: no {' or '.join(missing)} column (columns: {', '.join(columns)}); expected the layout of "
                "ILSVRC/imagenet-1k: image {bytes, path} and label"
            )
        metadata = self.file.metadata
        self.starts = [0]
        for group in range(metadata.num_row_groups):
            self.starts.append(self.starts[-1] + metadata.row_group(group).num_rows)
        if expected is not None and len(self) != expected:
            raise DataFormatError(f"{path}: holds {len(self)} rows, expected {expected}")
        self._group, self._table = -1, None

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, index: int) -> tuple[str, bytes, int]:
        group = bisect.bisect_right(self.starts, index) - 1
        if group != self._group:
            try:
                self._table = self.file.read_row_group(group, columns=["image", "label"])
            except Exception as e:
                raise DataFormatError(f"{self.path}: cannot read row group {group}: {e}") from e
            self._group = group
        row = index - self.starts[group]
        image = self._table.column("image")[row].as_py()
        label = self._table.column("label")[row].as_py()
        key = f"row {index}"
        if isinstance(image, dict):
            data = image.get("bytes")
            if data is None and image.get("path") and os.path.isfile(image["path"]):
                with open(image["path"], "rb") as f:
                    data = f.read()
        else:
            data = image
        if not data:
            raise DataFormatError(f"{self.path}: {key} has no image")
        if label is None:
            raise DataFormatError(f"{self.path}: {key} has no label")
        return key, data, int(label)

    def close(self) -> None:
        self.file.close()


def list_parquet_shards(root: str, split: str) -> list[Shard]:
    """The parquet files of ``split`` (``root/data/<split>-*.parquet`` or ``root/<split>-*.parquet``), with the
    row counts of their footers."""
    if not os.path.isdir(root):
        raise DataFormatError(f"parquet folder {root!r} does not exist")
    folders = [os.path.join(root, "data"), root, os.path.join(root, split)]
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        inside = folder.endswith(os.sep + split)
        names = sorted(
            n
            for n in os.listdir(folder)
            if n.endswith(".parquet") and (inside or _split_words(n[: -len(".parquet")])[0] == split)
        )
        if names:
            return _counted_shards([os.path.join(folder, name) for name in names], ParquetShardReader)
    raise DataFormatError(
        f"no parquet files of split {split!r} in {root!r}: expected {root}/data/{split}-00000-of-00001.parquet "
        "(the layout of ILSVRC/imagenet-1k)"
    )


# ------------------------------------------------------------------------------------------ sharded dataset


class ShardedImageDataset(IterableDataset):
    """The samples of ``shards``, each process and loader worker yielding its own share of every epoch.

    An epoch's order: the shards (shuffled per epoch in training), their samples concatenated, the first
    ``num_samples`` of them (default: all). In training each process takes ``per_process`` consecutive samples
    of that order (the same whole number of batches on every process; the remainder of the epoch, fewer than
    ``world_size * batch_size`` samples, is left out), permuted within windows of ``shuffle_window``; in
    evaluation each process takes ``ceil(num_samples / world_size)`` samples in order, the last ones padded
    with repeats labelled :data:`~mrconvnext.utils.evaluation.PADDING_TARGET` (left out of every metric), so
    every sample is counted exactly once. Batch ``i`` of a process comes from loader worker ``i % workers``,
    which is the order in which the loader returns them. With ``num_classes`` every label is checked against it
    (:func:`check_label`).

    Yields ``(transform(image), label)``; ``shards_over_processes`` tells the training runner not to shard it
    again. ``start_epoch_at(epoch, batch)`` makes the next pass over ``epoch`` start at ``batch`` of this
    process: a mid-epoch resume reads none of the samples before it. A run interrupted with another number of
    processes or batch size (``start_epoch_at(epoch, batch, world_size, batch_size)``, that run's) left a
    part of each of its processes' shares: the rest of the epoch is those parts, concatenated in rank order
    and split into consecutive shares again, so every sample of the epoch is still read once.
    """

    shards_over_processes = True

    def __init__(
        self,
        shards: Sequence[Shard],
        open_shard: Callable[[str, int | None], Any],
        transform: Callable | None,
        *,
        train: bool,
        batch_size: int,
        seed: int = 42,
        num_samples: int | None = None,
        shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
        rank: int | None = None,
        world_size: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.shards = list(shards)
        self.num_classes = num_classes
        self.open_shard = open_shard
        self.transform = transform
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.starts = np.cumsum([0] + [s.num_samples for s in self.shards])
        self.total = int(self.starts[-1])
        self.num_samples = self.total if num_samples is None else num_samples
        where = os.path.dirname(self.shards[0].path) if self.shards else "?"
        if not 0 < self.num_samples <= self.total:
            raise DataFormatError(f"{where}: {self.num_samples} samples per epoch asked, the shards hold {self.total}")
        self.shuffle_window = shuffle_window
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.epoch, self.start_batch, self.start_plan = 0, 0, (self.world_size, batch_size)
        self._readers: OrderedDict[int, Any] = OrderedDict()

    # position ---------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_batch, self.start_plan = epoch, 0, (self.world_size, self.batch_size)

    def start_epoch_at(
        self, epoch: int, batch: int, world_size: int | None = None, batch_size: int | None = None
    ) -> None:
        """Start the next pass over ``epoch`` after ``batch`` batches of each process of a run with
        ``world_size`` processes taking ``batch_size`` samples per batch (default: this run's)."""
        if not self.train and (world_size, batch_size) != (None, None):
            raise ValueError("an evaluation pass is not resumed: it has no position in another run's plan")
        self.epoch, self.start_batch = epoch, batch
        self.start_plan = (world_size or self.world_size, batch_size or self.batch_size)

    @property
    def epoch_order(self) -> dict[str, Any]:
        """What the order of an epoch's samples depends on besides the processes' plan (a checkpoint records it):
        the seed, the samples per epoch, the shuffle window and the shards (names and sizes, as a digest)."""
        shards = json.dumps([[os.path.basename(s.path), s.num_samples] for s in self.shards])
        digest = hashlib.sha1(shards.encode()).hexdigest()[:12]
        return {"seed": self.seed, "samples": self.num_samples, "shuffle_window": self.shuffle_window, "shards": digest}

    # plan -------------------------------------------------------------------------------------------------

    def _share(self, world_size: int, batch_size: int) -> int:
        if self.train:
            return self.num_samples // world_size // batch_size * batch_size
        return math.ceil(self.num_samples / world_size)

    @property
    def per_process(self) -> int:
        """Samples this process yields per epoch (evaluation: with the padding)."""
        return self._share(self.world_size, self.batch_size)

    def __len__(self) -> int:
        return self.per_process

    def epoch_samples(self, epoch: int) -> np.ndarray:
        """Sample ids (positions in the unshuffled shard list) of this process in epoch ``epoch``; -1 - id
        marks a padding repeat of sample ``id``."""
        return self._process_samples(self._epoch_order(epoch), epoch, self.rank, self.world_size, self.batch_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = np.arange(len(self.shards))
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in order])[: self.num_samples]

    def _process_samples(self, ids: np.ndarray, epoch: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
        count = self._share(world_size, batch_size)
        first = rank * count
        if not self.train:
            positions = np.arange(first, first + count)
            real = positions < self.num_samples
            return np.where(real, ids[positions % self.num_samples], -1 - ids[positions % self.num_samples])
        mine = ids[first : first + count].copy()
        window = max(batch_size, self.shuffle_window // batch_size * batch_size)
        for start in range(0, count, window):
            rng = np.random.default_rng([self.seed, epoch, rank, start])
            mine[start : start + window] = rng.permutation(mine[start : start + window])
        return mine

    def remaining_samples(self) -> np.ndarray:
        """The samples this process has left to yield in the current epoch, from its start position."""
        if self.start_plan == (self.world_size, self.batch_size):
            return self.epoch_samples(self.epoch)[self.start_batch * self.batch_size :]
        world_size, batch_size = self.start_plan
        ids = self._epoch_order(self.epoch)
        rest = np.concatenate(
            [
                self._process_samples(ids, self.epoch, rank, world_size, batch_size)[self.start_batch * batch_size :]
                for rank in range(world_size)
            ]
        )
        count = len(rest) // self.world_size // self.batch_size * self.batch_size
        return rest[self.rank * count : (self.rank + 1) * count]

    # reading ----------------------------------------------------------------------------------------------

    def _reader(self, shard: int) -> Any:
        if shard in self._readers:
            self._readers.move_to_end(shard)
            return self._readers[shard]
        reader = self.open_shard(self.shards[shard].path, self.shards[shard].num_samples)
        self._readers[shard] = reader
        if len(self._readers) > _READER_CACHE:
            self._readers.popitem(last=False)[1].close()
        return reader

    def _load(self, sample: int) -> tuple[Image.Image, int]:
        shard = int(np.searchsorted(self.starts, sample, side="right")) - 1
        reader = self._reader(shard)
        key, data, label = reader.read(sample - int(self.starts[shard]))
        return _decode(data, reader.path, key), check_label(label, self.num_classes, reader.path, f"sample {key!r}")

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        epoch = self.epoch
        samples = self.remaining_samples()
        for batch in range(worker_id, math.ceil(len(samples) / self.batch_size), workers):
            for entry in samples[batch * self.batch_size : (batch + 1) * self.batch_size]:
                sample = int(entry) if entry >= 0 else int(-1 - entry)
                img, label = self._load(sample)
                if self.transform is not None:
                    if self.train:
                        with sample_seed(self.seed, epoch, sample):
                            img = self.transform(img)
                    else:
                        img = self.transform(img)
                yield img, (label if entry >= 0 else PADDING_TARGET)


# ------------------------------------------------------------------------------------------ save_to_disk


class HfDiskImageDataset(Dataset):
    """The ``split`` of a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``DatasetDict``, or a
    ``Dataset`` at ``root`` or ``root/<split>``), with ``image`` and ``label`` columns; ``(transform(image),
    label)`` per row."""

    def __init__(
        self, root: str, split: str, transform: Callable | None = None, num_classes: int | None = None
    ) -> None:
        import datasets

        self.root, self.transform, self.num_classes = root, transform, num_classes
        path = os.path.join(root, split) if os.path.isfile(os.path.join(root, split, "state.json")) else root
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:  # a damaged folder fails anywhere in datasets (KeyError, arrow errors, ...)
            raise DataFormatError(
                f"{path!r} is not a dataset written by datasets' save_to_disk (dataset_dict.json or state.json): "
                f"{type(e).__name__}: {e}"
            ) from e
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataFormatError(f"{path!r} has no split {split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[split]
        missing = [c for c in ("image", "label") if c not in loaded.column_names]
        if missing:
            raise DataFormatError(
                f"{path!r} split {split!r}: no {' or '.join(missing)} column (columns: {', '.join(loaded.column_names)})"
            )
        if isinstance(loaded.features["image"], datasets.Image):
            loaded = loaded.cast_column("image", datasets.Image(decode=False))  # decoded here, as the shards are
        self.dataset, self.split = loaded, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.dataset[index]
        image, label = row["image"], row["label"]
        where = f"{self.root} ({self.split})"
        if isinstance(image, dict):
            data = image.get("bytes")
            if data is None and image.get("path"):
                with open(image["path"], "rb") as f:
                    data = f.read()
            image = None if data is None else _decode(data, where, f"row {index}")
        if image is None:
            raise DataFormatError(f"{where}: row {index} has no image")
        if label is None:
            raise DataFormatError(f"{where}: row {index} has no label")
        label = check_label(int(label), self.num_classes, where, f"row {index}")
        img = image.convert("RGB")
        return (self.transform(img) if self.transform is not None else img), label


# ------------------------------------------------------------------------------------------ entry point


_OPENERS = {"wds": TarShardReader, "parquet": ParquetShardReader}
_LISTERS = {"wds": list_tar_shards, "parquet": list_parquet_shards}


def create_image_dataset(
    name: str,
    root: str,
    split: str,
    *,
    train: bool,
    transform: Callable | None,
    batch_size: int,
    seed: int = 42,
    num_samples: int | None = None,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    num_classes: int | None = None,
) -> Dataset:
    """The ``split`` of ``root`` in format ``name`` (see the module docstring); a training set's augmentation
    draws are seeded per sample. Raises :class:`DataFormatError` naming the file or folder at fault; with
    ``num_classes`` also for a sharded or ``save_to_disk`` label that is not one of the model's classes (an image
    folder's classes are its subfolders, checked against the model by the caller)."""
    kind = name.split("/", 1)[0].lower()
    if kind in SHARD_FORMATS:
        return ShardedImageDataset(
            _LISTERS[kind](root, split),
            _OPENERS[kind],
            transform,
            train=train,
            batch_size=batch_size,
            seed=seed,
            num_samples=num_samples,
            shuffle_window=shuffle_window,
            num_classes=num_classes,
        )
    if name == "hfds":
        dataset: Dataset = HfDiskImageDataset(root, split, transform, num_classes)
    elif kind in ("hfids", "tfds"):
        raise DataFormatError(
            f"--dataset {name}: timm's iterable readers are not supported (their epochs are not split exactly over "
            "processes and cannot be resumed mid-epoch); use --dataset wds or parquet on the downloaded shards"
        )
    elif not name:  # an unreadable image named with its path: the next one in training, left out in evaluation
        folder = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
        dataset = ImageFolderDataset(folder, transform=transform, unreadable="next" if train else "mark")
    else:
        from timm.data import create_dataset

        dataset = create_dataset(name, root=root, split=split, is_training=train, transform=transform)
    return SampleSeededDataset(dataset, seed) if train else dataset
