"""Deploy graphs outside eager PyTorch: ONNX (run in onnxruntime) and ``torch.export``.

The reparameterized MRConv (paper Eq. 13) is one long depthwise convolution. Its eager inference
path caches spectra in Python and sizes channel blocks from the batch, which neither exporter can
trace, and the TorchScript-based ONNX exporter has no FFT at all. :func:`export_form` therefore
copies a model and swaps every MRConv for a :class:`LongConv`: the same convolution at the layer's
planned length ``L``, its merged kernel (Eqs. 8, 13, 18) stored as a constant in one of three exact
forms (all float32, within ~1e-6 of a float64 direct convolution):

* ``'toeplitz'``: dense Toeplitz matrices ``(D, L, L)``, one batched MatMul (``D L^2`` MACs/sample);
* ``'matmul'``: the circular convolution of length ``n = n1 n2`` through a DFT factored as in
  Cooley-Tukey's four-step FFT, each step a MatMul with a small constant cosine/sine matrix shared
  by all channels (``~4 n L / n1 + 8 n n1`` MACs per channel), and the kernel's spectrum;
* ``'dft'``: ONNX's ``DFT`` op (opset 17+, from ``torch.fft.rfft``/``irfft`` through the dynamo-based
  ``torch.onnx.export``) at a power-of-two length: onnxruntime has a radix-2 FFT for powers of two
  only (other lengths take an O(n^2) DFT that also lost float32 accuracy, 4e-4 at n = 6272).

onnxruntime 1.32 (CPU, 1 thread; ``benchmarks/benchmark.py --targets 6 --threads 1``) ran the
MatMul DFT 1.5-6x faster than its own DFT op at every MRConvNeXt-T and LRA shape measured, and the
Toeplitz MatMul faster still for the short maps (L = 49: 10x; L = 196: 4x at batch 8, slower at
batch 1) but slower from L = 784 on; its constants grow as ``D L^2`` (59 MB per MRConvNeXt-T stage-3
layer, 530 MB for the stage). ``method='auto'`` therefore takes the Toeplitz form up to
``L =`` :data:`TOEPLITZ_MAX_LEN` (and while its constant stays under :data:`TOEPLITZ_MAX_BYTES` per
layer), the MatMul DFT beyond.

The exported graphs have a dynamic batch axis; the sequence length / image size is the planned
one (the kernels' training length) and is written into the ONNX metadata.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import load_state_dict, split_model_name_tag

from .models.mrconvnext import MRConvNeXt
from .models.sequence import MRConvSequenceModel
from .mrconv import MRConv, MRConv2d

__all__ = [
    "LONG_CONV_METHODS",
    "TOEPLITZ_MAX_BYTES",
    "TOEPLITZ_MAX_LEN",
    "LongConv",
    "export_form",
    "example_inputs",
    "export_onnx",
    "torch_export",
    "onnx_parity",
    "planned_input",
    "load_checkpoint_model",
]

LONG_CONV_METHODS = ("auto", "toeplitz", "matmul", "dft")
TOEPLITZ_MAX_LEN = 128  # measured in onnxruntime, see the module docstring
TOEPLITZ_MAX_BYTES = 2**26  # 64 MiB of Toeplitz constants per layer
OPSET = 18


def _dft_length(seq_len: int, causal_taps: int, anticausal_taps: int) -> int:
    """Power of two with no circular wrap-around onto outputs ``[0, L)`` (lags ``-Ka .. Kc-1``)."""
    need = seq_len + max(anticausal_taps, causal_taps - 1)
    return 1 << (need - 1).bit_length()


def _factor_length(seq_len: int, causal_taps: int, anticausal_taps: int) -> tuple[int, int]:
    """``(n1, n2)`` for the factored DFT of length ``n = n1 n2`` without wrap-around onto ``[0, L)``.

    Costs ``4 n ceil(L / n1) + 8 n n1`` MACs per row (see :meth:`LongConv._conv_matmul`): ``n1`` is the
    power of two nearest ``sqrt(L / 2)``, ``n2`` the fewest rows of ``n1`` that cover the length needed.
    """
    need = seq_len + max(anticausal_taps, causal_taps - 1)
    n1 = 1 << max(0, round(math.log2(max(seq_len / 2, 1)) / 2))
    return n1, -(-need // n1)


def _complex_matrix(real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
    """``[[Re, Im], [-Im, Re]]``: right-multiplying ``[x_re | x_im]`` by it multiplies ``x`` by ``Re + i Im``."""
    return torch.cat([torch.cat([real, imag], 1), torch.cat([-imag, real], 1)], 0)


class LongConv(nn.Module):
    """A deploy-form MRConv at its planned length ``L`` in export-friendly ops.

    ``kernel`` has :func:`mrconvnext.fft_conv` layout: ``(D, K)`` causal (lags ``0 .. K-1``) or
    ``(2, D, K)`` bidirectional (``kernel[1]`` at lags ``-1 .. -K``); ``y = k * u + bias``.
    ``image=True`` takes ``(B, D, H, W)`` maps with ``H * W = L`` (flattened row-major, as MRConv2d).
    """

    def __init__(
        self,
        kernel: torch.Tensor,
        bias: torch.Tensor,
        seq_len: int,
        bidirectional: bool,
        image: bool = False,
        method: str = "auto",
    ) -> None:
        super().__init__()
        if method not in LONG_CONV_METHODS:
            raise ValueError(f"unknown long-convolution method {method!r}; expected one of {list(LONG_CONV_METHODS)}")
        self.seq_len = seq_len
        self.image = image
        kernel = kernel.detach().double()
        dim = kernel.shape[-2]
        toeplitz_bytes = 4 * dim * seq_len**2
        if method == "auto":
            method = "toeplitz" if seq_len <= TOEPLITZ_MAX_LEN and toeplitz_bytes <= TOEPLITZ_MAX_BYTES else "matmul"
        elif method == "toeplitz" and toeplitz_bytes > 16 * TOEPLITZ_MAX_BYTES:
            raise ValueError(
                f"Toeplitz form of a layer with D={dim}, L={seq_len} needs {toeplitz_bytes / 2**30:.1f} GiB of "
                f"constants (limit {16 * TOEPLITZ_MAX_BYTES / 2**30:.0f} GiB); use method='matmul' or 'dft'"
            )
        self.method = method
        causal = kernel[0] if bidirectional else kernel
        anticausal = kernel[1, :, : seq_len - 1] if bidirectional else kernel[:, :0]
        causal = causal[:, :seq_len]
        self.register_buffer("bias", bias.detach().float().reshape(dim, 1))
        if self.method == "toeplitz":
            # taps by lag -(L-1) .. L-1; T[d, s, t] = tap at lag t - s, so y[b, d] = u[b, d] @ T[d]
            taps = kernel.new_zeros(dim, 2 * seq_len - 1)
            taps[:, seq_len - 1 : seq_len - 1 + causal.shape[1]] = causal
            taps[:, seq_len - 1 - anticausal.shape[1] : seq_len - 1] = anticausal.flip(-1)
            lags = seq_len - 1 + torch.arange(seq_len)[None, :] - torch.arange(seq_len)[:, None]
            self.register_buffer("toeplitz", taps[:, lags].float())
            return
        if self.method == "dft":
            self.n = _dft_length(seq_len, causal.shape[1], anticausal.shape[1])
        else:
            self.n1, self.n2 = _factor_length(seq_len, causal.shape[1], anticausal.shape[1])
            self.n = self.n1 * self.n2
        # circular buffer: causal taps at 0 .. Kc-1, anti-causal ones flipped into the last Ka positions
        buffer = kernel.new_zeros(dim, self.n)
        buffer[:, : causal.shape[1]] = causal
        buffer[:, self.n - anticausal.shape[1] :] = anticausal.flip(-1)
        if self.method == "dft":
            spectrum = torch.fft.rfft(buffer)
            self.register_buffer("spectrum_real", spectrum.real.float())
            self.register_buffer("spectrum_imag", spectrum.imag.float())
        else:
            self._init_factored_dft(torch.fft.fft(buffer))

    def _init_factored_dft(self, spectrum: torch.Tensor) -> None:
        """Constants of :meth:`_conv_matmul`: ``t = t1 + n1 t2``, ``f = f2 + n2 f1``, all in float64 first."""
        n, n1, n2 = self.n, self.n1, self.n2
        rows = -(-self.seq_len // n1)  # T2: rows of n1 samples that hold the input (the rest is zero padding)
        angle = -2 * math.pi / n

        def unit(exponent: torch.Tensor, period: int) -> tuple[torch.Tensor, torch.Tensor]:
            phase = angle * n / period * (exponent % period)
            return torch.cos(phase), torch.sin(phase)

        f2, t1, t2, f1 = (torch.arange(size, dtype=torch.float64) for size in (n2, n1, rows, n1))
        w2 = unit(f2[:, None] * t2[None, :], n2)  # (n2, T2): inner DFT over t2
        self.register_buffer("inner", torch.cat(w2, 0).float())  # (2 n2, T2): real rows, then imaginary rows
        self.register_buffer("twiddle", torch.stack(unit(f2[:, None] * t1[None, :], n)).float())  # (2, n2, n1)
        w1 = unit(t1[:, None] * f1[None, :], n1)  # (n1, n1): outer DFT over t1
        self.register_buffer("outer", _complex_matrix(*w1).float())
        self.register_buffer("outer_inverse", _complex_matrix(w1[0], -w1[1]).float())
        # inverse inner DFT, real part only, rows t2 < T2, with the 1/n of the inverse transform
        self.register_buffer("inner_inverse", (torch.cat([w2[0].t(), w2[1].t()], 1) / n).float())  # (T2, 2 n2)
        spectrum = spectrum.view(-1, n1, n2).transpose(1, 2)  # [d, f2, f1] = spectrum[d, f2 + n2 f1]
        self.register_buffer("spectrum", torch.stack([spectrum.real, spectrum.imag]).float())  # (2, D, n2, n1)

    @classmethod
    def from_mrconv(cls, layer: MRConv, method: str = "auto") -> LongConv:
        """From a deploy-form layer, or a train-form one in eval mode (its merged kernel, Eqs. 8, 13, 18)."""
        if layer.training and not layer.deploy:
            raise ValueError("a train-form MRConv exports in eval mode only (its BatchNorms use running statistics)")
        kernel, bias = layer.merged_kernel()
        return cls(kernel, bias, layer.seq_len, layer.bidirectional, isinstance(layer, MRConv2d), method)

    def forward(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        if rate != 1:
            raise ValueError(f"the exported graph is fixed to the training sampling rate; got rate={rate}")
        shape = x.shape
        if self.image:
            x = x.flatten(2)
        if x.shape[-1] != self.seq_len:
            raise ValueError(
                f"the exported graph is built for the planned length L={self.seq_len} (kernels are fixed to "
                f"their training length); got an input of shape {tuple(shape)}"
            )
        if self.method == "toeplitz":
            y = torch.matmul(x.transpose(0, 1), self.toeplitz).transpose(0, 1)
        elif self.method == "matmul":
            y = self._conv_matmul(x)
        else:
            spectrum = torch.view_as_real(torch.fft.rfft(x, n=self.n))
            real, imag = spectrum[..., 0], spectrum[..., 1]
            product = torch.stack(
                [
                    real * self.spectrum_real - imag * self.spectrum_imag,
                    real * self.spectrum_imag + imag * self.spectrum_real,
                ],
                dim=-1,
            )
            y = torch.fft.irfft(torch.view_as_complex(product), n=self.n)[..., : self.seq_len]
        return (y + self.bias).reshape(shape)

    def _conv_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Circular convolution of length ``n = n1 n2`` by a factored DFT (Cooley-Tukey's four steps) as MatMuls.

        Complex values travel as ``[real | imaginary]`` halves of the last axis. Forward: DFT over ``t2``
        (only the ``T2`` rows holding the input), twiddles, DFT over ``t1``; product with the kernel's
        spectrum; inverse in reverse order, keeping the real part of the ``T2`` output rows.
        """
        n1, n2 = self.n1, self.n2
        rows = self.inner.shape[1]
        batch, dim = x.shape[0], x.shape[1]
        u = F.pad(x, (0, rows * n1 - self.seq_len)).reshape(batch, dim, rows, n1)
        a = torch.matmul(self.inner, u)  # (B, D, 2 n2, n1)
        re, im = a[..., :n2, :], a[..., n2:, :]
        tw_re, tw_im = self.twiddle[0], self.twiddle[1]
        a = torch.cat([re * tw_re - im * tw_im, re * tw_im + im * tw_re], -1)  # (B, D, n2, 2 n1)
        spec = torch.matmul(a, self.outer)
        re, im = spec[..., :n1], spec[..., n1:]
        k_re, k_im = self.spectrum[0], self.spectrum[1]
        spec = torch.cat([re * k_re - im * k_im, re * k_im + im * k_re], -1)
        b = torch.matmul(spec, self.outer_inverse)
        re, im = b[..., :n1], b[..., n1:]
        b = torch.cat([re * tw_re + im * tw_im, im * tw_re - re * tw_im], -2)  # (B, D, 2 n2, n1)
        y = torch.matmul(self.inner_inverse, b)  # (B, D, T2, n1)
        return y.reshape(batch, dim, rows * n1)[..., : self.seq_len]

    def extra_repr(self) -> str:
        size = f", n={self.n}" if self.method != "toeplitz" else ""
        return f"seq_len={self.seq_len}, method={self.method!r}{size}, image={self.image}"


