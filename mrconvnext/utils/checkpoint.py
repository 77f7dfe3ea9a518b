"""One checkpoint schema and one loader, for every tool (training, validate, export, plot, convert, the demo).

A checkpoint this project writes (:func:`checkpoint_record`, saved with :func:`save_checkpoint_file`) records what
its model's shapes depend on next to the weights, in the names timm uses for the same things:

``arch``
    the registered model name (the key timm's ``train.py`` writes);
``model_args``
    ``timm.models.get_model_args(model)``: the ``create_model`` keyword arguments the model was built with,
    plus its ``num_classes``, ``in_chans`` and planned ``img_size`` (the ``model_args`` of a ``config.json``);
``pretrained_cfg``
    the evaluation data config of the run (``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``,
    ``mean``, ``std``), which timm's ``resolve_data_config(model=...)`` then reads from the model;
``state_dict`` (and ``state_dict_ema``)
    the weights, train or deploy form; plus whatever the writer adds (``epoch``, ``metric``, ``task``).

A ``.safetensors`` file keeps the three entries as JSON in its metadata (key ``mrconvnext``), or in the
``config.json`` beside it; an export folder (``python -m mrconvnext.export``, timm's ``save_for_hf``) in its
``config.json``. :func:`read_checkpoint` reads all of these, timm ``train.py`` checkpoints (its ``args``:
``model_kwargs``, ``num_classes``, ``in_chans``, and the data settings; never its data size ``args.img_size`` as
the planned size) and bare state dicts; what is not recorded is read from the weights' shapes.
:func:`create_model_from_checkpoint` builds the model in either form from any of them.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.layers import to_2tuple
from timm.models import (
    get_model_args,
    get_model_input_config,
    get_pretrained_cfg,
    is_model_in_modules,
    model_entrypoint,
    split_model_name_tag,
)
from timm.models._helpers import clean_state_dict
from timm.utils import reparameterize_model

from ..layers.mrconv import mrconv_form
from ..models._builder import select_state_dict
from .cli import InputError, add_model_kwargs_argument
from .files import atomic_path

__all__ = [
    "DATA_CONFIG_KEYS",
    "add_checkpoint_arguments",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_record",
    "create_model_checked",
    "create_model_from_checkpoint",
    "is_mrconv_model",
    "ModelArgumentError",
    "read_checkpoint",
    "save_checkpoint_file",
]

DATA_CONFIG_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
_METADATA_KEY = "mrconvnext"  # safetensors metadata entry holding the record as JSON
_EXPORT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm's save_for_hf writes


class CheckpointError(InputError):
    """A checkpoint that cannot be read, or does not fit the model asked for; the message names both."""


class ModelArgumentError(InputError):
    """A ``create_model`` keyword argument the model does not take; the message names it and the closest ones."""


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--model`` and ``--model-kwargs`` of a tool that reads a checkpoint with
    :func:`create_model_from_checkpoint` (the model and its arguments default to the recorded ones)."""
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint (.pth / .pth.tar / .safetensors) or export folder"
    )
    parser.add_argument(
        "--model", default=None, help="registered model name, e.g. mrconvnext_atto (default: the checkpoint's)"
    )
    add_model_kwargs_argument(parser, help="create_model kwargs a bare state dict lacks, e.g. img_size=64")


def is_mrconv_model(name: str) -> bool:
    """Whether ``name`` is one of this package's registered models (MRConvNeXt or a sequence model)."""
    family = split_model_name_tag(name)[0]
    return timm.is_model(family) and model_entrypoint(family).__module__.startswith("mrconvnext.")


_UNEXPECTED_KEYWORD = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


