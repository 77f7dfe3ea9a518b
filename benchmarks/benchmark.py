"""MRConv / MRConvNeXt performance targets (see BENCHMARKS.md), measured side by side in one run.

    python benchmarks/benchmark.py                 # all targets, CPU (or CUDA with bf16 autocast if present)
    python benchmarks/benchmark.py --quick         # fewer repeats, skips the slow plain-autograd reference
    python benchmarks/benchmark.py --targets 3,4   # a subset
    python benchmarks/benchmark.py --targets 6 --threads 1   # ONNX: onnxruntime vs PyTorch, Toeplitz vs DFT

Method (``benchmarks/timing.py``): every comparison runs its candidates round-robin in this process
after warm-up runs; the table shows the median time of each side and, as the ratio, the median over
rounds of each round's candidate / baseline ratio. onnxruntime sessions (target 6) use as many intra-op
threads as torch. Peak training memory is measured per model in a fresh subprocess on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from mrconvnext import MRConv, MRConv2d, fft_length
from mrconvnext.layers import LongConv
from mrconvnext.utils.onnx import export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' plain-autograd reference layer
from benchmarks.timing import (  # noqa: E402
    Ratio,
    autocast,
    compare,
    machine_info,
    step_memory,
    step_memory_in_subprocess,
    train_step,
)
from tests.reference import branch_bn_autograd  # noqa: E402

STAGE_SHAPES = [  # (D, H, W, kernel_size): MRConvNeXt-T stages at 224x224
    (96, 56, 56, 196),
    (192, 28, 28, 49),
    (384, 14, 14, 28),
    (768, 7, 7, 28),
]
LONG = dict(batch=4, dim=256, seq_len=16384, kernel_size=64, max_resolutions=9)  # LRA-like, 9 resolutions


@dataclass
class Row:
    target: str
    what: str
    baseline: str
    base_value: float
    candidate: str
    cand_value: float
    unit: str
    goal: str  # e.g. ">= 0.85" on the ratio candidate/baseline (or baseline/candidate for throughput)
    ratio: Ratio | float  # a float where there are no rounds (peak memory)

    @property
    def value(self) -> float:
        return self.ratio.median if isinstance(self.ratio, Ratio) else self.ratio

    def met(self) -> str:
        op, bound = self.goal.split()
        return "yes" if (self.value >= float(bound) if op == ">=" else self.value <= float(bound)) else "NO"


# ----------------------------------------------------------------------------- models
def create_model(name: str, device: torch.device, train: bool, norm: str = "batch") -> torch.nn.Module:
    kwargs = {"mrconv_kwargs": {"branch_norm": norm}} if name.startswith("mrconvnext") and norm != "batch" else {}
    model = timm.create_model(name, **kwargs).to(device)
    if name.startswith("mrconvnext") and not train:
        model.reparameterize()
    return model.train(train)


def train_step_fn(model: torch.nn.Module, batch: int, device: torch.device) -> Callable[[], None]:
    """One SGD step (forward, cross-entropy backward, optimizer step) on a fixed random batch."""
    x = torch.randn(batch, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    return train_step(model, x, target, optimizer)


def bench_inference(args, device) -> list[Row]:
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    models = {"convnext_tiny": create_model("convnext_tiny", device, False)}
    models["mrconvnext_tiny (deploy)"] = create_model("mrconvnext_tiny", device, False)
    with torch.no_grad(), autocast(device):
        fns = {name: (lambda m=m: m(x)) for name, m in models.items()}
        t = compare(fns, args.infer_repeats, 1, device)
    base, cand = (args.batch / t[name] for name in models)
    ratio = t.ratio(*models)  # images/s: baseline time / candidate time
    goal = ">= 0.9" if device.type == "cuda" else ">= 0.85"
    return [
        Row(
            "1",
            "inference, images/s",
            "convnext_tiny",
            base,
            "mrconvnext_tiny deploy",
            cand,
            "img/s",
            goal,
            ratio,
        )
    ]


def training_step(name: str, norm: str, batch: int) -> Callable[[], None]:
    """One training step of ``name`` on the CPU (what :func:`peak_train_memory` measures in a fresh process)."""
    device = torch.device("cpu")
    return train_step_fn(create_model(name, device, True, norm), batch, device)


def peak_train_memory(name: str, norm: str, batch: int, device: torch.device) -> float:
    """Peak memory (MiB) of one training step above the loaded model (CPU: in a fresh process)."""
    if device.type == "cuda":
        return step_memory(train_step_fn(create_model(name, device, True, norm), batch, device), device)
    return step_memory_in_subprocess("benchmarks.benchmark.training_step", name, norm, batch)


def bench_training(args, device, targets) -> list[Row]:
    names = {"convnext_tiny": ("convnext_tiny", "batch")}
    if "2" in targets:
        names["mrconvnext_tiny (BN)"] = ("mrconvnext_tiny", "batch")
    if "5" in targets:
        names["mrconvnext_tiny (scale)"] = ("mrconvnext_tiny", "scale")
    steps = {}
    for label, (name, norm) in names.items():
        steps[label] = train_step_fn(create_model(name, device, True, norm), args.batch, device)
    t = compare(steps, args.train_repeats, 1, device)
    rows = []
    base = t["convnext_tiny"]
    if "2" in targets:
        cand = t["mrconvnext_tiny (BN)"]
        rows.append(
            Row(
                "2",
                "train step time",
                "convnext_tiny",
                base,
                "mrconvnext_tiny BN",
                cand,
                "s",
                "<= 1.5",
                t.ratio("mrconvnext_tiny (BN)", "convnext_tiny"),
            )
        )
        mem_base = peak_train_memory("convnext_tiny", "batch", args.batch, device)
        mem = peak_train_memory("mrconvnext_tiny", "batch", args.batch, device)
        rows.append(
            Row(
                "2",
                "train step peak memory",
                "convnext_tiny",
                mem_base,
                "mrconvnext_tiny BN",
                mem,
                "MiB",
                "<= 1.5",
                mem / mem_base,
            )
        )
    if "5" in targets:
        cand = t["mrconvnext_tiny (scale)"]
        rows.append(
            Row(
                "5",
                "train step time",
                "convnext_tiny",
                base,
                "mrconvnext_tiny scale",
                cand,
                "s",
                "<= 1.15",
                t.ratio("mrconvnext_tiny (scale)", "convnext_tiny"),
            )
        )
    return rows


# ----------------------------------------------------------------------------- layers
def fft_pair(x: torch.Tensor, n: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.fft.irfft(torch.fft.rfft(x, n=n), n=n)


def deploy_layer(dim: int, seq_len: int, kernel_size: int, max_res: int, device, two_d: bool = True) -> MRConv:
    cls = MRConv2d if two_d else MRConv
    layer = cls(dim, seq_len, kernel_size, kernel_type="fourier", max_resolutions=max_res).to(device).eval()
    layer.reparameterize()
    return layer


def bench_deploy_layers(args, device) -> list[Row]:
    rows = []
    shapes = [(args.batch, d, h, w, k, 5) for d, h, w, k in STAGE_SHAPES]
    shapes.append((LONG["batch"], LONG["dim"], 1, LONG["seq_len"], LONG["kernel_size"], LONG["max_resolutions"]))
    for batch, dim, height, width, kernel_size, max_res in shapes:
        seq_len = height * width
        two_d = height > 1
        layer = deploy_layer(dim, seq_len, kernel_size, max_res, device, two_d)
        x = torch.randn((batch, dim, height, width) if two_d else (batch, dim, seq_len), device=device)
        n = fft_length(seq_len, layer.deploy_kernel_len, True)
        flat = x.reshape(batch, dim, seq_len)
        with torch.no_grad():
            t = compare({"fft": fft_pair(flat, n), "layer": lambda layer=layer, x=x: layer(x)}, args.repeats, 2, device)
        rows.append(
            Row(
                "3",
                f"deploy layer B={batch} D={dim} L={seq_len}",
                f"rfft+irfft n={n}",
                t["fft"] * 1e3,
                "MRConv deploy fwd",
                t["layer"] * 1e3,
                "ms",
                "<= 1.2",
                t.ratio("layer", "fft"),
            )
        )
    return rows


def bench_long_train(args, device, targets) -> list[Row]:
    batch, dim, seq_len = LONG["batch"], LONG["dim"], LONG["seq_len"]
    kernel_size, max_res = LONG["kernel_size"], LONG["max_resolutions"]
    x = torch.randn(batch, dim, seq_len, device=device, requires_grad=True)
    grad = torch.randn(batch, dim, seq_len, device=device)
    layer = MRConv(dim, seq_len, kernel_size, kernel_type="fourier", max_resolutions=max_res).to(device).train()
    num_res = layer.num_resolutions
    n = fft_length(seq_len, max(layer.lengths), True)
    rows = []

    def fwd_bwd(fn):
        def run():
            fn(x).backward(grad)
            x.grad = None
            for p in layer.parameters():
                p.grad = None

        return run

    if "4" in targets:
        u = x.detach()

        def inherent_ffts() -> None:
            """Forward: rfft(u) + N irfft. Backward: rfft(dy) + N rfft(c_i) + rfft(u) (recomputed) + irfft."""
            u_f = torch.fft.rfft(u, n=n)
            for _ in range(num_res):
                torch.fft.irfft(u_f, n=n)
            torch.fft.rfft(grad, n=n)
            for _ in range(num_res + 1):
                torch.fft.rfft(u, n=n)
            torch.fft.irfft(u_f, n=n)

        kernel = torch.randn(num_res, dim, n, device=device)

        def kernel_ffts() -> None:  # the N sub-kernel spectra and their gradients: no batch factor
            torch.fft.irfft(torch.fft.rfft(kernel, n=n), n=n)

        fns = {"ffts": inherent_ffts, "kernel_ffts": kernel_ffts, "fused": fwd_bwd(layer)}
        if not args.quick:
            fns["reference"] = fwd_bwd(lambda inp: branch_bn_autograd(layer, inp))
        t = compare(fns, args.long_repeats, 1, device)
        what = f"train layer fwd+bwd, N={num_res}"
        rows.append(
            Row(
                "4",
                what,
                f"{2 * num_res + 4} FFTs alone",
                t["ffts"] * 1e3,
                "fused BN layer",
                t["fused"] * 1e3,
                "ms",
                "<= 1.3",
                t.ratio("fused", "ffts"),
            )
        )
        with_kernel = t["ffts"] + t["kernel_ffts"]
        rows.append(
            Row(
                "4*",
                what,
                "+ kernel FFTs (N,D,n)",
                with_kernel * 1e3,
                "fused BN layer",
                t["fused"] * 1e3,
                "ms",
                "<= 1.3",
                t.ratio("fused", "ffts", "kernel_ffts"),
            )
        )
        if "reference" in t.times:
            rows.append(
                Row(
                    "4*",
                    what,
                    f"{2 * num_res + 4} FFTs alone",
                    t["ffts"] * 1e3,
                    "plain autograd layer",
                    t["reference"] * 1e3,
                    "ms",
                    "<= 1.3",
                    t.ratio("reference", "ffts"),
                )
            )
    if "5" in targets:
        stage_dim, height, width, stage_kernel = STAGE_SHAPES[0]
        shapes = [
            (batch, dim, seq_len, kernel_size, max_res, "fourier"),
            (args.batch, stage_dim, height * width, stage_kernel, 5, "fourier_sparse"),
        ]
        for shape_batch, shape_dim, shape_len, shape_kernel, shape_res, kernel_type in shapes:
            inp = torch.randn(shape_batch, shape_dim, shape_len, device=device, requires_grad=True)
            out_grad = torch.randn_like(inp)
            cfg = dict(kernel_type=kernel_type, max_resolutions=shape_res)
            scale = MRConv(shape_dim, shape_len, shape_kernel, branch_norm="scale", **cfg).to(device)
            deploy = MRConv(shape_dim, shape_len, shape_kernel, **cfg).to(device).eval()
            deploy.reparameterize()

            def run(module, inp=inp, out_grad=out_grad):
                return lambda: torch.autograd.grad(module(inp), [inp, *module.parameters()], out_grad)

            t = compare({"deploy": run(deploy), "scale": run(scale)}, args.long_repeats, 1, device)
            rows.append(
                Row(
                    "5",
                    f"layer fwd+bwd B={shape_batch} D={shape_dim} L={shape_len} {kernel_type}",
                    "deploy layer",
                    t["deploy"] * 1e3,
                    "branch_norm='scale' layer",
                    t["scale"] * 1e3,
                    "ms",
                    "<= 1.2",
                    t.ratio("scale", "deploy"),
                )
            )
    return rows


# ----------------------------------------------------------------------------- ONNX
# (D, L, kernel_size, 2D): MRConvNeXt-T stages at 224x224 and two sequence-model layers (5 resolutions)
ONNX_SHAPES = [(d, h * w, k, True) for d, h, w, k in STAGE_SHAPES] + [(128, 1024, 16, False), (256, 4096, 64, False)]
TOEPLITZ_MAX_BYTES = 2**30  # the Toeplitz constant D * L^2 floats: not built beyond 1 GiB


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_fn(session, *inputs: torch.Tensor) -> Callable[[], object]:
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return lambda: session.run(None, feed)


def onnx_export_module(module: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    """The same exporter as ``mrconvnext.export --format onnx``: dynamo, opset 18, dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), path, dynamo=True, opset_version=18, dynamic_shapes=({0: torch.export.Dim("batch")},)
        )