class _SequenceGraph(nn.Module):
    """:class:`MRConvSequenceModel`'s forward without its input checks (they read values on the host).

    Inputs: tokens ``(B, L)`` (``(B, 2, L)`` for pairs) or features ``(B, L, C)`` / images
    ``(B, C, H, W)``, and optionally ``lengths`` ``(B,)`` (``(B, 2)``), as the model takes them.
    """

    def __init__(self, model: MRConvSequenceModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        batch = x.shape[0]
        if model.image_input and x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        if model.pair_input:  # documents stacked on the batch axis, as the model does
            x = x.transpose(0, 1).reshape(2 * batch, x.shape[-1])
        h = model.encoder(x).transpose(1, 2)
        mask = None
        if lengths is not None:
            flat = lengths.transpose(0, 1).reshape(-1) if model.pair_input else lengths
            mask = (torch.arange(h.shape[-1], device=h.device) < flat[:, None]).unsqueeze(1).to(h.dtype)
            h = h * mask
        for block in model.blocks:
            h = block(h, mask)
        h = model.norm(h).transpose(1, 2)
        if model.pair_input:
            h = h.view(2, batch, *h.shape[1:]).transpose(0, 1)
        return model.forward_head(h, lengths)


def _check_exportable(model: nn.Module) -> None:
    if not isinstance(model, MRConvNeXt | MRConvSequenceModel):
        raise TypeError(
            f"export supports MRConvNeXt and MRConvSequenceModel (timm names mrconvnext_* and mrconv_*), "
            f"got {type(model).__name__}"
        )


def export_form(model: nn.Module, method: str = "auto") -> nn.Module:
    """An eval-mode copy of ``model`` with every MRConv swapped for a :class:`LongConv`.

    Takes the deploy form or the train form (folded the way its eval mode computes, Eqs. 8, 13, 18).
    Sequence models are wrapped so that ``forward(x, lengths=None)`` has no host-side checks.
    """
    _check_exportable(model)
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, MRConv):
            model.set_submodule(name, LongConv.from_mrconv(module, method))
    return _SequenceGraph(model).eval() if isinstance(model, MRConvSequenceModel) else model


