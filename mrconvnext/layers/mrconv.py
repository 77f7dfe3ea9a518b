"""MRConv: reparameterized multi-resolution long convolutions (MRConv paper, Section 3).

A layer exists in one of two forms, switched by :meth:`MRConv.reparameterize` (or built directly
with ``deploy=True``), with one dispatch in :meth:`MRConv.forward`:

* train form (:mod:`~mrconvnext.layers.train_form`): sub-kernels ``k_i`` (:mod:`~mrconvnext.layers.kernels`,
  Section 3.3) combined by Eq. 12 with one BatchNorm per resolution
  (:mod:`~mrconvnext.layers.branch_norm`) and learned ``alpha``; by Eq. 9 scaling (``branch_norm='scale'``); or
  concatenated as in SGConv (``combine='concat'``).
* deploy form (:mod:`~mrconvnext.layers.deploy_form`): one long kernel and a bias (Eq. 13, BN folded
  with Eq. 18), computed from the train form by :meth:`MRConv.merged_kernel`.

Both convolve with FFTs (:mod:`~mrconvnext.layers.fft_conv`, Section 3.4).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from .branch_norm import BranchBatchNorm
from .deploy_form import deploy_conv, export_conv
from .fft_conv import fft_conv, full_precision
from .kernels import KERNEL_TYPES, SubKernels, create_kernel
from .train_form import batch_norm_conv, concat_kernel, eval_batch_norm_kernel, merged_batch_norm_kernel, scaled_kernel

__all__ = [
    "MRConv",
    "MRConv2d",
    "BranchBatchNorm",
    "resolution_lengths",
    "mrconv_form",
    "train_form_twins",
    "fold_train_form",
    "default_strides",
    "COMBINE_MODES",
    "BRANCH_NORMS",
]

COMBINE_MODES = ("sum", "concat")
BRANCH_NORMS = ("batch", "scale")


def resolution_lengths(
    seq_len: int, kernel_size: int, max_resolutions: int | None = None, combine: str = "sum"
) -> tuple[list[int], list[int]]:
    """Actual and nominal sub-kernel lengths for a layer planned for ``seq_len``.

    ``N = ceil(log2(seq_len / l_0)) + 1`` resolutions (Section 3.2), capped by
    ``max_resolutions``. With ``combine='sum'`` resolution ``i`` has nominal length
    ``l_0 * 2^i`` and is cut to ``seq_len``; with ``'concat'`` segment ``i`` has length
    ``l_0 * 2^max(i-1, 0)`` (SGConv Eq. 1), so the segments add up to ``l_0 * 2^(N-1)``.
    """
    num_res = 1
    while kernel_size * 2 ** (num_res - 1) < seq_len:
        num_res += 1
    if max_resolutions is not None:
        num_res = min(num_res, max_resolutions)
    if combine == "concat":
        nominal = [kernel_size * 2 ** max(i - 1, 0) for i in range(num_res)]
        return list(nominal), nominal
    nominal = [kernel_size * 2**i for i in range(num_res)]
    return [min(n, seq_len) for n in nominal], nominal


def mrconv_form(state_dict: Mapping[str, object], prefix: str = "") -> str:
    """``'train'`` or ``'deploy'``: the form of the MRConv weights under ``prefix`` in ``state_dict``.

    The train form holds sub-kernels (keys ``<prefix>kernel.*``), the deploy form one ``weight`` and
    ``bias`` per layer (Eq. 13). With the default ``prefix=''`` every MRConv of a model's state dict
    is looked at: any train-form layer makes it ``'train'``.
    """
    train = any(".kernel." in "." + key[len(prefix) :] for key in state_dict if key.startswith(prefix))
    return "train" if train else "deploy"


def train_form_twins(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, MRConv]:
    """Fresh train-form layers, by key prefix, for the deploy-form MRConvs of ``model`` whose weights
    ``state_dict`` holds in train form (:func:`fold_train_form` folds them)."""
    return {
        name + ".": type(layer)(**layer.config)
        for name, layer in model.named_modules()
        if isinstance(layer, MRConv) and layer.deploy and mrconv_form(state_dict, name + ".") == "train"
    }


def fold_train_form(state_dict: dict[str, torch.Tensor], twins: dict[str, MRConv]) -> dict[str, torch.Tensor]:
    """Replace the train-form weights under each prefix of ``twins`` by the deploy form's ``weight`` and
    ``bias`` (Eqs. 8, 13, 18): the state dict reparameterized on load. Modifies and returns ``state_dict``."""
    for prefix, layer in twins.items():
        layer.load_state_dict({k[len(prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)})
        state_dict[prefix + "weight"], state_dict[prefix + "bias"] = layer.merged_kernel()
    return state_dict


def default_strides(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the strides of a contiguous tensor, also on its size-1 dims (``is_contiguous()`` ignores
    those, DDP's gradient buckets do not): a copy only where they differ."""
    if tensor.stride() == torch.empty(tensor.shape, device="meta").stride():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _torchscript_refused(how: str) -> str:
    return (
        f"MRConv's FFT convolution cannot be {how} by TorchScript: export MRConv models with "
        "`python -m mrconvnext.export --format onnx` (or mrconvnext.utils.onnx.export_onnx), which swaps "
        "every MRConv for its export form (LongConv), with timm's onnx_export(..., use_dynamo=True), or "
        "with torch.export"
    )