def bench_onnx_long_conv(args, tmp: str) -> list[Row]:
    """One deploy layer in onnxruntime: ONNX DFT op vs factored DFT as MatMuls vs Toeplitz MatMul (``LongConv``)."""
    rows = []
    for dim, seq_len, kernel_size, two_d in ONNX_SHAPES:
        layer = deploy_layer(dim, seq_len, kernel_size, 5, torch.device("cpu"), two_d=False)
        x = torch.randn(args.batch, dim, seq_len)
        methods = ["dft", "matmul"] + (["toeplitz"] if dim * seq_len**2 * 4 <= TOEPLITZ_MAX_BYTES else [])
        convs = {method: LongConv.from_mrconv(layer, method) for method in methods}
        fns = {}
        for method, conv in convs.items():
            path = os.path.join(tmp, f"conv_{method}_{dim}_{seq_len}.onnx")
            onnx_export_module(conv, x, path)
            fns[method] = ort_fn(ort_session(path, torch.get_num_threads()), x)
        t = compare(fns, args.repeats, 2, torch.device("cpu"))
        what = f"ONNX deploy layer B={args.batch} D={dim} L={seq_len}" + (" (2D)" if two_d else "")
        for method in methods[1:]:
            label = f"MatMul DFT n={convs[method].n1}x{convs[method].n2}" if method == "matmul" else "Toeplitz MatMul"
            rows.append(
                Row(
                    "6*",
                    what,
                    f"DFT op n={convs['dft'].n}",
                    t["dft"] * 1e3,
                    label,
                    t[method] * 1e3,
                    "ms",
                    "<= 1",
                    t.ratio(method, "dft"),
                )
            )
    return rows