def planned_input(model: nn.Module) -> dict[str, Any]:
    """The input the exported graph takes: names, shapes without the batch, dtypes; and the planned size."""
    _check_exportable(model)
    if isinstance(model, MRConvNeXt):
        height, width = model.img_size
        return dict(
            inputs={"images": ((model.stem[0].in_channels, height, width), "float32")}, img_size=[height, width]
        )
    length = model.seq_len
    if model.vocab_size is not None:
        data = ((2, length) if model.pair_input else (length,), "int64")
    elif model.image_input:
        side = int(round(length**0.5))
        if side * side != length:
            raise ValueError(f"image_input model with seq_len={length}: not a square image")
        data = ((model.in_chans, side, side), "float32")
    else:
        data = ((length, model.in_chans), "float32")
    return dict(inputs={"tokens" if model.vocab_size is not None else "inputs": data}, seq_len=length)


def example_inputs(model: nn.Module, batch: int = 2, lengths: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the planned size (tokens, or standard-normal features), plus random ``lengths``."""
    generator = torch.Generator().manual_seed(seed)
    (shape, dtype), *_ = planned_input(model)["inputs"].values()
    if dtype == "int64":
        x = torch.randint(0, model.vocab_size, (batch, *shape), generator=generator)
    else:
        x = torch.randn(batch, *shape, generator=generator)
    if not lengths:
        return (x,)
    length = model.seq_len
    size = (batch, 2) if model.pair_input else (batch,)
    valid = torch.randint(max(1, length // 2), length + 1, size, generator=generator)
    valid.view(-1)[0] = length  # one unpadded sequence
    return x, valid


def torch_export(model: nn.Module, method: str = "auto", lengths: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the export form with a dynamic batch axis (for AOTInductor / ExecuTorch)."""
    graph = export_form(model, method)
    args = example_inputs(model, batch=2, lengths=lengths)
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = tuple({0: batch} for _ in args)
    return torch.export.export(graph, args, dynamic_shapes=dynamic)


def _onnx_program(graph: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str]):
    batch = torch.export.Dim("batch", min=1, max=65536)
    return torch.onnx.export(
        graph,
        args,
        dynamo=True,
        opset_version=OPSET,
        input_names=input_names,
        output_names=["logits"],
        dynamic_shapes=tuple({0: batch} for _ in args),
        optimize=True,
        verbose=False,
    )


