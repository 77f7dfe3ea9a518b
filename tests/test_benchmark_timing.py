"""The benchmarks' peak step memory (``benchmarks/timing.py``) against allocations of known size, and the
throughput command's usage errors."""

import pytest
import torch

from benchmarks import throughput
from benchmarks.timing import step_memory
from mrconvnext import MRConv
from mrconvnext.layers.branch_norm import BranchWorkspace

CPU = torch.device("cpu")


def test_step_memory_is_the_peak_of_the_tensors_a_step_holds_at_once():
    kept = []

    def step() -> None:
        if not kept:  # made by the untimed first step and held from then on: not the measured step's
            kept.append(torch.ones(2**20))
        a = torch.ones(3 * 2**18)  # 3 MiB
        b = torch.ones(2**18)  # 1 MiB while a lives: 4 MiB at once
        del a, b
        torch.ones(2**19)  # 2 MiB, after a and b are gone

    assert abs(step_memory(torch.nn.Identity(), step, CPU) - 4.0) < 0.01


def test_step_memory_counts_the_branch_workspace_as_if_each_step_allocated_it(monkeypatch):
    torch.manual_seed(0)
    layer = MRConv(8, 512, 32, kernel_type="fourier").train()
    x = torch.randn(4, 8, 512)

    def step() -> None:
        layer(x).square().sum().backward()

    with_workspace = step_memory(layer, step, CPU)
    assert layer.norm.workspace.storage is not None  # kept between steps
    monkeypatch.setattr(BranchWorkspace, "take", lambda self, shape, like: like.new_empty(shape))  # as on devices
    fresh = step_memory(layer, step, CPU)
    assert layer.norm.workspace.storage is None
    saved_branches = layer.num_resolutions * x.numel() * x.element_size() / 2**20
    assert fresh > saved_branches
    assert with_workspace == fresh  # exact: the bytes held by tensors, not the allocator's heap


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-b", "0"], "--batch-size must be positive, got 0"),  # an MKL error from inside the FFT before
        (["--model", "convnext_tinyy"], "cannot create model 'convnext_tinyy': Unknown model"),
    ],
)
def test_throughput_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        throughput.main(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err
