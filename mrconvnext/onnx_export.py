"""Deploy graphs outside eager PyTorch: ONNX (run in onnxruntime) and ``torch.export``.

The reparameterized MRConv (paper Eq. 13) is one long depthwise convolution. Its eager inference
path caches spectra in Python and sizes channel blocks from the batch, which neither exporter can
trace, and the TorchScript-based ONNX exporter has no FFT at all. :func:`export_form` therefore
copies a model and swaps every MRConv for a :class:`LongConv`: the same convolution at the layer's
planned length, its merged kernel (Eqs. 8, 13, 18) stored as a constant in one of two exact forms

* ``'toeplitz'``: dense Toeplitz matrices ``(D, L, L)``, one batched MatMul (``D L^2`` MACs/sample);
* ``'dft'``: the kernel's spectrum at a power-of-two length ``n``, convolved with ONNX's ``DFT``
  (opset 17+, emitted by the dynamo-based ``torch.onnx.export``). onnxruntime runs radix-2 FFTs
  for powers of two only; other lengths take an O(n^2) DFT that also loses float32 accuracy.

``method='auto'`` takes the Toeplitz form up to :data:`TOEPLITZ_MAX_LEN`, measured in onnxruntime
(see the README's Deploy section: ``python -m mrconvnext.onnx_export --measure``).

The exported graphs have a dynamic batch axis; the sequence length / image size is the planned
one (the kernels' training length) and is written into the ONNX metadata.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.mrconvnext import MRConvNeXt
from .models.sequence import MRConvSequenceModel
from .mrconv import MRConv, MRConv2d

__all__ = [
    "LONG_CONV_METHODS",
    "TOEPLITZ_MAX_LEN",
    "LongConv",
    "export_form",
    "example_inputs",
    "export_onnx",
    "torch_export",
    "onnx_parity",
]

LONG_CONV_METHODS = ("auto", "toeplitz", "dft")
# onnxruntime 1.32, 1 thread, D = 384: Toeplitz MatMul faster than the DFT pair up to L = 256 (see module doc)
TOEPLITZ_MAX_LEN = 256
OPSET = 18


def _dft_length(seq_len: int, causal_taps: int, anticausal_taps: int) -> int:
    """Power of two with no circular wrap-around onto outputs ``[0, L)`` (lags ``-Ka .. Kc-1``)."""
    need = seq_len + max(anticausal_taps, causal_taps - 1)
    return 1 << (need - 1).bit_length()


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
        self.method = ("toeplitz" if seq_len <= TOEPLITZ_MAX_LEN else "dft") if method == "auto" else method
        kernel = kernel.detach().double()
        causal = kernel[0] if bidirectional else kernel
        anticausal = kernel[1, :, : seq_len - 1] if bidirectional else kernel[:, :0]
        causal = causal[:, :seq_len]
        dim = causal.shape[0]
        self.register_buffer("bias", bias.detach().float().reshape(dim, 1))
        if self.method == "toeplitz":
            # taps by lag -(L-1) .. L-1; T[d, s, t] = tap at lag t - s, so y[b, d] = u[b, d] @ T[d]
            taps = kernel.new_zeros(dim, 2 * seq_len - 1)
            taps[:, seq_len - 1 : seq_len - 1 + causal.shape[1]] = causal
            taps[:, seq_len - 1 - anticausal.shape[1] : seq_len - 1] = anticausal.flip(-1)
            lags = seq_len - 1 + torch.arange(seq_len)[None, :] - torch.arange(seq_len)[:, None]
            self.register_buffer("toeplitz", taps[:, lags].float())
        else:
            self.n = _dft_length(seq_len, causal.shape[1], anticausal.shape[1])
            buffer = kernel.new_zeros(dim, self.n)
            buffer[:, : causal.shape[1]] = causal
            buffer[:, self.n - anticausal.shape[1] :] = anticausal.flip(-1)
            spectrum = torch.fft.rfft(buffer)
            self.register_buffer("spectrum_real", spectrum.real.float())
            self.register_buffer("spectrum_imag", spectrum.imag.float())

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

    def extra_repr(self) -> str:
        size = f", n={self.n}" if self.method == "dft" else ""
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
    return _SequenceGraph(model) if isinstance(model, MRConvSequenceModel) else model


def planned_input(model: nn.Module) -> dict[str, Any]:
    """The input the exported graph takes: names, shapes without the batch, dtypes; and the planned size."""
    _check_exportable(model)
    if isinstance(model, MRConvNeXt):
        height, width = model.img_size
        return dict(inputs={"images": ((model.stem[0].in_channels, height, width), "float32")}, img_size=[height, width])
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
    import onnxruntime as ort

    args = example_inputs(model, batch=batch, lengths=lengths, seed=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {name: a.numpy() for name, a in zip(names, args, strict=True)})[0]
    with torch.no_grad():
        ref = model.eval()(*args).double()
    return ((torch.from_numpy(out).double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def export_onnx(
    model: nn.Module,
    output: str | Path,
    method: str = "auto",
    lengths: bool | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (deploy or eval train form) as ONNX to ``output`` (a ``.onnx`` file), atomically.

    ``lengths`` adds the padding-lengths input of sequence models (default: token models have it).
    Metadata (``onnx.ModelProto.metadata_props``): the planned size, the inputs, the long-convolution
    method per layer, the pretrained cfg, and ``metadata``'s entries, all as JSON strings.
    """
    import onnx

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
            dict(layer=name, seq_len=m.seq_len, method=m.method) for name, m in graph.named_modules() if isinstance(m, LongConv)
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
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output