def onnx_parity(path: str | Path, model: nn.Module, lengths: bool, batch: int = 3, threads: int = 1) -> float:
    """Max relative error ``max |y_ort - y_torch| / max |y_torch|`` of logits on random inputs of the planned size.

    The reference is ``model`` itself in eager PyTorch (eval mode, float32), on the same inputs.
    """
    ort = _require("onnxruntime")

    args = example_inputs(model, batch=batch, lengths=lengths, seed=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {name: a.numpy() for name, a in zip(names, args, strict=True)})[0]
    with torch.no_grad():
        ref = model.eval()(*args).double()
    return ((torch.from_numpy(out).double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs {module!r}: pip install 'mrconvnext[export]' (onnx, onnxscript, onnxruntime)"
        ) from e


def export_onnx(
    model: nn.Module,
    output: str | Path,
    method: str = "auto",
    lengths: bool | None = None,
    metadata: dict[str, Any] | None = None,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> tuple[Path, float | None]:
    """Write ``model`` (deploy or eval train form) as ONNX to ``output`` (a ``.onnx`` file), atomically.

    ``lengths`` adds the padding-lengths input of sequence models (default: token models have it).
    Metadata (``onnx.ModelProto.metadata_props``, JSON strings): the planned size (``img_size`` or
    ``seq_len``), the inputs and output, the long-convolution form per layer, the pretrained cfg and
    ``metadata``'s entries. With ``verify`` the written graph runs in onnxruntime against ``model``
    in eager PyTorch (:func:`onnx_parity`); nothing is written if the error exceeds ``tolerance``.
    Returns the path and the error (None without ``verify``).
    """
    onnx = _require("onnx")
    _require("onnxscript")
    _check_exportable(model)
    if lengths is None:
        lengths = isinstance(model, MRConvSequenceModel) and model.vocab_size is not None
    if lengths and not isinstance(model, MRConvSequenceModel):
        raise ValueError(f"{type(model).__name__} takes no padding lengths")
    planned = planned_input(model)
    input_names = list(planned["inputs"]) + (["lengths"] if lengths else [])
    graph = export_form(model, method)
    program = _onnx_program(graph, example_inputs(model, lengths=lengths), input_names)
    proto = program.model_proto
    inputs = {name: dict(shape=["batch", *shape], dtype=dtype) for name, (shape, dtype) in planned["inputs"].items()}
    if lengths:
        inputs["lengths"] = dict(shape=["batch", 2] if model.pair_input else ["batch"], dtype="int64")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    entries = dict(
        form="deploy",
        inputs=inputs,
        outputs={"logits": dict(shape=["batch", model.num_classes])},
        long_conv=[
            dict(layer=name, seq_len=m.seq_len, method=m.method)
            for name, m in graph.named_modules()
            if isinstance(m, LongConv)
        ],
        pretrained_cfg={k: v for k, v in cfg.items() if isinstance(v, str | int | float | bool | list | tuple | None)},
        **{k: v for k, v in planned.items() if k != "inputs"},
        **(metadata or {}),
    )
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in entries.items()})
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        onnx.save_model(proto, str(tmp))
        error = onnx_parity(tmp, model, lengths) if verify else None
        if error is not None and not error < tolerance:
            raise RuntimeError(
                f"onnxruntime disagrees with PyTorch on {output.name}: max relative error {error:.2e} >= {tolerance}"
            )
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output, error


