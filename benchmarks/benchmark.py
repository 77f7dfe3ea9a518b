"""MRConv / MRConvNeXt performance targets (see BENCHMARKS.md), measured side by side in one run.

    python benchmarks/benchmark.py                 # all targets, CPU (or CUDA with bf16 autocast if present)
    python benchmarks/benchmark.py --quick         # fewer repeats, skips the slow plain-autograd reference
    python benchmarks/benchmark.py --targets 3,4   # a subset
    python benchmarks/benchmark.py --targets 3,6 --threads 1 --cpu-time   # layer floors, every ONNX form, whole model
    python benchmarks/benchmark.py --targets 1 --profile   # and the block-by-block torch.profiler table

Method (``benchmarks/timing.py``): every comparison runs its candidates round-robin in this process
after warm-up runs; the table shows the median time of each side and, as the ratio, the median over
rounds of each round's candidate / baseline ratio (``--cpu-time``: this process's CPU time instead of wall time).
onnxruntime sessions (target 6) use as many intra-op threads as torch, without spinning between runs; whole models
are compared within one runtime at a time. Peak training memory is the growth of the bytes held by tensors over
one step (``step_memory``). Target 3 (and 6) also print the floor table: each layer shape against an rfft + irfft
of its input (plain, and over cache-sized channel blocks), with the MACs and times of the ONNX forms.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from mrconvnext import MRConv, MRConv2d, fft_length
from mrconvnext.layers import LongConv
from mrconvnext.layers.fft_conv import PaddedRfft, channel_chunk
from mrconvnext.layers.long_conv import dft_ops
from mrconvnext.utils.onnx import export_onnx, onnxruntime_costs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' plain-autograd reference layer
from benchmarks.timing import (  # noqa: E402
    Ratio,
    autocast,
    compare,
    machine_info,
    step_memory,
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
    goal = ">= 0.9" if device.type == "cuda" else ">= 1.0"
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


def peak_train_memory(name: str, norm: str, batch: int, device: torch.device) -> float:
    """Peak memory (MiB) of one training step above the model's training state (:func:`step_memory`)."""
    model = create_model(name, device, True, norm)
    return step_memory(model, train_step_fn(model, batch, device), device)


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
                "<= 1.25",
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


# ----------------------------------------------------------------------------- layers and their floors
@dataclass(frozen=True)
class LayerShape:
    """One deploy-form long convolution: an MRConvNeXt-T stage at 224 x 224 or an LRA model's layer."""

    name: str
    batch: int
    dim: int
    height: int  # 1 for sequences
    width: int
    kernel_len: int  # taps per direction of the deploy kernel
    bidirectional: bool = True

    @property
    def seq_len(self) -> int:
        return self.height * self.width

    def layer(self, device: torch.device) -> MRConv:
        """A reparameterized layer of this shape with a random kernel (timing does not depend on its values)."""
        cls = MRConv2d if self.height > 1 else MRConv
        layer = cls(self.dim, self.seq_len, self.kernel_len, bidirectional=self.bidirectional, deploy=True)
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
        return layer.to(device).eval()

    def input(self, device: torch.device) -> torch.Tensor:
        """Channels-last image maps (ConvNeXt's residual stream), ``(B, D, L)`` sequences."""
        if self.height == 1:
            return torch.randn(self.batch, self.dim, self.seq_len, device=device)
        return torch.randn(self.batch, self.height, self.width, self.dim, device=device).permute(0, 3, 1, 2)


def layer_shapes(args) -> list[LayerShape]:
    """The four MRConvNeXt-T stages (batch ``--batch``) and, without ``--quick``, each distinct layer shape of the
    LRA / sCIFAR / Speech base models (batch 4)."""
    stages = [LayerShape(f"stage {i + 1}", args.batch, d, h, w, min(k * 16, h * w)) for i, (d, h, w, k) in
              enumerate(STAGE_SHAPES)]  # fmt: skip
    if args.quick:
        return stages
    sequences = {}
    for name in timm.list_models("mrconv_*_base"):
        with torch.device("meta"):
            layer = next(m for m in timm.create_model(name).modules() if isinstance(m, MRConv))
        key = (layer.dim, layer.seq_len, layer.deploy_kernel_len, layer.bidirectional)
        sequences.setdefault(key, []).append(name.removeprefix("mrconv_").removesuffix("_base"))
    return stages + [
        LayerShape("/".join(names), LONG["batch"], dim, 1, seq_len, taps, bidirectional)
        for (dim, seq_len, taps, bidirectional), names in sequences.items()
    ]