@register_notrace_module  # a leaf of timm's FX traces: input checks and the form dispatch branch on shapes
class MRConv(nn.Module):
    """Depthwise multi-resolution global convolution over ``(B, dim, L)`` sequences.

    Args:
        dim: channels ``D``.
        seq_len: training length the resolutions are planned for.
        kernel_size: ``l_0``, length of the first sub-kernel (``1 <= l_0 <= seq_len``).
        kernel_type: ``'dense' | 'dilated' | 'fourier' | 'sparse' | 'fourier_sparse'``.
        bidirectional: add an anti-causal kernel per resolution (lags ``-1 .. -l_i``), so every
            output sees the whole sequence; otherwise causal (lags ``0 .. l_i - 1``).
        max_resolutions: cap on the number of resolutions ``N``.
        combine: ``'sum'`` (Eq. 12, BN per resolution and learned alpha) or ``'concat'``
            (SGConv-style concatenation with fixed ``decay``, the Path-X variant).
        decay: fixed decay factor per segment for ``combine='concat'``.
        deploy: build the reparameterized single-kernel form directly.
        branch_norm: ``'batch'`` (exact per-branch BatchNorm, Eq. 12) or ``'scale'`` (Eq. 9 linear
            rescaling of norm-equalised sub-kernels, merged during training; ``combine='sum'`` only).
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        kernel_size: int,
        kernel_type: str = "fourier",
        bidirectional: bool = True,
        max_resolutions: int | None = None,
        combine: str = "sum",
        decay: float = 0.5,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        deploy: bool = False,
        branch_norm: str = "batch",
    ) -> None:
        super().__init__()
        if dim < 1 or seq_len < 1:
            raise ValueError(f"dim and seq_len must be positive, got dim={dim}, seq_len={seq_len}")
        if not 1 <= kernel_size <= seq_len:
            raise ValueError(f"kernel_size must satisfy 1 <= kernel_size <= seq_len={seq_len}, got {kernel_size}")
        if kernel_type not in KERNEL_TYPES:
            raise ValueError(f"unknown kernel_type {kernel_type!r}; expected one of {sorted(KERNEL_TYPES)}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine {combine!r}; expected one of {list(COMBINE_MODES)}")
        if branch_norm not in BRANCH_NORMS:
            raise ValueError(f"unknown branch_norm {branch_norm!r}; expected one of {list(BRANCH_NORMS)}")
        if branch_norm != "batch" and combine != "sum":
            raise ValueError(
                f"branch_norm={branch_norm!r} needs combine='sum' (concat has no per-branch norm), got {combine!r}"
            )
        if max_resolutions is not None and max_resolutions < 1:
            raise ValueError(f"max_resolutions must be >= 1 or None, got {max_resolutions}")
        self.config = dict(  # what the layer was built with: a fresh train-form twin is type(self)(**config)
            dim=dim,
            seq_len=seq_len,
            kernel_size=kernel_size,
            kernel_type=kernel_type,
            bidirectional=bidirectional,
            max_resolutions=max_resolutions,
            combine=combine,
            decay=decay,
            bn_eps=bn_eps,
            bn_momentum=bn_momentum,
            branch_norm=branch_norm,
        )
        self.dim = dim
        self.seq_len = seq_len
        self.kernel_size = kernel_size
        self.kernel_type = kernel_type
        self.bidirectional = bidirectional
        self.combine = combine
        self.decay = decay
        self.branch_norm = branch_norm
        self.num_directions = 2 if bidirectional else 1
        self.lengths, self.nominal_lengths = resolution_lengths(seq_len, kernel_size, max_resolutions, combine)
        self.num_resolutions = len(self.lengths)
        if combine == "sum":
            self.deploy_kernel_len = max(self.lengths)
        else:
            self.deploy_kernel_len = min(sum(self.lengths), seq_len)
        self.deploy = False
        self._deploy_cache: dict = {}  # the deploy form's inference kernels (see deploy_form)
        if deploy:
            self._init_deploy()
            return
        self.kernel: SubKernels = create_kernel(
            kernel_type, dim, kernel_size, self.lengths, self.nominal_lengths, self.num_directions
        )
        if combine == "sum":
            if branch_norm == "batch":
                self.norm = BranchBatchNorm(self.num_resolutions, dim, eps=bn_eps, momentum=bn_momentum)
            else:
                with torch.no_grad():
                    norms = torch.stack([k.norm(dim=-1, keepdim=True) for k in self.kernel()])
                self.register_buffer("kernel_norm", norms.clamp_min(1e-12), persistent=True)  # (N, dirs, D, 1)
            self.alpha = nn.Parameter(torch.full((self.num_resolutions, dim), 1.0 / self.num_resolutions))
        else:
            with torch.no_grad():
                norm = concat_kernel(self.kernel, decay, seq_len).norm(dim=-1, keepdim=True)
            self.register_buffer("kernel_norm", norm.clamp_min(1e-12), persistent=True)

    def _init_deploy(self) -> None:
        shape = (self.num_directions, self.dim, self.deploy_kernel_len)
        self.weight = nn.Parameter(torch.zeros(shape if self.bidirectional else shape[1:]))
        self.bias = nn.Parameter(torch.zeros(self.dim))
        self.deploy = True

    # ----------------------------------------------------------------------------- train form
    def _train_kernel(self, rate: float = 1.0) -> torch.Tensor:
        """The one merged kernel ``(dirs, D, K)`` of ``combine='concat'`` or ``branch_norm='scale'``."""
        if self.combine == "concat":
            return concat_kernel(self.kernel, self.decay, self.seq_len, rate) / self.kernel_norm
        return scaled_kernel(self.kernel, self.alpha, self.kernel_norm, rate)

    def _train_form(self, x: torch.Tensor, rate: float) -> torch.Tensor:
        if self.combine == "sum" and self.branch_norm == "batch":
            return batch_norm_conv(x, self.kernel, self.norm, self.alpha, self.bidirectional, rate)
        kernel = self._train_kernel(rate)
        return fft_conv(x, kernel if self.bidirectional else kernel[0], self.bidirectional)

    @torch.no_grad()
    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deploy form's ``(kernel, bias)`` computed from the train form (Eqs. 8, 13, 18).

        The kernel has the layout of :func:`fft_conv`: ``(D, K)`` causal, ``(2, D, K)``
        bidirectional. Computed in float64, returned in the parameters' dtype.
        """
        if self.deploy:
            return self.weight.detach().clone(), self.bias.detach().clone()
        dtype = next(self.parameters()).dtype
        if self.combine == "sum" and self.branch_norm == "batch":
            kernel, bias = merged_batch_norm_kernel(self.kernel, self.norm, self.alpha)
        else:
            kernel = self._train_kernel().double()
            bias = kernel.new_zeros(self.dim)
        if not self.bidirectional:
            kernel = kernel[0]
        return kernel.to(dtype), bias.to(dtype)

    def reparameterize(self) -> None:
        """Convert in place to the deploy form (idempotent): one kernel per direction, one bias."""
        if self.deploy:
            return
        kernel, bias = self.merged_kernel()
        for name in ("kernel", "norm", "alpha"):
            if hasattr(self, name):
                delattr(self, name)
        if "kernel_norm" in self._buffers:
            del self._buffers["kernel_norm"]
        self.weight = nn.Parameter(kernel)
        self.bias = nn.Parameter(bias)
        self.deploy = True
        self._deploy_cache.clear()

    # ----------------------------------------------------------------------------- forward
    def _apply(self, fn, recurse=True):
        self._deploy_cache.clear()  # moved or cast: the cached kernels are rebuilt on the new device and dtype
        # kernels are not images: .to(memory_format=torch.channels_last) must not restride the 4-D ones, or their
        # (contiguous) gradients no longer match the parameters' layout (DDP then warns and copies them)
        return super()._apply(lambda t: default_strides(fn(t)), recurse)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_deploy_cache": {}}  # copies and pickles start without the cache

    def __prepare_scriptable__(self) -> MRConv:
        """``torch.jit.script`` calls this on every module before compiling any: one clear error instead of
        TorchScript's on the first Python construct it does not take (timm's ``--torchscript``)."""
        raise RuntimeError(_torchscript_refused("scripted"))

    def _check_input(self, x: torch.Tensor, rank: int, layout: str) -> None:
        if x.ndim != rank:
            raise ValueError(f"{type(self).__name__} expects input of shape {layout}, got shape {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects {self.dim} channels (dim 1), got {x.shape[1]}")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")

    def forward(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """``x``: ``(B, dim, L)``, any ``L``. ``rate`` resamples Fourier kernels (train form only)."""
        self._check_input(x, 3, "(B, dim, L)")
        return self._forward_seq(x, rate)

    def _forward_seq(self, x: torch.Tensor, rate: float) -> torch.Tensor:
        """The one dispatch between the forms, for ``(B, dim, L)``."""
        if torch.jit.is_tracing():  # TorchScript tracing (timm's onnx_export.py without --dynamo)
            raise RuntimeError(_torchscript_refused("traced"))
        if torch.compiler.is_exporting():  # torch.export, the dynamo-based ONNX exporter
            return self._export_form(x, rate)
        if not self.deploy:
            return self._train_form(x, rate)
        self._check_deploy_rate(rate)
        return deploy_conv(x, self.weight, self.bias, self.bidirectional, self._deploy_cache)

    def _check_deploy_rate(self, rate: float) -> None:
        if rate != 1:
            raise ValueError(
                "a reparameterized MRConv is fixed to its training sampling rate; "
                "resample (rate != 1) before calling reparameterize()"
            )

    def _export_form(self, x: torch.Tensor, rate: float) -> torch.Tensor:
        """Eq. 13 in exportable ops (:func:`~mrconvnext.layers.deploy_form.export_conv`): the deploy form's kernel,
        or the eval-mode train form's merged in the graph (Eqs. 8, 13, 18)."""
        if self.deploy:
            self._check_deploy_rate(rate)
        elif self.training:
            raise RuntimeError("a train-form MRConv exports in eval mode only (its BatchNorms use running statistics)")

        def conv(u: torch.Tensor) -> torch.Tensor:
            if self.deploy:
                weight, bias = self.weight.to(u.dtype), self.bias.to(u.dtype)
            else:
                if self.combine == "sum" and self.branch_norm == "batch":
                    weight, bias = eval_batch_norm_kernel(self.kernel, self.norm, self.alpha, u.dtype, rate)
                else:
                    weight = self._train_kernel(rate).to(u.dtype)
                    bias = weight.new_zeros(self.dim)
                weight = weight if self.bidirectional else weight[0]
            return export_conv(u, weight, bias, self.bidirectional)

        return full_precision(conv, x)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, seq_len={self.seq_len}, kernel_size={self.kernel_size}, "
            f"kernel_type={self.kernel_type!r}, bidirectional={self.bidirectional}, combine={self.combine!r}, "
            f"branch_norm={self.branch_norm!r}, "
            f"lengths={self.lengths}, deploy={self.deploy}"
        )


@register_notrace_module
class MRConv2d(MRConv):
    """MRConv on ``(B, C, H, W)`` maps: H x W flattened row-major to one sequence and back.

    ``seq_len`` is the ``H * W`` of the training resolution; 1D kernels over flattened rows
    are tied to the feature-map width they were trained at.
    """

    def forward(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        self._check_input(x, 4, "(B, C, H, W)")
        batch, channels, height, width = x.shape
        return self._forward_seq(x.reshape(batch, channels, height * width), rate).view(batch, channels, height, width)
