"""ImageNet in the formats it is stored in (mrconvnext.data.images): webdataset tar shards, parquet files and a
``save_to_disk`` dataset, next to the image folder, all written here (tests/image_formats.py).

- every sample is seen once per epoch across processes and loader workers (sample ids counted), an epoch can
  start at any batch, the epoch length is given or read from the shard metadata;
- a truncated shard or a record without an image or a label is an error naming the file;
- validation gives the same loss, top-1 and top-5 on every format as on the folder, in one process and in two
  (``torchrun --nproc_per_node 2`` runs this file);
- ``train_imagenet.py`` trains on each format in one process (two processes: tests/test_preemption.py, wds with
  SIGTERM, parquet under the SLURM script, hfds with a two-node rendezvous).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import resolve_data_config
from torch.utils.data import DataLoader

from mrconvnext import train_imagenet
from mrconvnext.data import DataFormatError
from mrconvnext.data.images import (
    HfDiskImageDataset,
    ParquetShardReader,
    ShardedImageDataset,
    TarShardReader,
    create_image_dataset,
    list_parquet_shards,
    list_tar_shards,
)
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.utils.evaluation import UNREADABLE_TARGET
from mrconvnext.utils.training import TrainingRun
from tests.image_formats import bomb_png, write_formats, write_parquet, write_wds, write_wds_info

ROOT = Path(__file__).resolve().parents[1]
NUM_IDS = 48
SHARD_LENGTHS = [7, 13, 10, 18]  # uneven: batches and shuffle windows cross shard boundaries
OPENERS = {"wds": TarShardReader, "parquet": ParquetShardReader}
TRAIN_ARGS = [
    "--model", "mrconvnext_atto", "--num-classes", "2", "--img-size", "32", "-b", "8", "--epochs", "1",
    "--lr", "2e-3", "--warmup-epochs", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
    "--smoothing", "0", "--workers", "0", "--no-model-ema", "--crop-pct", "1.0", "--val-split", "validation",
]  # fmt: skip


def _id_image(sample: int) -> bytes:
    """A 4 x 4 PNG whose first pixel spells ``sample``."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (sample % 256, sample // 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_id(img: Image.Image) -> torch.Tensor:
    red, green, _ = img.getpixel((0, 0))
    return torch.tensor(red + 256 * green)


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory) -> dict[str, Path]:
    """48 samples whose image spells their id (label id % 3), as tar shards and parquet files."""
    root = tmp_path_factory.mktemp("ids")
    samples = [(f"s{i:03d}", _id_image(i), i % 3) for i in range(NUM_IDS)]
    names = write_wds(sorted(samples), root / "wds", "train", SHARD_LENGTHS)
    write_wds_info(root / "wds", {"train": (names, SHARD_LENGTHS)})
    write_parquet(samples, root / "parquet", "train", files=3, row_group=5)
    return {"wds": root / "wds", "parquet": root / "parquet"}


def _shards(kind: str, root: Path) -> list:
    return (list_tar_shards if kind == "wds" else list_parquet_shards)(str(root), "train")


def _dataset(kind: str, root: Path, rank: int, world: int, **kwargs) -> ShardedImageDataset:
    kwargs = {"train": True, "batch_size": 4, "shuffle_window": 8, "seed": 3, **kwargs}
    return ShardedImageDataset(_shards(kind, root), OPENERS[kind], pixel_id, rank=rank, world_size=world, **kwargs)


