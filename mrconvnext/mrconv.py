"""MRConv: reparameterized multi-resolution long convolutions (MRConv paper, Section 3).

Train form (``combine='sum'``, Eq. 12)::

    y = sum_i alpha_i * BN_i(k_i * u)            k_i of length l_0 * 2^i, i = 0 .. N-1

Deploy form (Eq. 13, BN folded with Eq. 18)::

    y = k_rep * u + b,   k_rep = sum_i alpha_i gamma_i / sigma_i * pad(k_i),
                         b     = sum_i alpha_i (beta_i - gamma_i mu_i / sigma_i)

``norm='scale'`` replaces the BatchNorms by linear rescaling (Eq. 9, proposed in Section 6 but
not evaluated in the paper): ``y = (sum_i alpha_i * pad(k_i) / z_i) * u`` with ``z_i`` the
sub-kernel norms at construction, merged during training so each step does one convolution.

``combine='concat'`` is the Path-X variant (Appendix D.2.3) that follows SGConv's Eq. 1:
sub-kernels of lengths ``l_0 * 2^max(i-1, 0)`` are scaled by a fixed ``decay^i``,
concatenated in time and divided by their norm at construction (no BN, no alpha).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._mrconv_autograd import BranchWorkspace, branch_bn_conv, conv_buffer
from .fft_conv import (
    _HALF_DTYPES,
    fft_conv,
    fft_conv_spectrum,
    fft_length,
    kernel_buffer,
    kernel_buffers,
    kernel_spectrum,
    merge_kernels,
    toeplitz_kernel,
)
from .kernels import KERNEL_TYPES, SubKernels, create_kernel

__all__ = ["MRConv", "MRConv2d", "BranchBatchNorm", "resolution_lengths", "COMBINE_MODES", "NORM_TYPES"]

COMBINE_MODES = ("sum", "concat")
NORM_TYPES = ("batch", "scale")

# Sequences up to this length use a dense Toeplitz matmul in the cached inference path: at
# L = 49 it was 2.7x faster than rfft + mul + irfft (1 CPU thread), at L = 196 1.3x slower.
_TOEPLITZ_MAX_LEN = 128
_CACHE_SIZE = 8


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


class BranchBatchNorm(nn.Module):
    """``N`` independent BatchNorms over ``D`` channels, stored stacked as ``(N, D)`` tensors.

    Applied in one ``F.batch_norm`` call to branch outputs of shape ``(B, N, D, L)``; running
    statistics are updated in place through views of the stacked buffers.
    """

    def __init__(self, num_branches: int, dim: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.num_branches = num_branches
        self.dim = dim
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_branches, dim))
        self.bias = nn.Parameter(torch.zeros(num_branches, dim))
        self.register_buffer("running_mean", torch.zeros(num_branches, dim))
        self.register_buffer("running_var", torch.ones(num_branches, dim))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, branches, dim, length = x.shape
        factor = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if factor is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / int(self.num_batches_tracked)
        out = F.batch_norm(
            x.reshape(batch, branches * dim, length),
            self.running_mean.view(-1),
            self.running_var.view(-1),
            self.weight.reshape(-1).to(x.dtype),
            self.bias.reshape(-1).to(x.dtype),
            training=self.training,
            momentum=factor if factor is not None else 0.0,
            eps=self.eps,
        )
        return out.view(batch, branches, dim, length)

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-branch ``(scale, shift)`` of the eval-mode affine map, Eq. 18."""
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def extra_repr(self) -> str:
        return f"num_branches={self.num_branches}, dim={self.dim}, eps={self.eps}, momentum={self.momentum}"


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
        norm: ``'batch'`` (exact per-branch BatchNorm, Eq. 12) or ``'scale'`` (Eq. 9 linear
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
        norm: str = "batch",
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
        if norm not in NORM_TYPES:
            raise ValueError(f"unknown norm {norm!r}; expected one of {list(NORM_TYPES)}")
        if norm != "batch" and combine != "sum":
            raise ValueError(f"norm={norm!r} needs combine='sum' (concat has no per-branch norm), got {combine!r}")
        if max_resolutions is not None and max_resolutions < 1:
            raise ValueError(f"max_resolutions must be >= 1 or None, got {max_resolutions}")
        self.dim = dim
        self.seq_len = seq_len
        self.kernel_size = kernel_size
        self.kernel_type = kernel_type
        self.bidirectional = bidirectional
        self.combine = combine
        self.decay = decay
        self.norm_type = norm
        self.num_directions = 2 if bidirectional else 1
        self.lengths, self.nominal_lengths = resolution_lengths(seq_len, kernel_size, max_resolutions, combine)
        self.num_resolutions = len(self.lengths)
        if combine == "sum":
            self.deploy_kernel_len = max(self.lengths)
        else:
            self.deploy_kernel_len = min(sum(self.lengths), seq_len)
        self.deploy = False
        self._spectrum_cache: dict = {}
        self._branch_workspace = BranchWorkspace()
        if deploy:
            self._init_deploy()
            return
        self.kernel: SubKernels = create_kernel(
            kernel_type, dim, kernel_size, self.lengths, self.nominal_lengths, self.num_directions
        )
        if combine == "sum":
            if norm == "batch":
                self.norm = BranchBatchNorm(self.num_resolutions, dim, eps=bn_eps, momentum=bn_momentum)
            else:
                with torch.no_grad():
                    norms = torch.stack([k.norm(dim=-1, keepdim=True) for k in self.kernel()])
                self.register_buffer("kernel_norm", norms.clamp_min(1e-12), persistent=True)  # (N, dirs, D, 1)
            self.alpha = nn.Parameter(torch.full((self.num_resolutions, dim), 1.0 / self.num_resolutions))
        else:
            with torch.no_grad():
                norm = self._concat_kernel(normalize=False).norm(dim=-1, keepdim=True)
            self.register_buffer("kernel_norm", norm.clamp_min(1e-12), persistent=True)

    def _init_deploy(self) -> None:
        shape = (self.num_directions, self.dim, self.deploy_kernel_len)
        self.weight = nn.Parameter(torch.zeros(shape if self.bidirectional else shape[1:]))
        self.bias = nn.Parameter(torch.zeros(self.dim))
        self.deploy = True

    # ----------------------------------------------------------------------------- kernels
    def _concat_kernel(self, rate: float = 1.0, normalize: bool = True) -> torch.Tensor:
        """SGConv Eq. 1: ``cat(decay^i * k_i) / Z``, cut to the planned length; ``(dirs, D, K)``."""
        segments = [k * self.decay**i for i, k in enumerate(self.kernel(rate))]
        kernel = torch.cat(segments, dim=-1)[..., : max(1, round(self.seq_len / rate))]
        return kernel / self.kernel_norm if normalize else kernel

    def _scaled_kernel(self, rate: float = 1.0) -> torch.Tensor:
        """Eq. 9 with norm-equalised sub-kernels: ``sum_i alpha_i pad(k_i) / z_i``, ``(dirs, D, K)``."""
        return self.kernel.merge(self.alpha[:, None, :, None] / self.kernel_norm, rate)

    def _padded_kernels(self, rate: float = 1.0) -> torch.Tensor:
        """Sub-kernels zero-padded on the right to one length (Eq. 7): ``(N, dirs, D, K)``."""
        kernels = self.kernel(rate)
        length = max(k.shape[-1] for k in kernels)
        return torch.stack([F.pad(k, (0, length - k.shape[-1])) for k in kernels])

    @torch.no_grad()
    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deploy form's ``(kernel, bias)`` computed from the train form (Eqs. 8, 13, 18).

        The kernel has the layout of :func:`fft_conv`: ``(D, K)`` causal, ``(2, D, K)``
        bidirectional. Computed in float64, returned in the parameters' dtype.
        """
        if self.deploy:
            return self.weight.detach().clone(), self.bias.detach().clone()
        dtype = next(self.parameters()).dtype
        if self.norm_type == "scale":
            kernel = self._scaled_kernel().double()
            bias = kernel.new_zeros(self.dim)
        elif self.combine == "sum":
            kernels = [k.double() for k in self.kernel()]
            scale, shift = (t.double() for t in self.norm.fold())
            alpha = self.alpha.double()
            kernel = merge_kernels(kernels, (alpha * scale)[:, None, :, None])
            bias = (alpha * shift).sum(0)
        else:
            kernel = self._concat_kernel().double()
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
        self._spectrum_cache.clear()

    # ----------------------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> MRConv:
        """As ``nn.Module.train``; switching to eval frees the storage kept for the training step's branches."""
        if not mode:
            self._branch_workspace.release()
        return super().train(mode)

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
        if self.deploy:
            if rate != 1:
                raise ValueError(
                    "a reparameterized MRConv is fixed to its training sampling rate; "
                    "resample (rate != 1) before calling reparameterize()"
                )
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
                return self._forward_deploy_autograd(x)
            return self._forward_cached(x)
        if self.combine == "concat":
            kernel = self._concat_kernel(rate)
            return fft_conv(x, kernel if self.bidirectional else kernel[0], self.bidirectional)
        if self.norm_type == "scale":
            kernel = self._scaled_kernel(rate)
            return fft_conv(x, kernel if self.bidirectional else kernel[0], self.bidirectional)
        return self._forward_branches(x, rate)

    def _forward_deploy_autograd(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        compute_dtype = torch.float32 if out_dtype in _HALF_DTYPES else out_dtype
        seq_len = x.shape[-1]
        n = fft_length(seq_len, self.deploy_kernel_len, self.bidirectional)
        with torch.autocast(device_type=x.device.type, enabled=False):
            buffer = kernel_buffer(self.weight.to(compute_dtype), seq_len, n, self.bidirectional)
            y = conv_buffer(x.to(compute_dtype), buffer, self.bias.to(compute_dtype))
        return y.to(out_dtype)

    def _forward_cached(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with the deploy kernel's spectrum (or Toeplitz matrix) cached per length/device/dtype.

        The cache is keyed on the weight's version counter and storage, so in-place updates,
        ``load_state_dict`` and moves invalidate it; the bias rides in the FFT's DC bin. Under
        ``torch.compile`` the kernel is computed in the graph instead (a Python-side cache would
        invalidate the compiled guards on every call).
        """
        out_dtype = x.dtype
        compute_dtype = torch.float32 if out_dtype in _HALF_DTYPES else out_dtype
        seq_len = x.shape[-1]
        direct = seq_len <= _TOEPLITZ_MAX_LEN
        n = fft_length(seq_len, self.deploy_kernel_len, self.bidirectional)
        key = (seq_len, direct, x.device, compute_dtype)
        # inference tensors (built under torch.inference_mode) have no version counter: never cached
        cacheable = not (torch.compiler.is_compiling() or self.weight.is_inference() or self.bias.is_inference())
        version = (
            (self.weight._version, self.weight.data_ptr(), self.bias._version, self.bias.data_ptr())
            if cacheable
            else None
        )
        cached = self._spectrum_cache.get(key) if cacheable else None
        if cached is None or cached[0] != version:
            weight = self.weight.detach().to(compute_dtype)
            if direct:
                kernel = toeplitz_kernel(weight, seq_len, self.bidirectional)
            else:
                kernel = kernel_spectrum(weight, seq_len, n, self.bidirectional)
            if len(self._spectrum_cache) >= _CACHE_SIZE:
                self._spectrum_cache.clear()
            cached = (version, kernel)
            if cacheable:
                self._spectrum_cache[key] = cached
        kernel = cached[1]
        bias = self.bias.detach().to(compute_dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = x.to(compute_dtype)
            if direct:
                # baddbmm over (D, B, L) needs unit-stride rows: with channels-last input it falls back to one matmul per channel
                rows = u if u.stride(-1) == 1 else u.contiguous()
                y = torch.baddbmm(bias[:, None, None], rows.transpose(0, 1), kernel).transpose(0, 1)
            else:
                y = fft_conv_spectrum(u, kernel, n, bias)
        return y.to(out_dtype)

    def _forward_branches(self, x: torch.Tensor, rate: float) -> torch.Tensor:
        """Eq. 12: fused training step (:func:`branch_bn_conv`), or one merged convolution in eval mode."""
        out_dtype = x.dtype
        compute_dtype = torch.float32 if out_dtype in _HALF_DTYPES else out_dtype
        seq_len = x.shape[-1]
        norm = self.norm
        with torch.autocast(device_type=x.device.type, enabled=False):
            gamma, beta, alpha = (t.to(compute_dtype) for t in (norm.weight, norm.bias, self.alpha))
            u = x.to(compute_dtype)
            if norm.training:
                norm.num_batches_tracked.add_(1)
                factor = norm.momentum if norm.momentum is not None else 1.0 / int(norm.num_batches_tracked)
                kernels = [(k if self.bidirectional else k[0]).to(compute_dtype) for k in self.kernel(rate)]
                n = fft_length(seq_len, kernels[-1].shape[-1], self.bidirectional)
                buffers = kernel_buffers(kernels, seq_len, n, self.bidirectional)  # (N, D, n)
                y = branch_bn_conv(
                    u,
                    buffers,
                    gamma,
                    beta,
                    alpha,
                    norm.running_mean,
                    norm.running_var,
                    factor,
                    norm.eps,
                    None if torch.compiler.is_compiling() else self._branch_workspace,  # Python-side state
                )
            else:  # running statistics: Eq. 13 on the fly, one convolution
                scale = alpha * gamma * torch.rsqrt(norm.running_var.to(compute_dtype) + norm.eps)
                bias = (alpha * beta - scale * norm.running_mean.to(compute_dtype)).sum(0)
                merged = self.kernel.merge(scale[:, None, :, None].to(self.alpha.dtype), rate).to(compute_dtype)
                merged = merged if self.bidirectional else merged[0]
                n = fft_length(seq_len, merged.shape[-1], self.bidirectional)
                y = conv_buffer(u, kernel_buffer(merged, seq_len, n, self.bidirectional), bias)
        return y.to(out_dtype)

    def _forward_branches_reference(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """Plain autograd Eq. 12 (branch outputs, ``BranchBatchNorm``, alpha): the tests' reference path."""
        out_dtype = x.dtype
        compute_dtype = torch.float32 if out_dtype in _HALF_DTYPES else out_dtype
        seq_len = x.shape[-1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            kernels = self._padded_kernels(rate).to(compute_dtype)
            if not self.bidirectional:
                kernels = kernels[:, 0]
            n = fft_length(seq_len, kernels.shape[-1], self.bidirectional)
            k_f = kernel_spectrum(kernels, seq_len, n, self.bidirectional)  # (N, D, F)
            u_f = torch.fft.rfft(x.to(compute_dtype), n=n)  # (B, D, F)
            branches = torch.fft.irfft(u_f.unsqueeze(1) * k_f, n=n)[..., :seq_len]  # (B, N, D, L)
            normed = self.norm(branches)
            y = torch.einsum("bndl,nd->bdl", normed, self.alpha.to(compute_dtype))
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, seq_len={self.seq_len}, kernel_size={self.kernel_size}, "
            f"kernel_type={self.kernel_type!r}, bidirectional={self.bidirectional}, combine={self.combine!r}, "
            f"norm={self.norm_type!r}, "
            f"lengths={self.lengths}, deploy={self.deploy}"
        )


class MRConv2d(MRConv):
    """MRConv on ``(B, C, H, W)`` maps: H x W flattened row-major to one sequence and back.

    ``seq_len`` is the ``H * W`` of the training resolution; 1D kernels over flattened rows
    are tied to the feature-map width they were trained at.
    """

    def forward(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        self._check_input(x, 4, "(B, C, H, W)")
        batch, channels, height, width = x.shape
        return self._forward_seq(x.reshape(batch, channels, height * width), rate).view(batch, channels, height, width)
