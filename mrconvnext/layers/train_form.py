"""The train form of MRConv: sub-kernels combined as in training (paper Sections 3.1-3.3, Appendix D.2.3).

``branch_norm='batch'``, ``combine='sum'`` (Eq. 12)::

    y = sum_i alpha_i * BN_i(k_i * u)            k_i of length l_0 * 2^i, i = 0 .. N-1

In training one fused step computes every branch with its batch statistics
(:func:`~mrconvnext.layers.branch_norm.branch_bn_conv`); in eval mode the BatchNorms are affine maps (Eq. 18)
and the branches merge into one kernel and bias (Eqs. 8, 13): one convolution.

``branch_norm='scale'`` (Eq. 9 with norm-equalised sub-kernels, proposed in Section 6)::

    y = (sum_i alpha_i * pad(k_i) / z_i) * u     z_i the sub-kernel norms at construction

``combine='concat'`` (the Path-X variant, SGConv Eq. 1)::

    y = (cat_i(decay^i * k_i) / Z) * u           segments of length l_0 * 2^max(i-1, 0)

Both are linear in the sub-kernels, so each step does one convolution with the merged kernel.
:func:`merged_batch_norm_kernel` gives the deploy form's kernel and bias of Eq. 12.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .branch_norm import branch_bn_conv, fold_batch_norm, sync_group, update_running_stats
from .fft_conv import conv_buffer, fft_length, full_precision, kernel_buffer, kernel_buffers
from .kernels import SubKernels, merge_kernels

__all__ = ["batch_norm_conv", "concat_kernel", "eval_batch_norm_kernel", "merged_batch_norm_kernel", "scaled_kernel"]


def concat_kernel(kernel: SubKernels, decay: float, seq_len: int, rate: float = 1.0) -> torch.Tensor:
    """SGConv Eq. 1 before normalisation: ``cat_i(decay^i * k_i)`` cut to ``seq_len / rate``; ``(dirs, D, K)``."""
    segments = [k * decay**i for i, k in enumerate(kernel(rate))]
    return torch.cat(segments, dim=-1)[..., : max(1, round(seq_len / rate))]


def scaled_kernel(
    kernel: SubKernels, alpha: torch.Tensor, kernel_norm: torch.Tensor, rate: float = 1.0
) -> torch.Tensor:
    """Eq. 9 with norm-equalised sub-kernels: ``sum_i alpha_i pad(k_i) / z_i``; ``(dirs, D, K)``."""
    return kernel.merge(alpha[:, None, :, None] / kernel_norm, rate)


def batch_norm_conv(
    x: torch.Tensor,
    kernel: SubKernels,
    norm: _BatchNorm,
    alpha: torch.Tensor,
    bidirectional: bool,
    rate: float = 1.0,
) -> torch.Tensor:
    """Eq. 12 on ``x`` ``(B, D, L)``: fused training step with batch statistics (and their running
    averages updated), or in eval mode one convolution with the kernel merged from running statistics.

    ``norm`` is the layer's :class:`~mrconvnext.layers.branch_norm.BranchBatchNorm`, or the ``nn.SyncBatchNorm``
    that ``convert_sync_batchnorm`` made of it: then the batch statistics are those of all its processes."""
    seq_len = x.shape[-1]

    def conv(u: torch.Tensor) -> torch.Tensor:
        if norm.training:
            gamma, beta, weights = (t.to(u.dtype) for t in (norm.weight, norm.bias, alpha))
            kernels = [(k if bidirectional else k[0]).to(u.dtype) for k in kernel(rate)]
            n = fft_length(seq_len, kernels[-1].shape[-1], bidirectional)
            buffers = kernel_buffers(kernels, seq_len, n, bidirectional)  # (N, D, n)
            # the workspace is Python-side state (not traced) and was measured to pay off on the CPU only
            use_workspace = u.device.type == "cpu" and not torch.compiler.is_compiling()
            workspace = getattr(norm, "workspace", None) if use_workspace else None
            y, mean, var = branch_bn_conv(u, buffers, gamma, beta, weights, norm.eps, workspace, sync_group(norm))
            update_running_stats(norm, mean, var)
            return y
        merged, bias = eval_batch_norm_kernel(kernel, norm, alpha, u.dtype, rate)
        merged = merged if bidirectional else merged[0]
        n = fft_length(seq_len, merged.shape[-1], bidirectional)
        return conv_buffer(u, kernel_buffer(merged, seq_len, n, bidirectional), bias)

    return full_precision(conv, x)


def eval_batch_norm_kernel(
    kernel: SubKernels, norm: _BatchNorm, alpha: torch.Tensor, dtype: torch.dtype, rate: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode Eq. 12 as one kernel ``(dirs, D, K)`` and bias ``(D,)`` in ``dtype``, merged from the running
    statistics (Eqs. 8, 13, 18) in differentiable ops: what the eval-mode train form convolves with."""
    gamma, beta, weights = (t.to(dtype) for t in (norm.weight, norm.bias, alpha))
    scale = weights * gamma * torch.rsqrt(norm.running_var.to(dtype) + norm.eps)
    bias = (weights * beta - scale * norm.running_mean.to(dtype)).sum(0)
    return kernel.merge(scale[:, None, :, None].to(alpha.dtype), rate).to(dtype), bias


def merged_batch_norm_kernel(
    kernel: SubKernels, norm: _BatchNorm, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode Eq. 12 as one kernel ``(dirs, D, K)`` and bias ``(D,)`` (Eqs. 8, 13, 18), in float64."""
    scale, shift = (t.double() for t in fold_batch_norm(norm))
    weights = alpha.double()
    merged = merge_kernels([k.double() for k in kernel()], (weights * scale)[:, None, :, None])
    return merged, (weights * shift).sum(0)