def _batches(dataset: ShardedImageDataset, epoch: int, workers: int = 2) -> list[list[tuple[int, int]]]:
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=dataset.batch_size, num_workers=workers)
    return [list(zip(ids.tolist(), labels.tolist(), strict=True)) for ids, labels in loader]


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_every_sample_once_per_epoch_across_processes_and_workers(kind, id_shards) -> None:
    orders = []
    for epoch in (0, 1):
        ranks = [_batches(_dataset(kind, id_shards[kind], rank, 2), epoch) for rank in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == NUM_IDS // 8  # the same whole number of batches per process
        seen = [sample for batches in ranks for batch in batches for sample in batch]
        assert sorted(i for i, _ in seen) == list(range(NUM_IDS))  # each sample once, none left out
        assert all(label == i % 3 for i, label in seen)
        orders.append([i for i, _ in seen])
    assert orders[0] != orders[1], "the epoch order must change with the epoch"
    single = [i for batch in _batches(_dataset(kind, id_shards[kind], 0, 1), 1, workers=0) for i, _ in batch]
    assert sorted(single) == list(range(NUM_IDS))  # one process without workers: every sample too


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_an_epoch_starts_at_any_batch(kind, id_shards) -> None:
    dataset = _dataset(kind, id_shards[kind], 1, 2)
    full = _batches(dataset, 1)
    dataset.start_epoch_at(1, 3)
    assert _batches(dataset, 1) == full[3:]  # set_epoch of the same epoch keeps the position
    assert _batches(dataset, 2) != full  # the next epoch starts at its first batch again
    assert len(_batches(dataset, 2)) == len(full)


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_a_resume_on_another_number_of_processes_reads_the_samples_left(kind, id_shards) -> None:
    """2 processes of batch 4 stopped after 2 batches each (16 of the epoch's 48 samples read); resumed by 1
    process of batch 8 or 4 of batch 2 (the same global batch), or 3 of batch 4: the rest of the epoch is the
    32 samples the two processes had left, each once, in as many batches as fit."""
    stopped = [_batches(_dataset(kind, id_shards[kind], rank, 2), 1) for rank in (0, 1)]
    left = sorted(i for batches in stopped for batch in batches[2:] for i, _ in batch)
    assert len(left) == 32
    for world, batch_size, expected in ((1, 8, left), (4, 2, left), (3, 4, None)):
        resumed = []
        for rank in range(world):
            dataset = _dataset(kind, id_shards[kind], rank, world, batch_size=batch_size)
            dataset.start_epoch_at(1, 2, world_size=2, batch_size=4)
            batches = _batches(dataset, 1)
            assert all(len(batch) == batch_size for batch in batches)
            resumed += [i for batch in batches for i, _ in batch]
        if expected is not None:
            assert sorted(resumed) == expected
        else:  # 3 x 4 does not divide 32: two whole batches per process, the rest of the samples left out
            assert len(resumed) == 24 and len(set(resumed)) == 24 and set(resumed) <= set(left)
        dataset.set_epoch(2)  # the next epoch is this run's own plan again
        assert len(_batches(dataset, 2)) == 48 // (world * batch_size)


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_the_epoch_order_a_checkpoint_records_changes_with_what_changes_the_samples(kind, id_shards, tmp_path) -> None:
    """``epoch_order`` (recorded in checkpoints, compared on a mid-epoch resume) is the same for every process,
    batch size and place of the shards, and differs with each setting that changes an epoch's samples."""
    base = _dataset(kind, id_shards[kind], 0, 2)
    shutil.copytree(id_shards[kind], tmp_path / "moved")
    assert _dataset(kind, tmp_path / "moved", 1, 4, batch_size=2).epoch_order == base.epoch_order
    for change in ({"seed": 4}, {"num_samples": 40}, {"shuffle_window": 16}):
        other = _dataset(kind, id_shards[kind], 0, 2, **change)
        assert other.epoch_order != base.epoch_order
        assert not np.array_equal(other.epoch_samples(1), base.epoch_samples(1)), change
    fewer = ShardedImageDataset(
        _shards(kind, id_shards[kind])[1:], OPENERS[kind], pixel_id, train=True, batch_size=4, seed=3, shuffle_window=8
    )
    assert fewer.epoch_order["shards"] != base.epoch_order["shards"]


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_evaluation_counts_every_sample_once(kind, id_shards) -> None:
    ranks = [_batches(_dataset(kind, id_shards[kind], r, 2, train=False, num_samples=45), 0) for r in (0, 1)]
    assert [len(b) for b in ranks] == [6, 6] and [len(b[-1]) for b in ranks] == [3, 3]  # 23 per process
    seen = [sample for batches in ranks for batch in batches for sample in batch]
    real = sorted(i for i, label in seen if label >= 0)
    assert len(real) == 45 and len(set(real)) == 45 and len(seen) - len(real) == 1  # one padding repeat


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_epoch_length_given_or_from_the_shard_metadata(kind, id_shards, tmp_path) -> None:
    lengths = [s.num_samples for s in _shards(kind, id_shards[kind])]  # _info.json, or the parquet footers
    assert lengths == (SHARD_LENGTHS if kind == "wds" else [16, 16, 16])
    ranks = [_batches(_dataset(kind, id_shards[kind], r, 2, num_samples=32), 0) for r in (0, 1)]
    seen = [i for batches in ranks for batch in batches for i, _ in batch]
    assert len(seen) == len(set(seen)) == 32
    if kind == "wds":  # without _info.json the lengths are counted from the tar headers
        shutil.copytree(id_shards[kind], tmp_path / "wds")
        (tmp_path / "wds" / "_info.json").unlink()
        assert [s.num_samples for s in _shards(kind, tmp_path / "wds")] == SHARD_LENGTHS


# ------------------------------------------------------------------------------------------------ errors


def _read_all(kind: str, root: Path) -> None:
    for _ in _dataset(kind, root, 0, 1, train=False):
        pass


def test_truncated_tar_names_the_file(id_shards, tmp_path) -> None:
    shutil.copytree(id_shards["wds"], tmp_path / "wds")
    shard = tmp_path / "wds" / "imagenet1k-train-0001.tar"
    for cut in (shard.stat().st_size // 2, 3 * 1024 + 100):  # inside a member's data, inside a header
        shard.write_bytes((id_shards["wds"] / shard.name).read_bytes()[:cut])
        with pytest.raises(DataFormatError, match=rf"{re.escape(str(shard))}: truncated"):
            _read_all("wds", tmp_path / "wds")
    with tarfile.open(id_shards["wds"] / shard.name) as tar:
        last = tar.getmembers()[-1].offset  # cut between two members: no end-of-archive blocks
    shard.write_bytes((id_shards["wds"] / shard.name).read_bytes()[:last])
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(shard))}: truncated: the tar ends after 13 samples"):
        _read_all("wds", tmp_path / "wds")


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "members, message",
    [
        ({"a.png": _id_image(0), "a.cls": b"0", "b.cls": b"1", "b.json": b"{}"}, "sample 'b' has no image"),
        ({"a.png": _id_image(0), "a.cls": b"0", "b.png": _id_image(1)}, "sample 'b' has no label"),
        ({"a.png": _id_image(0), "a.cls": b"zero"}, "sample 'a' has label b'zero', expected an integer"),
    ],
)
def test_malformed_record_names_the_file(members, message, tmp_path) -> None:
    _tar(tmp_path / "imagenet1k-train-0000.tar", members)
    path = re.escape(str(tmp_path / "imagenet1k-train-0000.tar"))
    with pytest.raises(DataFormatError, match=rf"{path}: {re.escape(message)}"):
        list_tar_shards(str(tmp_path), "train")


