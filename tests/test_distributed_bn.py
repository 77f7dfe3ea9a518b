"""BatchNorm across processes: MRConv's per-resolution BatchNorms under ``SyncBatchNorm`` (2 gloo processes against the
float64 reference of their concatenated batch), and ``--sync-bn`` / ``--dist-bn`` in train_imagenet.py (2 processes).

The layer test spawns 2 processes with ``torch.multiprocessing``; the training tests launch ``torchrun
--nproc_per_node 2`` on a driver that runs ``train_imagenet.main`` and records, per rank, the running statistics
around :meth:`TrainingRun.distribute_bn` and at every :meth:`TrainingRun.end_epoch` (what evaluation and the
checkpoints see). ``--sync-bn`` trains on GPU processes only (DDP refuses SyncBatchNorm on the CPU): here its
conversion is tested in one process and its statistics with gloo, without DDP.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from mrconvnext import MRConv
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.layers import branch_norm

from .reference import branch_bn_autograd, randomize_, rel_err

ROOT = Path(__file__).resolve().parents[1]
LOCAL_BATCHES = (3, 2)  # unequal: the global statistics are not the mean of the per-process ones
LAYERS = {  # (dim, seq_len, kernel_size) and MRConv options
    "fourier, bidirectional": dict(kernel_type="fourier", bidirectional=True),
    "dilated, causal, cumulative": dict(kernel_type="dilated", bidirectional=False, bn_momentum=None),
}
SHAPE = (5, 96, 6)


def _layer(options: dict) -> MRConv:
    torch.manual_seed(0)
    layer = MRConv(*SHAPE, **options)
    randomize_(layer)
    return layer.double().train()


def _sync_worker(rank: int, init_file: str, data: dict, out_dir: str, device: str) -> None:
    """One rank: the layers converted by torch's converter, trained one step on this rank's part of the batch."""
    torch.set_num_threads(1)
    data = {k: v.to(device) for k, v in data.items()}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(LOCAL_BATCHES))
    branch_norm.channel_chunk = lambda x, n: 2  # several channel blocks per loop (5 channels: 2 + 2 + 1)
    start = sum(LOCAL_BATCHES[:rank])
    part = slice(start, start + LOCAL_BATCHES[rank])
    results = {}
    for name, options in LAYERS.items():
        layer = nn.SyncBatchNorm.convert_sync_batchnorm(_layer(options).to(device))
        assert type(layer.norm) is nn.SyncBatchNorm
        x = data["x"][part].clone().requires_grad_()
        y = layer(x)
        (y * data["weight"][part]).sum().backward()
        grads = {k: p.grad for k, p in layer.named_parameters()}
        for grad in grads.values():  # the summed losses' gradient: what data parallelism averages
            dist.all_reduce(grad)
        stats = {k: getattr(layer.norm, k) for k in ("running_mean", "running_var", "num_batches_tracked")}
        alone = _layer(options).to(device)(data["x"][part])  # per-process statistics: must differ from the global ones
        results[name] = dict(y=y.detach(), x_grad=x.grad, grads=grads, stats=stats, alone=alone.detach())
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sync_batchnorm_uses_the_global_batch(tmp_path, device) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(1)
    batch, (dim, seq_len, _) = sum(LOCAL_BATCHES), SHAPE
    data = dict(
        x=torch.randn(batch, dim, seq_len, dtype=torch.float64) * 2 + 0.5,
        weight=torch.randn(batch, dim, seq_len, dtype=torch.float64),
    )
    mp.start_processes(
        _sync_worker,
        (str(tmp_path / "init"), data, str(tmp_path), device),
        nprocs=len(LOCAL_BATCHES),
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", "cpu", weights_only=True) for r in range(len(LOCAL_BATCHES))]
    parts = torch.tensor(LOCAL_BATCHES).cumsum(0).tolist()
    for name, options in LAYERS.items():
        ref = _layer(options)
        x = data["x"].clone().requires_grad_()
        y = branch_bn_autograd(ref, x)  # F.batch_norm over the concatenated batch
        (y * data["weight"]).sum().backward()
        for got, want in (
            (torch.cat([r[name]["y"] for r in ranks]), y),
            (torch.cat([r[name]["x_grad"] for r in ranks]), x.grad),
        ):
            assert rel_err(got, want) < 1e-10, name
        for rank in ranks:
            assert rank[name]["grads"].keys() == dict(ref.named_parameters()).keys()
            for key, p in ref.named_parameters():
                assert p.grad.abs().sum() > 0 and rel_err(rank[name]["grads"][key], p.grad) < 1e-9, (name, key)
            for key, value in rank[name]["stats"].items():
                torch.testing.assert_close(value, getattr(ref.norm, key), rtol=1e-10, atol=1e-12, msg=f"{name} {key}")
        for rank, start, stop in zip(ranks, [0, *parts], parts, strict=False):
            assert rel_err(rank[name]["alone"], y[start:stop].detach()) > 1e-2  # local statistics would not pass


def test_convert_sync_batchnorm_reaches_every_branch_norm() -> None:
    """torch's converter and timm's (``--sync-bn``) turn every BranchBatchNorm into a SyncBatchNorm with the same
    tensors; in one process it computes what it did before, in train and eval mode and reparameterized."""
    torch.manual_seed(0)
    model = timm.create_model("mrconvnext_atto", img_size=32, num_classes=3)
    for layer in model.modules():
        if isinstance(layer, MRConv):
            randomize_(layer)
    layers = sum(isinstance(m, MRConv) for m in model.modules())
    x = torch.randn(4, 3, 32, 32)
    for convert in (nn.SyncBatchNorm.convert_sync_batchnorm, timm.layers.convert_sync_batchnorm):
        plain, synced = copy.deepcopy(model), convert(copy.deepcopy(model))
        norms = [m.norm for m in synced.modules() if isinstance(m, MRConv)]
        assert len(norms) == layers and all(type(norm) is nn.SyncBatchNorm for norm in norms)
        assert synced.state_dict().keys() == plain.state_dict().keys()
        for net in (plain, synced):
            net.train()(x).square().mean().backward()
        for (key, p), q in zip(plain.named_parameters(), synced.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=key)
        for (key, b), c in zip(plain.state_dict().items(), synced.state_dict().values(), strict=True):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-7, msg=key)
        with torch.no_grad():
            logits = plain.eval()(x)
            torch.testing.assert_close(synced.eval()(x), logits, rtol=1e-5, atol=1e-6)
            synced.reparameterize()
            torch.testing.assert_close(synced(x), logits, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- train_imagenet.py

DRIVER = textwrap.dedent(
    """
    import os, sys
    import torch
    from mrconvnext import train_imagenet
    from mrconvnext.utils.training import TrainingRun

    def stats(model):
        model = getattr(model, "module", model)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "running_" in k}

    records = []
    distribute_bn, end_epoch = TrainingRun.distribute_bn, TrainingRun.end_epoch

    def recording_distribute_bn(self, model):
        before = [stats(m) for m in (model, *self.averaged_modules)]  # the model, its EMA
        distribute_bn(self, model)
        records.append(("distribute_bn", before, [stats(m) for m in (model, *self.averaged_modules)]))

    def recording_end_epoch(self, epoch, row, model, metric, model_ema=None, **kwargs):
        records.append(("end_epoch", stats(model), stats(model_ema)))
        return end_epoch(self, epoch, row, model, metric, model_ema=model_ema, **kwargs)

    TrainingRun.distribute_bn, TrainingRun.end_epoch = recording_distribute_bn, recording_end_epoch
    status = train_imagenet.main(sys.argv[2:])
    if status == 0:
        torch.save(records, os.path.join(sys.argv[1], "records_" + os.environ["RANK"] + ".pt"))
    sys.exit(status)
    """
)
TRAIN_ARGS = [
    "--model", "mrconvnext_atto", "--num-classes", "2", "--img-size", "32", "-b", "4", "--epochs", "1",
    "--lr", "2e-3", "--warmup-epochs", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
    "--smoothing", "0", "--workers", "0", "--model-ema-decay", "0.5", "--cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 16 train images = 2 updates per epoch at 2 processes x 4
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 8, 2, size=32, classes=("circle", "square"), seed=3)


def _launch(tmp_path: Path, data_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """``train_imagenet.py`` (through the recording driver) on 2 CPU processes (gloo)."""
    (tmp_path / "driver.py").write_text(DRIVER)
    args = [*TRAIN_ARGS, *flags, "--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "run"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(tmp_path / "driver.py"), str(tmp_path), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _train_two_processes(tmp_path: Path, data_dir: Path, *flags: str) -> tuple[list, list, Path]:
    """Both ranks' records and the run folder of a 2-process run."""
    proc = _launch(tmp_path, data_dir, *flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [torch.load(tmp_path / f"records_{rank}.pt", weights_only=True) for rank in (0, 1)]
    return records[0], records[1], tmp_path / "run"


def _assert_same(first: dict, second: dict) -> None:
    assert first.keys() == second.keys() and first
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=0, atol=0, msg=key)