def fft_pair(x: torch.Tensor, n: int) -> Callable[[], torch.Tensor]:
    """A plain ``irfft(rfft(x, n), n)`` of the whole ``(B, D, L)`` input, contiguous."""
    rows = x.contiguous()
    return lambda: torch.fft.irfft(torch.fft.rfft(rows, n=n), n=n)


def blocked_fft_pair(x: torch.Tensor, n: int) -> Callable[[], None]:
    """The same pair over cache-sized blocks of channels of a contiguous input (as the layer loops), with nothing
    else: no kernel product, no layout change, no bias. For long sequences it beats the plain pair, whose padded
    copies and spectra of the whole tensor spill out of the caches."""
    rows = x.contiguous()
    step = channel_chunk(rows, n)
    rfft = PaddedRfft(rows, rows.shape[0], step, n)

    def run() -> None:
        for start in range(0, rows.shape[1], step):
            torch.fft.irfft(rfft(rows[:, start : start + step]), n=n)

    return run


@dataclass
class Floor:
    """One shape's floor (the faster of a plain and a blocked rfft + irfft of its input, eager) and what each form
    measures against it."""

    shape: LayerShape
    n: int
    plain_ms: float
    blocked_ms: float
    eager_ms: float
    eager: Ratio
    onnx_ms: dict[str, float] = field(default_factory=dict)  # ONNX form -> ms
    onnx: dict[str, Ratio] = field(default_factory=dict)  # ONNX form -> its time / the floor's, per round
    macs: dict[str, float] = field(default_factory=dict)  # form -> MACs per sample
    auto: str = ""

    @property
    def fft_ms(self) -> float:
        """The floor: the faster of the plain and the blocked pair."""
        return min(self.plain_ms, self.blocked_ms)


def bench_floors(args, device, targets) -> tuple[list[Row], list[Floor]]:
    """Target 3 (eager deploy layer vs its floor) and, with target 6, every ONNX form of the same layer timed in
    onnxruntime in the same rounds; MACs of the MatMul forms from the cost model that picks between them."""
    rows, floors = [], []
    onnx = "6" in targets and device.type == "cpu"
    costs = onnxruntime_costs(torch.get_num_threads()) if onnx else None
    for shape in layer_shapes(args):
        layer, x = shape.layer(device), shape.input(device)
        n = fft_length(shape.seq_len, shape.kernel_len, shape.bidirectional)
        flat = x.reshape(shape.batch, shape.dim, shape.seq_len)
        fns = {
            "plain": fft_pair(flat, n),
            "blocked": blocked_fft_pair(flat, n),
            "eager": lambda layer=layer, x=x: layer(x),
        }
        floor_macs = {}
        auto = ""
        if onnx:
            forms = {"matmul": LongConv.from_mrconv(layer, "matmul", costs)}
            if 4 * shape.dim * shape.seq_len**2 <= ONNX_TOEPLITZ_BYTES:
                forms["toeplitz"] = LongConv.from_mrconv(layer, "toeplitz")
            auto = LongConv.from_mrconv(layer, "auto", costs).method
            floor_macs["toeplitz"] = shape.dim * shape.seq_len**2
            factors = forms["matmul"].factors
            floor_macs["matmul"] = sum(op.macs for op in dft_ops(shape.seq_len, shape.dim, factors))
            with tempfile.TemporaryDirectory() as tmp:
                for form, conv in forms.items():
                    path = os.path.join(tmp, f"{form}.onnx")
                    onnx_export_module(conv, x, path)
                    fns[form] = ort_fn(ort_session(path, torch.get_num_threads()), x)
                with torch.no_grad():
                    t = compare(fns, args.repeats, 2, device, args.clock)
        else:
            with torch.no_grad():
                t = compare(fns, args.repeats, 2, device, args.clock)
        fft = min(("plain", "blocked"), key=t.__getitem__)
        floor = Floor(shape, n, t["plain"] * 1e3, t["blocked"] * 1e3, t["eager"] * 1e3,
                      t.ratio("eager", fft), macs=floor_macs, auto=auto)  # fmt: skip
        for form in fns.keys() - {"plain", "blocked", "eager"}:
            floor.onnx_ms[form] = t[form] * 1e3
            floor.onnx[form] = t.ratio(form, fft)
        floors.append(floor)
        what = f"deploy layer {shape.name} B={shape.batch} D={shape.dim} L={shape.seq_len}"
        rows.append(
            Row("3", what, f"rfft+irfft n={n} ({fft})", floor.fft_ms, "MRConv deploy fwd", floor.eager_ms, "ms", "<= 1.2",
                floor.eager)
        )  # fmt: skip
    return rows, floors