def test_an_image_pil_refuses_is_unreadable_in_the_folder_and_the_shards(tmp_path) -> None:
    """The image folder marks it unreadable (evaluation leaves it out), a shard names it in a DataFormatError, as
    for a truncated image."""
    (tmp_path / "folder" / "a").mkdir(parents=True)
    (tmp_path / "folder" / "a" / "0.png").write_bytes(bomb_png())
    (tmp_path / "folder" / "a" / "1.png").write_bytes(_id_image(1))
    folder = create_image_dataset("", str(tmp_path / "folder"), "validation", train=False, transform=None, batch_size=1)
    assert [target for _, target in folder] == [UNREADABLE_TARGET, 0]
    (tmp_path / "wds").mkdir()
    _tar(tmp_path / "wds" / "imagenet1k-validation-0000.tar", {"a.png": bomb_png(), "a.cls": b"0"})
    shards = create_image_dataset("wds", str(tmp_path / "wds"), "validation", train=False, transform=None, batch_size=1)
    with pytest.raises(
        DataFormatError, match=r"imagenet1k-validation-0000\.tar: cannot decode the image of sample 'a'"
    ):
        list(shards)


def test_shard_metadata_that_does_not_match_the_shard(id_shards, tmp_path) -> None:
    shutil.copytree(id_shards["wds"], tmp_path / "wds")
    info = json.loads((tmp_path / "wds" / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][0] += 1
    (tmp_path / "wds" / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataFormatError, match=r"imagenet1k-train-0000.tar: holds 7 samples but .* lists 8"):
        _read_all("wds", tmp_path / "wds")
    with pytest.raises(DataFormatError, match=r"_info.json has no split 'val' \(splits: train\)"):
        list_tar_shards(str(tmp_path / "wds"), "val")
    (tmp_path / "wds" / "_info.json").write_text("[1, 2]")  # an AttributeError on .get before
    with pytest.raises(DataFormatError, match=r"_info.json: shard metadata is a list, expected a mapping"):
        list_tar_shards(str(tmp_path / "wds"), "train")


def test_parquet_errors_name_the_file(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": [{"bytes": _id_image(0), "path": None}], "target": [0]}), path)
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(path))}: no label column \(columns: image, target\)"):
        list_parquet_shards(str(tmp_path), "train")
    pq.write_table(
        pa.table({"image": [{"bytes": _id_image(0), "path": None}], "label": pa.array([None], pa.int64())}), path
    )
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(path))}: row 0 has no label"):
        _read_all("parquet", tmp_path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(path))}: not a readable parquet file"):
        list_parquet_shards(str(tmp_path), "train")


