"""Deploy graphs outside eager PyTorch: ONNX (run in onnxruntime) and ``torch.export``.

:func:`export_form` copies a model and swaps every MRConv for a :class:`~mrconvnext.layers.LongConv`
(the reparameterized layer, paper Eq. 13, in export-friendly ops). The exported graphs have a dynamic
batch axis; the sequence length / image size is the planned one (the kernels' training length) and is
written into the ONNX metadata.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..layers.deploy_form import fastest
from ..layers.long_conv import LongConv, RuntimeCosts, calibrate
from ..layers.mrconv import MRConv
from ..models.mrconvnext import MRConvNeXt
from ..models.sequence import MRConvSequenceModel
from .files import atomic_path

__all__ = [
    "export_form",
    "example_inputs",
    "export_onnx",
    "torch_export",
    "onnx_parity",
    "onnxruntime_costs",
    "planned_input",
]

OPSET = 18


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


def export_form(model: nn.Module, method: str = "auto", costs: RuntimeCosts | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` with every MRConv swapped for a :class:`LongConv`.

    Takes the deploy form or the train form (folded the way its eval mode computes, Eqs. 8, 13, 18).
    Sequence models are wrapped so that ``forward(x, lengths=None)`` has no host-side checks. ``costs`` price
    the long-convolution forms (see :mod:`~mrconvnext.layers.long_conv`; default: measured in eager PyTorch).
    """
    _check_exportable(model)
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, MRConv):
            model.set_submodule(name, LongConv.from_mrconv(module, method, costs))
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


def _session(proto_bytes: bytes, threads: int | None):
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(proto_bytes, options, providers=["CPUExecutionProvider"])


@functools.cache
def onnxruntime_costs(threads: int | None = None) -> RuntimeCosts:
    """The long-convolution cost model's prices measured in onnxruntime (CPU, ``threads`` intra-op threads;
    None: onnxruntime's default), from one-node graphs (:func:`~mrconvnext.layers.long_conv.calibrate`)."""
    onnx = _require("onnx")
    helper = onnx.helper
    rng = np.random.default_rng(0)

    def time_node(op: str, constant: tuple[int, ...], shape: tuple[int, ...], out: tuple[int, ...]) -> float:
        value = onnx.numpy_helper.from_array(rng.standard_normal(constant).astype(np.float32), "c")
        inputs = ["c", "x"] if op == "MatMul" else ["x", "c"]
        graph = helper.make_graph(
            [helper.make_node(op, inputs, ["y"])],
            op,
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(out))],
            [value],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        session = _session(proto.SerializeToString(), threads)
        feed = {"x": rng.standard_normal(shape).astype(np.float32)}
        return fastest(lambda: session.run(None, feed))

    def time_matmul(a: tuple[int, ...], b: tuple[int, ...]) -> float:
        return time_node("MatMul", a, b, (*b[:-2], a[-2], b[-1]))

    def time_mul(x: tuple[int, ...], c: tuple[int, ...]) -> float:
        return time_node("Mul", c, x, x)

    return calibrate(time_matmul, time_mul)


def onnx_parity(path: str | Path, model: nn.Module, lengths: bool, batch: int = 3, threads: int = 1) -> float:
    """Max relative error ``max |y_ort - y_torch| / max |y_torch|`` of logits on random inputs of the planned size.

    The reference is ``model`` itself in eager PyTorch (eval mode, float32), on the same inputs.
    """
    args = example_inputs(model, batch=batch, lengths=lengths, seed=1)
    session = _session(Path(path).read_bytes(), threads)
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
            f"ONNX export needs {module!r}: pip install onnx onnxscript onnxruntime (or, in a clone of mrconvnext, pip install '.[export]')"
        ) from e


def export_onnx(
    model: nn.Module,
    output: str | Path,
    method: str = "auto",
    lengths: bool | None = None,
    metadata: dict[str, Any] | None = None,
    verify: bool = True,
    tolerance: float = 1e-4,
    costs: RuntimeCosts | None = None,
) -> tuple[Path, float | None]:
    """Write ``model`` (deploy or eval train form) as ONNX to ``output`` (a ``.onnx`` file), atomically.

    ``lengths`` adds the padding-lengths input of sequence models (default: token models have it).
    Metadata (``onnx.ModelProto.metadata_props``, JSON strings): the planned size (``img_size`` or
    ``seq_len``), the inputs and output, the long-convolution form per layer, the pretrained cfg and
    ``metadata``'s entries. With ``verify`` the written graph runs in onnxruntime against ``model``
    in eager PyTorch (:func:`onnx_parity`); nothing is written if the error exceeds ``tolerance``. ``costs``
    price the long-convolution forms (default: :func:`onnxruntime_costs` with onnxruntime's default threads).
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
    graph = export_form(model, method, costs or (onnxruntime_costs() if method in ("auto", "matmul") else None))
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
            dict(layer=name, seq_len=m.seq_len, method=m.method, factors=list(m.factors))
            for name, m in graph.named_modules()
            if isinstance(m, LongConv)
        ],
        pretrained_cfg={k: v for k, v in cfg.items() if isinstance(v, str | int | float | bool | list | tuple | None)},
        **{k: v for k, v in planned.items() if k != "inputs"},
        **(metadata or {}),
    )
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in entries.items()})
    output = Path(output)
    with atomic_path(output) as tmp:
        onnx.save_model(proto, str(tmp))
        error = onnx_parity(tmp, model, lengths) if verify else None
        if error is not None and not error < tolerance:
            raise RuntimeError(
                f"onnxruntime disagrees with PyTorch on {output.name}: max relative error {error:.2e} >= {tolerance}"
            )
    return output, error