def _init_arguments(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s and, through ``**kwargs``, its bases'."""
    names: list[str] = []
    for base in cls.__mro__:
        if "__init__" not in vars(base):
            continue
        params = list(inspect.signature(base.__init__).parameters.values())[1:]  # without self
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _unknown_argument_message(name: str, error: TypeError) -> str | None:
    """For ``timm.create_model(name, ...)``'s ``TypeError`` about a keyword no constructor takes: a message naming
    the keyword, the class and its closest arguments; None for any other error."""
    match = _UNEXPECTED_KEYWORD.search(str(error))
    if match is None:
        return None
    owner, key = match.groups()
    try:
        with torch.device("meta"):  # no memory, no initialisation: which classes the model is built of
            model = timm.create_model(name)
    except Exception:  # then the plain message
        return None
    cls = next((type(m) for m in model.modules() if owner in {c.__name__ for c in type(m).__mro__}), None)
    if cls is None:
        return None
    accepted = _init_arguments(cls)
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"it takes {', '.join(accepted)}"
    return f"{name} ({cls.__name__}) takes no argument {key!r}; {hint}"


def create_model_checked(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)``; a keyword argument none of the model's constructors takes (a
    misspelt ``--model-kwargs`` key) raises :class:`ModelArgumentError` naming it and the closest arguments."""
    try:
        return timm.create_model(model_name, **kwargs)
    except TypeError as e:
        message = _unknown_argument_message(model_name, e)
        if message is None:
            raise
        raise ModelArgumentError(message) from e


@contextmanager
def _quiet_timm_loading() -> Iterator[None]:
    """Without timm's "Loading pretrained weights" line: this loader reports success or failure itself."""
    logger = logging.getLogger("timm.models._builder")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _json_safe(value: Any) -> Any:
    """Tuples as lists, recursively (what ``json`` and ``torch.load(weights_only=True)`` read back alike)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def checkpoint_record(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    state_dict_ema: dict[str, torch.Tensor] | None = None,
    data_config: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The dict a checkpoint file holds for ``model`` (built by ``timm.create_model``): see the module docstring.

    ``state_dict`` defaults to the model's own; ``data_config`` (timm's ``resolve_data_config`` output)
    defaults to the one the model's pretrained cfg gives.
    """
    arch = model.pretrained_cfg.get("architecture")
    if not arch:
        raise ValueError(f"{type(model).__name__} was not built by timm.create_model: no architecture to record")
    args = {k: v for k, v in get_model_args(model).items() if k != "deploy"}  # the weights say which form
    # by default the model's pretrained cfg at its planned size (timm keeps the source size in the cfg)
    data_config = data_config or {**resolve_data_config(model=model), **get_model_input_config(model)}
    record = {
        "arch": arch,
        "model_args": _json_safe(args),
        "pretrained_cfg": _json_safe({k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None}),
        "state_dict": model.state_dict() if state_dict is None else state_dict,
    }
    if state_dict_ema is not None:
        record["state_dict_ema"] = state_dict_ema
    return {**record, **extra}