def print_floors(floors: list[Floor]) -> None:
    """The floor of every layer shape and which forms come within 1.2x of it."""
    onnx = any(f.onnx for f in floors)
    print("\n### Floors: each layer against an rfft + irfft of its input (eager PyTorch, same rounds)\n")
    print("floor = the faster of a plain rfft + irfft of the whole contiguous input and the same pair over")
    print("cache-sized channel blocks; every form's time is also given as a multiple of the floor (x floor)\n")
    header = ["shape", "B", "D", "L", "FFT n", "plain rfft+irfft ms", "blocked ms", "eager deploy ms (x floor)"]
    if onnx:
        header += ["MACs/sample Toeplitz", "MACs/sample factored DFT", "ONNX Toeplitz ms", "ONNX factored DFT ms",
                   "best ONNX x floor", "auto picks"]  # fmt: skip
    header += ["within 1.2x"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for f in floors:
        line = [f.shape.name, str(f.shape.batch), str(f.shape.dim), str(f.shape.seq_len), str(f.n),
                f"{f.plain_ms:.4g}", f"{f.blocked_ms:.4g}", f"{f.eager_ms:.4g} ({f.eager.median:.2f})"]  # fmt: skip
        verdict = ["eager" if f.eager.median <= 1.2 else ""]
        if onnx:
            best = min(f.onnx, key=lambda form: f.onnx[form].median)
            line += [f"{f.macs['toeplitz'] / 1e6:.3g}M", f"{f.macs['matmul'] / 1e6:.3g}M",
                     f"{f.onnx_ms['toeplitz']:.4g}" if "toeplitz" in f.onnx_ms else "not built",
                     f"{f.onnx_ms['matmul']:.4g}", f"{f.onnx[best].median:.2f} ({best})", f.auto]  # fmt: skip
            verdict.append("ONNX" if f.onnx[best].median <= 1.2 else "")
        line.append(", ".join(v for v in verdict if v) or "no")
        print("| " + " | ".join(line) + " |")


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

        def inherent_ffts(u: torch.Tensor = u, dy: torch.Tensor = grad) -> None:
            """Forward: rfft(u) + N irfft. Backward: rfft(dy) + N rfft(c_i) + rfft(u) (recomputed) + irfft."""
            u_f = torch.fft.rfft(u, n=n)
            for _ in range(num_res):
                torch.fft.irfft(u_f, n=n)
            torch.fft.rfft(dy, n=n)
            for _ in range(num_res + 1):
                torch.fft.rfft(u, n=n)
            torch.fft.irfft(u_f, n=n)

        step = channel_chunk(u, n)

        def blocked_ffts() -> None:
            """The same FFTs over the cache-sized channel blocks the layer loops over."""
            for start in range(0, dim, step):
                block = slice(start, start + step)
                inherent_ffts(u[:, block], grad[:, block])

        kernel = torch.randn(num_res, dim, n, device=device)

        def kernel_ffts() -> None:  # the N sub-kernel spectra and their gradients: no batch factor
            torch.fft.irfft(torch.fft.rfft(kernel, n=n), n=n)

        fns = {"plain": inherent_ffts, "blocked": blocked_ffts, "kernel_ffts": kernel_ffts, "fused": fwd_bwd(layer)}
        if not args.quick:
            fns["reference"] = fwd_bwd(lambda inp: branch_bn_autograd(layer, inp))
        t = compare(fns, args.long_repeats, 1, device)
        ffts = min(("plain", "blocked"), key=t.__getitem__)  # the floor, as in target 3
        what = f"train layer fwd+bwd, N={num_res}"
        rows.append(
            Row(
                "4",
                what,
                f"{2 * num_res + 4} FFTs alone ({ffts})",
                t[ffts] * 1e3,
                "fused BN layer",
                t["fused"] * 1e3,
                "ms",
                "<= 1.3",
                t.ratio("fused", ffts),
            )
        )
        with_kernel = t[ffts] + t["kernel_ffts"]
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
                t.ratio("fused", ffts, "kernel_ffts"),
            )
        )
        if "reference" in t.times:
            rows.append(
                Row(
                    "4*",
                    what,
                    f"{2 * num_res + 4} FFTs alone ({ffts})",
                    t[ffts] * 1e3,
                    "plain autograd layer",
                    t["reference"] * 1e3,
                    "ms",
                    "<= 1.3",
                    t.ratio("reference", ffts),
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
ONNX_TOEPLITZ_BYTES = 2**28  # the Toeplitz form is timed where one call gathers at most 256 MiB
ONNX_BATCHES = (1, 8)


def ort_session(path: str, threads: int):
    """A CPU session with ``threads`` intra-op threads that do not spin once a run ends: by default they spin for a
    while, taking the cores from whatever runs next, which on a 2-core machine halved the throughput of the next
    candidate in the round (timed one session per process, the ratios agree with those of non-spinning sessions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_fn(session, *inputs: torch.Tensor) -> Callable[[], object]:
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return lambda: session.run(None, feed)


def onnx_export_module(module: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    """The same exporter as ``mrconvnext.export --format onnx``: dynamo, opset 18, dynamic batch (traced at batch 2:
    a batch of 1 would be specialised)."""
    example = torch.cat([x[:1], x[:1]]) if x.shape[0] != 2 else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), path, dynamo=True, opset_version=18, dynamic_shapes=({0: torch.export.Dim("batch")},)
        )


def bench_onnx_inference(args, tmp: str) -> list[Row]:
    """ONNX MRConvNeXt-T (deploy) vs ConvNeXt-T, exported the same way, in onnxruntime at batch 1 and 8, with eager
    PyTorch beside it; and the ONNX file against the train-form checkpoint."""
    models = {"convnext_tiny": create_model("convnext_tiny", torch.device("cpu"), False)}
    models["mrconvnext_tiny"] = create_model("mrconvnext_tiny", torch.device("cpu"), False)
    paths = {name: os.path.join(tmp, f"{name}.onnx") for name in models}
    parity = export_onnx(models["mrconvnext_tiny"], paths["mrconvnext_tiny"],
                         costs=onnxruntime_costs(torch.get_num_threads()))[1]  # fmt: skip
    onnx_export_module(models["convnext_tiny"], torch.randn(2, 3, 224, 224), paths["convnext_tiny"])
    sessions = {name: ort_session(path, torch.get_num_threads()) for name, path in paths.items()}
    rows = []
    for batch in ONNX_BATCHES:
        x = torch.randn(batch, 3, 224, 224)
        runtimes = {
            "onnx": {name: ort_fn(session, x) for name, session in sessions.items()},
            "torch": {name: lambda m=model, x=x: m(x) for name, model in models.items()},
        }
        for runtime, fns in runtimes.items():  # one runtime per comparison: their thread pools do not meet
            with torch.no_grad():
                t = compare(fns, args.infer_repeats, 1, torch.device("cpu"), args.clock)
            base, cand = models
            label = f"onnxruntime (parity {parity:.1e})" if runtime == "onnx" else "PyTorch eager (same run)"
            rows.append(
                Row("6" if runtime == "onnx" else "6*", f"inference {label}, batch {batch}, images/s", "convnext_tiny",
                    batch / t[base], "mrconvnext_tiny deploy", batch / t[cand], "img/s", ">= 0.7", t.ratio(base, cand))
            )  # fmt: skip
    checkpoint = os.path.join(tmp, "train_form.pth")
    torch.save(timm.create_model("mrconvnext_tiny").state_dict(), checkpoint)
    sizes = [os.path.getsize(path) / 2**20 for path in (checkpoint, paths["mrconvnext_tiny"])]
    rows.append(
        Row("6", "model file size", "train-form checkpoint", sizes[0], "ONNX deploy graph", sizes[1], "MiB", "<= 1.5",
            sizes[1] / sizes[0])
    )  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- block-by-block profile
PROFILE_STEPS = 3  # single steps differ by up to 1.7x in parts that are the same modules in both models


def profile_parts(model: torch.nn.Module, step: Callable[[], None], steps: int) -> dict[str, float]:
    """Milliseconds per part (stem, each stage's downsample / conv_dw / norm / mlp, head; forward and backward),
    the mean over ``steps`` calls of ``step`` under ``torch.profiler``: hooks open a ``record_function`` range around
    each part's forward and around its backward (from the gradient of its output to that of its input)."""
    parts = {"stem": model.stem, "head": model.head}
    for i, stage in enumerate(model.stages):
        parts[f"stage {i + 1} downsample"] = stage.downsample
        for j, block in enumerate(stage.blocks):
            for part in ("conv_dw", "norm", "mlp"):
                parts[f"stage {i + 1} {part} #{j}"] = getattr(block, part)
    open_ranges, handles = {}, []

    def enter(key: str) -> None:
        open_ranges[key] = torch.autograd.profiler.record_function(key)
        open_ranges[key].__enter__()

    def leave(key: str) -> None:
        open_ranges.pop(key).__exit__(None, None, None)

    for name, module in parts.items():
        forward, backward = f"{name.split(' #')[0]} | forward", f"{name.split(' #')[0]} | backward"
        handles += [
            module.register_forward_pre_hook(lambda m, i, k=forward: enter(k)),
            module.register_forward_hook(lambda m, i, o, k=forward: leave(k)),
            module.register_full_backward_pre_hook(lambda m, g, k=backward: enter(k)),
            module.register_full_backward_hook(lambda m, gi, go, k=backward: leave(k)),
        ]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    finally:
        for handle in handles:
            handle.remove()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if " | " in event.key:
            totals[event.key] = totals.get(event.key, 0.0) + event.cpu_time_total / 1e3 / steps
    return totals


def print_profile(args, device: torch.device) -> None:
    """Block-by-block table of ``mrconvnext_tiny`` against ``convnext_tiny``: deploy inference and the training step
    (BN train form), forward and backward per part, the mean of ``PROFILE_STEPS`` steps after one untimed step."""
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    columns: dict[str, dict[str, float]] = {}
    for name in ("convnext_tiny", "mrconvnext_tiny"):
        model = create_model(name, device, False)
        with torch.no_grad():
            model(x)
            inference = profile_parts(model, lambda m=model: m(x), PROFILE_STEPS)
        columns[f"{name} inference"] = {k.split(" | ")[0]: v for k, v in inference.items()}
        train = create_model(name, device, True)
        step = train_step_fn(train, args.batch, device)
        step()
        for key, value in profile_parts(train, step, PROFILE_STEPS).items():
            part, direction = key.split(" | ")
            columns.setdefault(f"{name} train {direction}", {})[part] = value
    parts = list(dict.fromkeys(p for column in columns.values() for p in column))
    print(
        f"\n### Block by block (torch.profiler, ms, batch {args.batch}, mean of {PROFILE_STEPS} steps after a warm-up step)\n"
    )
    print("| part | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for part in [*parts, "total"]:
        cells = [sum(c.values()) if part == "total" else c.get(part, 0.0) for c in columns.values()]
        print(f"| {part} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")


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
    parser.add_argument("--profile", action="store_true", help="also print the block-by-block torch.profiler table")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU time (leaves out other processes on a shared machine; CPU only)",
    )
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
    args.clock = time.process_time if args.cpu_time else time.perf_counter
    targets = set(args.targets.split(","))
    if not targets <= set("123456"):
        raise SystemExit(f"--targets expects numbers 1-6, got {args.targets!r}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows: list[Row] = []
    floors: list[Floor] = []
    if targets & {"3", "6"}:
        floor_rows, floors = bench_floors(args, device, targets)
        rows += floor_rows if "3" in targets else []
    if targets & {"4", "5"}:
        rows += bench_long_train(args, device, targets)
    if "1" in targets:
        rows += bench_inference(args, device)
    if targets & {"2", "5"}:
        rows += bench_training(args, device, targets)
    if "6" in targets:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_onnx_inference(args, tmp)
    rows.sort(key=lambda r: r.target)
    print_table(rows, device, machine_info(device), time.perf_counter() - start)
    if floors:
        print_floors(floors)
    if args.profile:
        print_profile(args, device)


if __name__ == "__main__":
    main()
