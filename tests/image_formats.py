"""An image folder (``DIR/<split>/<class>/<image>``) rewritten in the formats ImageNet is stored in, for the tests:

- webdataset tar shards as ``timm/imagenet-1k-wds``: ``imagenet1k-<split>-NNNN.tar`` with ``KEY.<ext>`` (the
  image file's bytes), ``KEY.cls`` and ``KEY.json`` per sample, samples shuffled across shards, and
  ``_info.json`` with each split's ``filenames``, ``shard_lengths`` and ``num_samples``;
- parquet files as ``ILSVRC/imagenet-1k``: ``data/<split>-NNNNN-of-NNNNN.parquet`` with ``image`` ``{bytes,
  path}`` and ``label`` columns;
- a ``datasets.DatasetDict`` written by ``save_to_disk`` (``Image`` and ``ClassLabel`` features).

The folder's ``val`` split becomes ``validation``, as in both Hub copies; class indices are the sorted folder
names' (timm's ImageFolder order), so the same images get the same labels in every format.
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zlib
from pathlib import Path

SPLITS = {"train": "train", "val": "validation"}  # folder split -> split name in the shard formats


def folder_samples(split_dir: Path) -> list[tuple[str, bytes, int]]:
    """``(key, image bytes, label)`` of every image of ``split_dir/<class>/``, classes in sorted order."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    return [
        (f"{cls}_{image.stem}", image.read_bytes(), label)
        for label, cls in enumerate(classes)
        for image in sorted((split_dir / cls).iterdir())
    ]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(samples: list[tuple[str, bytes, int]], out: Path, split: str, shard_lengths: list[int]) -> list[str]:
    """Tar shards of ``samples`` (shuffled, seed 0) with the given lengths; returns their file names."""
    assert sum(shard_lengths) == len(samples)
    samples = random.Random(0).sample(samples, len(samples))
    out.mkdir(parents=True, exist_ok=True)
    names, start = [], 0
    for index, length in enumerate(shard_lengths):
        name = f"imagenet1k-{split}-{index:04d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for key, data, label in samples[start : start + length]:
                _tar_member(tar, f"{key}.png", data)
                _tar_member(tar, f"{key}.cls", str(label).encode())
                _tar_member(tar, f"{key}.json", json.dumps({"filename": f"{key}.png", "label": label}).encode())
        names.append(name)
        start += length
    return names


def write_wds_info(out: Path, splits: dict[str, tuple[list[str], list[int]]]) -> None:
    info = {
        "name": "shapes",
        "splits": {
            split: {"name": split, "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}
            for split, (names, lengths) in splits.items()
        },
    }
    (out / "_info.json").write_text(json.dumps(info, indent=2))


def write_parquet(samples: list[tuple[str, bytes, int]], out: Path, split: str, files: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "data").mkdir(parents=True, exist_ok=True)
    per_file = -(-len(samples) // files)
    for index in range(files):
        chunk = samples[index * per_file : (index + 1) * per_file]
        table = pa.table(
            {
                "image": pa.array(
                    [{"bytes": data, "path": f"{key}.png"} for key, data, _ in chunk],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
                ),
                "label": pa.array([label for _, _, label in chunk], pa.int64()),
            }
        )
        pq.write_table(table, out / "data" / f"{split}-{index:05d}-of-{files:05d}.parquet", row_group_size=row_group)


def write_hf_disk(splits: dict[str, list[tuple[str, bytes, int]]], classes: list[str], out: Path) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": [{"bytes": d, "path": None} for _, d, _ in rows], "label": [label for *_, label in rows]},
                features=features,
            )
            for split, rows in splits.items()
        }
    ).save_to_disk(str(out))


def write_formats(folder: Path, out: Path) -> dict[str, Path]:
    """``folder``'s splits in each format under ``out``; returns ``{--dataset: --data-dir}``."""
    samples = {SPLITS[split]: folder_samples(folder / split) for split in SPLITS}
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    wds = {}
    for split, rows in samples.items():  # uneven shard lengths: samples of one batch span shard boundaries
        lengths = [len(rows) // 3, len(rows) // 3 + 1]
        lengths.append(len(rows) - sum(lengths))
        wds[split] = (write_wds(rows, out / "wds", split, lengths), lengths)
        write_parquet(rows, out / "parquet", split, files=2, row_group=3)
    write_wds_info(out / "wds", wds)
    write_hf_disk(samples, classes, out / "hfds")
    return {"wds": out / "wds", "parquet": out / "parquet", "hfds": out / "hfds"}


def bomb_png() -> bytes:
    """A PNG whose header declares 20000 x 20000 pixels (over twice PIL's decompression-bomb limit) around almost no
    data: PIL refuses it with ``DecompressionBombError``, which is not an ``OSError``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
