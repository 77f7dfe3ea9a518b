"""The one timing and memory helper of the benchmarks: round-robin timing in one process, peak step memory.

Every comparison runs its candidates round-robin (baseline, candidate, baseline, ...) after warm-up rounds;
a ratio is the median over rounds of each round's candidate / baseline, whose two runs are back to back, so
slow drifts of a shared machine cancel. Peak training memory is the growth of the bytes held by tensors over one
step: ``max_memory_allocated`` on CUDA, torch.profiler's memory events on the CPU (:func:`step_memory`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import timm
import torch

import mrconvnext
from mrconvnext.layers import BranchBatchNorm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA, nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@dataclass(frozen=True)
class Ratio:
    """Median of the per-round ratios and their range (how noisy the machine was)."""

    median: float
    low: float
    high: float


@dataclass
class Timings:
    """Seconds per call of each function, one entry per round (all functions run once per round)."""

    times: dict[str, list[float]]

    def __getitem__(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, candidate: str, *baselines: str) -> Ratio:
        """Median over rounds of ``candidate / sum(baselines)``: each round's runs are back to back,
        so drifts of a shared machine slower than one round cancel."""
        rounds = zip(self.times[candidate], *(self.times[name] for name in baselines), strict=True)
        ratios = [cand / sum(bases) for cand, *bases in rounds]
        return Ratio(statistics.median(ratios), min(ratios), max(ratios))


def compare(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Time each function ``repeats`` times, round-robin, after ``warmup`` rounds.

    ``clock``: wall time by default; ``time.process_time`` counts only this process's CPU time, which on a
    shared machine leaves out the time other processes hold the cores (CPU only; with several threads it
    sums them, so compare only runs with the same thread count).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_idx in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = clock()
            fn()
            sync(device)
            if round_idx >= warmup:
                times[name].append(clock() - start)
    return Timings(times)


def train_step(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    """One training step (forward, cross-entropy backward, optimizer step) on a fixed batch."""
    device = x.device

    def step() -> None:
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_memory(model: torch.nn.Module, step: Callable[[], None], device: torch.device) -> float:
    """Peak memory (MiB) of one call of ``step`` above what exists before it: parameters, gradients and optimizer
    state, which an untimed first call of ``step`` creates (steady-state training). Storage that ``model``'s
    layers keep from one step to the next (the fused BatchNorm's branch workspace, CPU only) is released before
    the measured step, so that the step allocates it, as it does where there is no workspace.

    CUDA: the growth of ``max_memory_allocated``. CPU: the peak growth of the bytes held by tensors, summed from
    torch.profiler's memory events: the counterpart of ``max_memory_allocated``, exact and repeatable, where the
    resident set moves by hundreds of MiB with the C allocator's heap state.
    """
    step()
    for module in model.modules():
        if isinstance(module, BranchBatchNorm):
            module.workspace.release()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # every allocation and release, in order (the records torch.autograd.profiler attributes to ops)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()  # negative for a release
        peak = max(peak, held)
    return peak / 2**20


def machine_info(device: torch.device) -> list[str]:
    """CPU, thread count, versions and allocator settings (they change the CPU training figures)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}",
        f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"mrconvnext {mrconvnext.__version__}, {platform.platform()}",
    ]
    tuning = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("MALLOC_", "THP_", "LD_PRELOAD"))]
    info.append(f"allocator: {', '.join(tuning) if tuning else 'default (glibc malloc, no tuning variables)'}")
    if device.type == "cuda":
        info.append(f"GPU: {torch.cuda.get_device_name(device)} (bf16 autocast)")
    return info