# ------------------------------------------------------------------------------------ the same images, each format


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    # 2 classes; 32 train images = 2 updates per epoch at 2 x 8; 10 val images = 3 batches of 4 over 2 ranks
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 16, 5, size=32, classes=("circle", "square"), seed=1)


@pytest.fixture(scope="module")
def formats(shapes, tmp_path_factory) -> dict[str, Path]:
    return write_formats(shapes, tmp_path_factory.mktemp("formats"))


def _args(data_dir: Path, output: Path, *extra: str):
    return train_imagenet.create_parser().parse_args(
        [*TRAIN_ARGS, "--data-dir", str(data_dir), "--output", str(output), "--experiment", "run", *extra]
    )


def evaluate_formats(run: TrainingRun, folder: Path, formats: dict[str, Path]) -> dict[str, dict]:
    """Loss / top-1 / top-5 / count of one seeded random MRConvNeXt-atto on the folder's val split and on the
    validation split of every format, through train_imagenet's loaders and the runner's evaluation."""
    args = _args(folder, Path(run.args.output), "--val-split", "val", "-vb", "4")
    torch.manual_seed(0)
    model = train_imagenet.create_model(args)
    data_config = resolve_data_config({"input_size": (3, 32, 32), "crop_pct": 1.0}, model=model)
    model = run.prepare(model)
    results = {}
    for name, root in {"": folder, **formats}.items():
        args.dataset, args.data_dir, args.val_split = name, str(root), "validation" if name else "val"
        _, val_loader = train_imagenet.create_loaders(args, data_config, run.accelerator)
        results[name or "folder"] = run.evaluate(model, run.prepare(val_loader), lambda b: (model(b[0]), b[1]))
    return results


def _assert_same_as_folder(results: dict[str, dict]) -> None:
    folder = results.pop("folder")
    assert folder["samples"] == 10 and sorted(results) == ["hfds", "parquet", "wds"]
    for name, metrics in results.items():
        assert metrics["samples"] == 10, name
        for key in ("top1", "top5"):
            assert metrics[key] == folder[key], (name, key)
        assert metrics["loss"] == pytest.approx(folder["loss"], rel=1e-6), name


def test_validation_is_the_folders_in_every_format(shapes, formats, tmp_path, fresh_accelerate_state) -> None:
    with TrainingRun(_args(shapes, tmp_path), "eval", {}) as run:
        _assert_same_as_folder(evaluate_formats(run, shapes, formats))


