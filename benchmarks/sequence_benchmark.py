"""Sequence-model benchmark: training throughput and memory per base config, and the paper's Table 4(b).

    python -m benchmarks.sequence_benchmark            # both sections (CPU, or CUDA with bf16 autocast)
    python -m benchmarks.sequence_benchmark --quick    # fewer rounds

1. Training: one AdamW step (forward, cross-entropy backward, step) of every ``mrconv_<task>_base`` config at
   its registered length and a reduced batch; samples per second (median step time) and the peak memory of a
   step above the model's training state (the growth of the bytes held by tensors: ``timing.step_memory``).
2. Table 4(b): inference time of MRConv-B (``mrconv_text_base`` on Text, ``mrconv_image_base`` on Image) in
   its reparameterized and its train form against the same backbone with S4D's diagonal state-space kernel
   (``benchmarks/s4d.py``) in place of MRConv: same width, depth, block, encoder and head. Speed is reported as
   the paper does, relative to S4(D): ``time(S4D) / time(model)``, the median of per-round ratios (the runs of
   a round are back to back; ``compare`` from ``timing.py``), with the range over rounds. S4D recomputes
   its kernel on every call as ``s4d.py`` does (on a CPU that dominates its time); the last column compares
   the reparameterized MRConv with an S4D that keeps its kernel's spectrum, both then one FFT convolution
   per layer (MRConv's bidirectional, S4D's causal).
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import mrconvnext  # noqa: F401
from benchmarks.s4d import S4DConv
from benchmarks.timing import autocast, compare, machine_info, step_memory, sync, train_step

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx", "scifar", "speech")
INFERENCE = {"Text": ("mrconv_text_base", 4), "Image": ("mrconv_image_base", 8)}  # model, batch


def example_batch(model, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs of the model's task at its registered length, and random targets."""
    if model.vocab_size is not None:
        shape = (batch, 2, model.seq_len) if model.pair_input else (batch, model.seq_len)
        x = torch.randint(1, model.vocab_size, shape, device=device)
    else:
        x = torch.randn(batch, model.seq_len, model.in_chans, device=device)
    return x, torch.randint(0, model.num_classes, (batch,), device=device)


def train_step_fn(model, batch: int, device: torch.device):
    x, target = example_batch(model, batch, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return train_step(model, x, target, optimizer)


def peak_train_memory(name: str, batch: int, device: torch.device) -> float:
    """Peak memory (MiB) of one training step above the model's training state (:func:`step_memory`)."""
    model = timm.create_model(name).to(device).train()
    return step_memory(model, train_step_fn(model, batch, device), device)


def bench_training(args, device) -> list[str]:
    lines = ["| config | length | batch | samples/s | peak step memory (MiB) |", "|---|---|---|---|---|"]
    for task in args.tasks:
        name = f"mrconv_{task}_base"
        torch.manual_seed(0)
        model = timm.create_model(name).to(device).train()
        step = train_step_fn(model, args.train_batch, device)
        timings = compare({name: step}, repeats=args.train_rounds, warmup=1, device=device)
        memory = peak_train_memory(name, args.train_batch, device)
        pairs = " x 2" if model.pair_input else ""
        lines.append(
            f"| {name} | {model.seq_len}{pairs} | {args.train_batch} | {args.train_batch / timings[name]:.2f} "
            f"| {memory:.0f} |"
        )
        print(lines[-1], flush=True)
        del model, step
    return lines


def s4d_model(name: str, device: torch.device, cache_kernel: bool = False) -> torch.nn.Module:
    """The MRConv-B backbone of ``name`` with every MRConv replaced by S4D (64 states, as S4D's LRA configs)."""
    torch.manual_seed(1)
    model = timm.create_model(name)
    for block in model.blocks:
        block.conv = S4DConv(model.num_features, d_state=64, cache_kernel=cache_kernel)
    return model.to(device).eval()


def inference_fn(model: torch.nn.Module, x: torch.Tensor, device: torch.device):
    def run() -> None:
        with torch.no_grad(), autocast(device):
            model(x)

    return run


def speed_text(timings, form: str, reference: str) -> str:
    """``time(reference) / time(form)``: median over rounds and range."""
    ratio = timings.ratio(form, reference)
    return f"{1 / ratio.median:.2f}x ({1 / ratio.high:.2f}-{1 / ratio.low:.2f})"


def bench_table4b(args, device) -> list[str]:
    lines = [
        "| task (length, batch) | S4D (ms) | S4D, cached kernel (ms) | MRConv-B train form (ms) "
        "| MRConv-B reparameterized (ms) | speed vs S4D: train form | reparameterized "
        "| reparameterized vs S4D with cached kernel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    paper = {"Text": (0.4, 1.5), "Image": (0.6, 1.3)}
    for task, (name, batch) in INFERENCE.items():
        torch.manual_seed(0)
        train_form = timm.create_model(name).to(device).eval()
        deployed = timm.create_model(name).to(device).eval()
        deployed.load_state_dict(train_form.state_dict())
        deployed.reparameterize()
        baseline = s4d_model(name, device)
        cached = s4d_model(name, device, cache_kernel=True)
        x, _ = example_batch(train_form, batch, device)

        timings = compare(
            {
                "s4d": inference_fn(baseline, x, device),
                "cached": inference_fn(cached, x, device),
                "train": inference_fn(train_form, x, device),
                "rep": inference_fn(deployed, x, device),
            },
            repeats=args.rounds,
            warmup=1,
            device=device,
        )
        speed = {pair: speed_text(timings, *pair) for pair in (("train", "s4d"), ("rep", "s4d"), ("rep", "cached"))}
        ms = {key: f"{1e3 * timings[key]:.0f}" for key in ("s4d", "cached", "train", "rep")}
        lines.append(
            f"| {task} ({train_form.seq_len}, {batch}) | {ms['s4d']} | {ms['cached']} | {ms['train']} | {ms['rep']} "
            f"| {speed['train', 's4d']} (paper {paper[task][0]}x) | {speed['rep', 's4d']} (paper {paper[task][1]}x) "
            f"| {speed['rep', 'cached']} |"
        )
        print(lines[-1], flush=True)
        del train_form, deployed, baseline, cached
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--sections", default="train,table4b", help="comma-separated: train, table4b")
    parser.add_argument("--tasks", default=",".join(TASKS), help="configs of the training section")
    parser.add_argument("--train-batch", type=int, default=2)
    args = parser.parse_args()
    args.tasks = args.tasks.split(",")
    args.rounds = 3 if args.quick else 7
    args.train_rounds = 2 if args.quick else 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    info = machine_info(device)
    print("\n".join(info), flush=True)
    sections = args.sections.split(",")
    output = []
    if "train" in sections:
        output += ["", "Training step per base config (registered length, reduced batch):", ""]
        output += bench_training(args, device)
    if "table4b" in sections:
        output += ["", "Table 4(b): inference speed relative to S4D (median over rounds, range):", ""]
        output += bench_table4b(args, device)
    sync(device)
    print("\n".join(output))
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
