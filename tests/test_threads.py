"""The default torch thread count of the tools: the cores left to each process once its data workers have theirs,
unless ``OMP_NUM_THREADS`` says otherwise; both training scripts and validate.py log what they chose."""

from __future__ import annotations

import logging
import os

import pytest
import timm
import torch

from mrconvnext import train_imagenet, validate
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.utils.checkpoint import checkpoint_record, save_checkpoint_file
from mrconvnext.utils.training import default_num_threads, usable_cores


@pytest.mark.parametrize(
    "cores, processes, workers, expected",
    [
        (2, 1, 1, 1),  # make demo on a 2-core machine: the worker decodes, the main process computes
        (2, 1, 0, 2),
        (16, 1, 8, 8),
        (16, 2, 4, 4),
        (8, 8, 8, 1),  # one GPU per process: the main process only launches kernels
        (1, 1, 0, 1),
    ],
)
def test_rule(cores, processes, workers, expected) -> None:
    assert default_num_threads(cores=cores, processes=processes, workers=workers) == expected


@pytest.fixture
def threads_restored(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 4, 2, size=32, classes=("a", "b"), seed=1)


@pytest.mark.usefixtures("threads_restored", "fresh_accelerate_state")
def test_training_sets_and_logs_the_thread_count(shapes, tmp_path, caplog) -> None:
    torch.set_num_threads(max(2, usable_cores()))  # torch's default on a machine with at least 2 cores
    argv = ["--data-dir", str(shapes), "--model", "mrconvnext_atto", "--num-classes", "2", "--img-size", "32"]
    argv += ["-b", "4", "--epochs", "1", "--workers", "1", "--aa", "none", "--mixup", "0", "--cutmix", "0"]
    argv += ["--no-model-ema", "--warmup-epochs", "0", "--output", str(tmp_path)]
    with caplog.at_level(logging.INFO):
        assert train_imagenet.main(argv) == 0
    expected = default_num_threads(cores=usable_cores(), processes=1, workers=1)
    assert torch.get_num_threads() == expected
    assert f"torch threads: {expected} (OMP_NUM_THREADS unset: {usable_cores()} cores for 1 process" in caplog.text
    assert "set OMP_NUM_THREADS to choose" in caplog.text


@pytest.mark.usefixtures("threads_restored")
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_omp_num_threads_is_respected_and_validate_logs_it(shapes, tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    checkpoint = tmp_path / "model.pth"
    save_checkpoint_file(
        checkpoint_record(timm.create_model("mrconvnext_atto", img_size=32, num_classes=2)), checkpoint
    )
    with caplog.at_level(logging.INFO):
        assert validate.main(["--data-dir", str(shapes), "--checkpoint", str(checkpoint), "-j", "1"]) == 0
    assert "torch threads: 1 (OMP_NUM_THREADS=1)" in caplog.text
    assert os.environ["OMP_NUM_THREADS"] == "1"