def bench_onnx_inference(args, tmp: str) -> list[Row]:
    """ONNX MRConvNeXt-T (deploy) vs ConvNeXt-T, exported the same way, in onnxruntime; PyTorch beside it."""
    x = torch.randn(args.batch, 3, 224, 224)
    models = {"convnext_tiny": create_model("convnext_tiny", x.device, False)}
    models["mrconvnext_tiny"] = create_model("mrconvnext_tiny", x.device, False)
    fns = {}
    for name, model in models.items():
        path = os.path.join(tmp, f"{name}.onnx")
        if name.startswith("mrconvnext"):
            parity = export_onnx(model, path)[1]
        else:
            onnx_export_module(model.eval(), x, path)
        fns[f"onnx {name}"] = ort_fn(ort_session(path, torch.get_num_threads()), x)
    with torch.no_grad():
        for name, model in models.items():
            fns[f"torch {name}"] = lambda m=model: m(x)
        t = compare(fns, args.infer_repeats, 1, torch.device("cpu"))
    rows = []
    for runtime in ("onnx", "torch"):
        base, cand = (f"{runtime} {name}" for name in models)
        label = f"onnxruntime (parity {parity:.1e})" if runtime == "onnx" else "PyTorch eager (same run)"
        rows.append(
            Row(
                "6" if runtime == "onnx" else "6*",
                f"inference {label}, images/s",
                "convnext_tiny",
                args.batch / t[base],
                "mrconvnext_tiny deploy",
                args.batch / t[cand],
                "img/s",
                ">= 0.85",
                t.ratio(base, cand),
            )
        )
    return rows