def load_checkpoint_model(
    model_name: str, checkpoint: str | Path, use_ema: bool = True, model_args: dict[str, Any] | None = None
) -> nn.Module:
    """The registered model ``model_name`` with a checkpoint's weights (train or deploy form), in eval mode.

    MRConvNeXt checkpoints load through its checkpoint filter; sequence models are built in the form
    the checkpoint holds. ``num_classes`` (and MRConvNeXt's ``in_chans``) come from the checkpoint;
    ``model_args`` (``img_size``, ``seq_len``, ``mrconv_kwargs``, ...) must match the trained model.
    """
    family = split_model_name_tag(model_name)[0]
    names = timm.list_models("mrconvnext*") + timm.list_models("mrconv_*")
    if family not in names:
        raise ValueError(f"cannot export {model_name!r}: ONNX export takes one of {names}")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} not found (expected a .pth/.pth.tar or .safetensors)")
    state_dict = load_state_dict(str(checkpoint), use_ema=use_ema)
    model_args = dict(model_args or {})
    model_args.pop("deploy", None)
    if family.startswith("mrconvnext"):
        head, stem = state_dict.get("head.fc.weight"), state_dict.get("stem.0.weight")
        if stem is not None:
            model_args.setdefault("in_chans", stem.shape[1])
        model_args["num_classes"] = head.shape[0] if head is not None else 0
        overlay = dict(state_dict=state_dict, num_classes=model_args["num_classes"])
        return timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=overlay, deploy=True, **model_args
        ).eval()
    head = state_dict.get("head.weight")
    model_args["num_classes"] = head.shape[0] if head is not None else 0
    deploy = any(k.endswith(".conv.weight") for k in state_dict)  # deploy MRConv: weight + bias only
    model = timm.create_model(model_name, deploy=deploy, **model_args)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise RuntimeError(f"checkpoint {str(checkpoint)!r} does not fit {model_name} ({model_args}): {e}") from e
    model.eval()
    model.reparameterize()
    return model