def save_checkpoint_file(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``record`` to ``path`` (``.safetensors``: the weights, the rest as metadata; else ``torch.save``),
    whole or not at all (:func:`~mrconvnext.utils.files.atomic_path`)."""
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            meta = {k: record[k] for k in ("arch", "model_args", "pretrained_cfg") if k in record}
            tensors = {k: v.contiguous() for k, v in record["state_dict"].items()}
            safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt", _METADATA_KEY: json.dumps(meta)})
        else:
            torch.save(record, tmp)
    return Path(path)


def _data_config(values: dict[str, Any]) -> dict[str, Any]:
    """The data config entries of ``values`` (as timm's ``resolve_data_config`` gives them: sizes as tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in DATA_CONFIG_KEYS}


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found: the weights and what their model was built with."""

    path: str
    state_dict: dict[str, torch.Tensor]
    arch: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)  # the data config (DATA_CONFIG_KEYS)
    extra: dict[str, Any] = field(default_factory=dict)  # epoch, metric, task, ... as written

    def __post_init__(self) -> None:
        self.pretrained_cfg = _data_config(self.pretrained_cfg)

    @property
    def form(self) -> str:
        """``'train'`` or ``'deploy'``: the form of the MRConv weights (see :func:`~mrconvnext.layers.mrconv_form`)."""
        return mrconv_form(self.state_dict)


def _legacy_model_args(saved: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` of files written before this schema: top-level ``num_classes`` / ``img_size`` /
    ``mrconv_norm`` (ImageNet runs), ``model_kwargs`` with ``mrconv_kwargs.norm`` (sequence runs)."""
    args = dict(saved.get("model_kwargs") or {})
    for key in ("num_classes", "img_size"):
        if isinstance(saved.get(key), (int, list, tuple)):
            args.setdefault(key, saved[key])
    mrconv = dict(args.get("mrconv_kwargs") or {})
    if "norm" in mrconv:
        mrconv["branch_norm"] = mrconv.pop("norm")
    if isinstance(saved.get("mrconv_norm"), str):
        mrconv.setdefault("branch_norm", saved["mrconv_norm"])
    if mrconv:
        args["mrconv_kwargs"] = mrconv
    return args


def _timm_train_record(args: argparse.Namespace) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """``arch``, ``model_args`` and data config of a checkpoint timm's ``train.py`` wrote (its ``args``)."""
    opts = vars(args)
    model_args = dict(opts.get("model_kwargs") or {})  # where timm's train.py takes img_size=... for the model
    for key in ("num_classes", "in_chans"):
        if opts.get(key) is not None:
            model_args.setdefault(key, opts[key])
    data = {k: opts[k] for k in ("crop_pct", "crop_mode", "interpolation", "mean", "std") if opts.get(k)}
    if opts.get("input_size"):
        data["input_size"] = list(opts["input_size"])
    elif opts.get("img_size"):
        data["input_size"] = [opts.get("in_chans") or 3, opts["img_size"], opts["img_size"]]
    return opts.get("model"), model_args, data


def _read_config_json(path: Path) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """``arch``, ``model_args`` and data config of an export folder's ``config.json`` (timm's ``save_for_hf``)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_args") or {}, dict):
        raise CheckpointError(f"{str(path)!r} is not a model config: expected a JSON object with 'architecture'")
    model_args = dict(config.get("model_args") or {})
    if "num_classes" in config:
        model_args.setdefault("num_classes", config["num_classes"])
    cfg = config.get("pretrained_cfg") or {}
    return config.get("architecture"), model_args, {k: v for k, v in cfg.items() if v is not None}


def read_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> Checkpoint:
    """The weights (EMA weights with ``use_ema``, as timm's ``load_state_dict``) and the record of ``path``:
    a ``.pth`` / ``.pth.tar`` / ``.bin`` file, a ``.safetensors`` file, or an export folder. Raises
    ``FileNotFoundError`` / :class:`CheckpointError` naming the path and what was expected."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / name for name in _EXPORT_WEIGHTS if (path / name).is_file()), None)
        if weights is None or not (path / "config.json").is_file():
            raise CheckpointError(
                f"folder {str(path)!r} is not an export folder: expected config.json and one of {list(_EXPORT_WEIGHTS)} "
                "(as python -m mrconvnext.export writes), or pass a checkpoint file"
            )
        return Checkpoint(
            str(path), read_checkpoint(weights, use_ema).state_dict, *_read_config_json(path / "config.json")
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                meta = (f.metadata() or {}).get(_METADATA_KEY)
            state_dict = safetensors.torch.load_file(str(path))
        except (OSError, safetensors.SafetensorError) as e:
            raise CheckpointError(f"cannot read {str(path)!r} (truncated or not a safetensors file?): {e}") from e
        if meta:
            record = json.loads(meta)
            return Checkpoint(str(path), state_dict, record.get("arch"), record["model_args"], record["pretrained_cfg"])
        if (path.parent / "config.json").is_file():  # an export folder's weights, named directly
            return Checkpoint(str(path), state_dict, *_read_config_json(path.parent / "config.json"))
        return Checkpoint(str(path), state_dict)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # bytes that are no checkpoint fail anywhere in the unpickler (KeyError, struct.error, ...)
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} (truncated or not a torch.save file?): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(saved).__name__}, expected a dict of tensors")
    state_dict = saved if use_ema else {k: v for k, v in saved.items() if k not in ("state_dict_ema", "model_ema")}
    state_dict = clean_state_dict(select_state_dict(state_dict))
    extra = {k: v for k, v in saved.items() if not isinstance(v, (dict, argparse.Namespace, torch.Tensor))}
    if "model_args" in saved:
        return Checkpoint(
            str(path), state_dict, saved.get("arch"), saved["model_args"], saved.get("pretrained_cfg", {}), extra
        )
    if isinstance(saved.get("args"), argparse.Namespace):
        return Checkpoint(str(path), state_dict, *_timm_train_record(saved["args"]), extra)
    return Checkpoint(str(path), state_dict, saved.get("arch"), _legacy_model_args(saved), {}, extra)


def _inferred_model_args(name: str, ckpt: Checkpoint, given: dict[str, Any]) -> dict[str, Any]:
    """Recorded ``model_args``, completed from the weights' shapes: class count (classifier), input channels
    (first conv) and, for MRConvNeXt, the planned ``img_size`` (its MRConv kernel shapes)."""
    args = dict(ckpt.model_args)
    cfg = get_pretrained_cfg(split_model_name_tag(name)[0])
    head = ckpt.state_dict.get(f"{cfg.classifier}.weight") if cfg and cfg.classifier else None
    if "num_classes" not in args and head is not None:
        args["num_classes"] = head.shape[0]
    stem = ckpt.state_dict.get(f"{cfg.first_conv}.weight") if cfg and cfg.first_conv else None
    if "in_chans" not in args and stem is not None and stem.ndim == 4:
        args["in_chans"] = stem.shape[1]
    if "img_size" not in args and "img_size" not in given and is_model_in_modules(name, ["mrconvnext"]):
        size = timm.create_model(name, **{**args, **given}, device="meta").planned_img_size(ckpt.state_dict)
        if size is not None:
            args["img_size"] = size
    return args


def _same(key: str, a: Any, b: Any) -> bool:
    """Whether two values of the ``create_model`` argument ``key`` mean the same (``img_size`` 64 is (64, 64))."""
    if key == "img_size":
        a, b = to_2tuple(a), to_2tuple(b)
    return _json_safe(a) == _json_safe(b)


def create_model_from_checkpoint(
    checkpoint: str | os.PathLike | Checkpoint,
    model_name: str | None = None,
    *,
    deploy: bool | None = None,
    use_ema: bool = True,
    **model_args: Any,
) -> nn.Module:
    """The model a checkpoint's weights belong to, with them loaded, in eval mode.

    ``model_name`` defaults to the recorded ``arch``; the ``create_model`` arguments are the recorded ones,
    completed from the weights' shapes and overridden by ``model_args``. A given value that differs from the
    recorded one is used; if the weights then do not fit, the error names both. A different class count is an
    error at once (load it and call ``model.reset_classifier(n)`` for a fresh head). ``deploy``: None keeps the
    checkpoint's form, True reparameterizes a train-form checkpoint on load (Eqs. 8, 13, 18). The recorded
    data config becomes the model's pretrained cfg, so timm's ``resolve_data_config(model=model)`` gives it.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, use_ema)
    name = model_name or ckpt.arch
    if not name:
        raise CheckpointError(f"checkpoint {ckpt.path!r} records no model name: pass the model (--model NAME)")
    if not timm.is_model(split_model_name_tag(name)[0]):
        raise CheckpointError(f"unknown model {name!r} (for checkpoint {ckpt.path!r})")
    if ckpt.arch and split_model_name_tag(ckpt.arch)[0] != split_model_name_tag(name)[0]:
        raise CheckpointError(f"checkpoint {ckpt.path!r} holds {ckpt.arch} weights, not {name}: drop the model name")
    recorded = _inferred_model_args(name, ckpt, model_args)
    conflicts = {k: (recorded[k], v) for k, v in model_args.items() if k in recorded and not _same(k, recorded[k], v)}
    if "num_classes" in conflicts:
        have, want = conflicts["num_classes"]
        raise CheckpointError(
            f"checkpoint {ckpt.path!r} has {have} classes but num_classes={want} was given (--num-classes); drop "
            f"it to use the checkpoint's {have}, or load the checkpoint and call model.reset_classifier({want}) "
            "to fine-tune a fresh head"
        )
    args = {**recorded, **model_args}
    if is_mrconv_model(name):
        if deploy is False and ckpt.form == "deploy":
            raise CheckpointError(f"checkpoint {ckpt.path!r} is in deploy form: its train form cannot be recovered")
        args["deploy"] = ckpt.form == "deploy" if deploy is None else deploy
    overlay = {**ckpt.pretrained_cfg, "state_dict": ckpt.state_dict, "num_classes": args.get("num_classes")}
    if "input_size" not in overlay and "img_size" in args:  # nothing recorded: data at the planned size
        overlay["input_size"] = (args.get("in_chans", 3), *to_2tuple(args["img_size"]))
    try:
        with _quiet_timm_loading():
            model = create_model_checked(name, pretrained=True, pretrained_cfg_overlay=overlay, **args)
    except ModelArgumentError:
        raise
    except (RuntimeError, ValueError, TypeError) as e:
        given = "; ".join(f"the checkpoint records {k}={a!r}, given {k}={b!r}" for k, (a, b) in conflicts.items())
        raise CheckpointError(
            f"checkpoint {ckpt.path!r} ({ckpt.arch or 'no recorded model'}, {ckpt.form} form) does not fit "
            f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())}){': ' + given if given else ''}: {e}"
        ) from e
    if deploy and not is_mrconv_model(name):
        model = reparameterize_model(model)
    return model.eval()