# ----------------------------------------------------------------------------- report
def print_table(rows: list[Row], device: torch.device, info: list[str], elapsed: float) -> None:
    header = [
        "target",
        "measurement",
        "baseline",
        "value",
        "candidate",
        "value",
        "unit",
        "ratio",
        "rounds",
        "goal",
        "met",
    ]
    body = [
        [
            r.target,
            r.what,
            r.baseline,
            f"{r.base_value:.4g}",
            r.candidate,
            f"{r.cand_value:.4g}",
            r.unit,
            f"{r.value:.3f}",
            f"{r.ratio.low:.2f}-{r.ratio.high:.2f}" if isinstance(r.ratio, Ratio) else "",
            r.goal,
            r.met(),
        ]
        for r in rows
    ]
    print(f"\n### {device.type.upper()} results")
    for line in info:
        print(f"- {line}")
    print(
        f"- wall time {elapsed:.0f} s; ratio = median over rounds of candidate / baseline (images/s for target 1), "
        f"rounds = its range; rows marked * are context\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in body:
        print("| " + " | ".join(line) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="1,2,3,4,5,6", help="comma-separated subset of 1-6")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no plain-autograd reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = 3 if args.quick else 7
    args.infer_repeats = 3 if args.quick else 11
    args.train_repeats = 2 if args.quick else 5
    args.long_repeats = 2 if args.quick else 5
    targets = set(args.targets.split(","))
    if not targets <= set("123456"):
        raise SystemExit(f"--targets expects numbers 1-6, got {args.targets!r}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows: list[Row] = []
    if "3" in targets:
        rows += bench_deploy_layers(args, device)
    if targets & {"4", "5"}:
        rows += bench_long_train(args, device, targets)
    if "1" in targets:
        rows += bench_inference(args, device)
    if targets & {"2", "5"}:
        rows += bench_training(args, device, targets)
    if "6" in targets:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_onnx_long_conv(args, tmp)
            rows += bench_onnx_inference(args, tmp)
    rows.sort(key=lambda r: r.target)
    print_table(rows, device, machine_info(device), time.perf_counter() - start)


if __name__ == "__main__":
    main()