def test_dist_bn_reduce_gives_every_rank_the_average(tmp_path, data_dir) -> None:
    rank0, rank1, run_dir = _train_two_processes(tmp_path, data_dir)  # --dist-bn reduce is the default
    (_, before0, after0), (_, before1, after1) = rank0[0], rank1[0]
    for form in (0, 1):  # the model, its EMA
        assert any(not torch.equal(v, before1[form][k]) for k, v in before0[form].items())  # each rank its own
        _assert_same(after0[form], after1[form])
        for key, value in after0[form].items():
            torch.testing.assert_close(value, (before0[form][key] + before1[form][key]) / 2, msg=key)
    (_, model0, ema0), (_, model1, ema1) = rank0[1], rank1[1]
    _assert_same(model0, model1)  # what evaluation used and the checkpoint holds
    _assert_same(ema0, ema1)
    saved = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    _assert_same(model0, {k: saved["state_dict"][k] for k in model0})
    _assert_same(ema0, {k: saved["state_dict_ema"][k] for k in ema0})


def test_sync_bn_on_cpu_processes_is_refused(tmp_path, data_dir) -> None:
    """torch's DistributedDataParallel refuses SyncBatchNorm on the CPU: the run stops first with one clear line."""
    proc = _launch(tmp_path, data_dir, "--sync-bn")
    assert proc.returncode != 0
    assert "train_imagenet.py: error: --sync-bn needs GPU processes" in proc.stderr, proc.stderr
    assert "only work with GPU modules" not in proc.stderr  # refused before DDP raises