def test_two_processes_validate_as_the_folder_and_train_on_hfds(shapes, formats, tmp_path) -> None:
    """Under torchrun (this file's __main__): the validation above on 2 processes, then train_imagenet's training
    on the save_to_disk dataset (wds and parquet train on 2 processes in tests/test_preemption.py)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    cmd += [str(shapes), json.dumps({k: str(v) for k, v in formats.items()}), str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("{")]
    results = json.loads(line)
    _assert_same_as_folder(results["validation"])
    assert results["train"]["eval_samples"] == 10 and "updates/rank [2, 2]" in result.stderr
    with open(tmp_path / "run" / "summary.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1"]


@pytest.mark.parametrize("name", ["wds", "parquet", "hfds"])
def test_train_on_each_format_in_one_process(name, formats, tmp_path, fresh_accelerate_state) -> None:
    row = train_imagenet.train(
        [
            *TRAIN_ARGS,
            "--dataset",
            name,
            "--data-dir",
            str(formats[name]),
            "--output",
            str(tmp_path),
            "--experiment",
            "r",
        ]
    )
    assert row["eval_samples"] == 10 and row["epoch"] == 1
    with open(tmp_path / "r" / "summary.csv", newline="") as f:
        (csv_row,) = list(csv.DictReader(f))
    assert float(csv_row["train_loss"]) == pytest.approx(row["train_loss"])


@pytest.mark.parametrize("name", ["wds", "parquet", "hfds"])
def test_a_label_beyond_num_classes_names_the_file(name, formats, tmp_path, fresh_accelerate_state) -> None:
    """Shards hold labels, not a class list: a label the model has no output for is an error naming where it
    was read and ``--num-classes``, not torch's "Target 1 is out of bounds" from inside the loss."""
    args = [*TRAIN_ARGS, "--dataset", name, "--data-dir", str(formats[name]), "--output", str(tmp_path)]
    args[args.index("--num-classes") + 1] = "1"
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(formats[name]))}.*label 1\b.*--num-classes 1"):
        train_imagenet.train(args)


def test_missing_shards_are_a_preflight_error(formats, tmp_path, fresh_accelerate_state) -> None:
    from mrconvnext.utils.training import PreflightError

    args = [*TRAIN_ARGS, "--dataset", "wds", "--data-dir", str(formats["wds"]), "--output", str(tmp_path / "o")]
    with pytest.raises(PreflightError, match=r"_info.json has no split 'val' \(splits: train, validation\)"):
        train_imagenet.train([*args, "--val-split", "val"])
    with pytest.raises(PreflightError, match="webdataset folder .* does not exist"):
        train_imagenet.train([*args, "--data-dir", str(tmp_path / "nope")])
    assert not (tmp_path / "o").exists()


def test_a_damaged_save_to_disk_folder_names_itself(formats, tmp_path) -> None:
    """``datasets.load_from_disk`` fails on a damaged folder with whatever it meets (KeyError for a ``state.json``
    without its file list, an arrow error for a cut data file): one DataFormatError naming the folder."""
    for damage in ("state", "arrow"):
        damaged = tmp_path / damage
        shutil.copytree(formats["hfds"], damaged)
        if damage == "state":
            (damaged / "train" / "state.json").write_text("{}")
        else:
            for arrow in (damaged / "train").glob("*.arrow"):
                arrow.write_bytes(arrow.read_bytes()[:100])
        with pytest.raises(DataFormatError, match=rf"{re.escape(str(damaged / 'train'))}.* is not a dataset written"):
            HfDiskImageDataset(str(damaged), "train")


if __name__ == "__main__":  # under torchrun: test_two_processes_validate_as_the_folder_and_train_on_hfds
    folder, formats_json, output = sys.argv[1:]
    formats = {k: Path(v) for k, v in json.loads(formats_json).items()}
    args = _args(formats["hfds"], Path(output), "--dataset", "hfds")
    with TrainingRun(args, "hfds", train_imagenet.resume_meta(args), unit="img") as run:
        validation = evaluate_formats(run, Path(folder), formats)
        train = train_imagenet._train(args, run)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"validation": validation, "train": train}))
