"""Per-resolution BatchNorm of the train form, Eq. 12 (MRConv paper, Sections 3.2, 3.4).

:class:`BranchBatchNorm` holds the ``N`` BatchNorms' parameters and running statistics, updates
the statistics after a training step and folds them into a per-branch affine map for the deploy
form (Eq. 18). :func:`branch_bn_conv` is the fused training step, with its notation ``u`` the input
``(B, D, L)``, ``kb`` circular kernel buffers of length ``n``
(:func:`~mrconvnext.layers.fft_conv.kernel_buffer`), ``U = rfft(u)``, ``K_i = rfft(kb_i)``.

Branch outputs ``c_i = irfft(U K_i)[:L]`` and batch statistics ``mu_i, sigma_i`` over ``(B, L)``
make the layer affine in the centred branch outputs::

    y = sum_i s_i (c_i - mu_i) + sum_i alpha_i beta_i,   s_i = alpha_i gamma_i / sigma_i

(one ``rfft`` of ``u``, ``N`` ``irfft``, one weighted sum). The means come first, from the
spectra: ``sum_{b, t<L} c_i = sum_f w_f Re(sum_b U_b K_i conj(W))`` (Parseval, ``W`` the spectrum
of ``1_[0,L)``), so each branch is written once, centred, and its variance is one dot product.
BatchNorm's backward makes every branch gradient affine in ``dy`` and ``c_i`` with per-channel
scalars::

    dL/dc_i = s_i (dy - mean(dy)) - (s_i m_i / sigma_i) (c_i - mu_i),   m_i = mean(dy (c_i - mu_i) / sigma_i)

hence ``dL/du = irfft(sum_i conj(K_i) FFT(dL/dc_i))[:L]``: one ``rfft`` of ``dy``, ``N``
``rfft`` of the saved centred ``c_i``, one ``rfft`` recomputing ``U`` (saving ``u`` instead of
its spectrum halves that memory) and one ``irfft``. The reductions over the batch (``m_i`` by
Parseval, kernel gradients ``sum_b conj(U_b) FFT(dL/dc_i)_b``) use spectra already at hand
and leave one small ``irfft`` of ``(N, D, n)`` without a batch factor. As in
:func:`~mrconvnext.layers.fft_conv.conv_buffer`, the loops run over cache-sized blocks of channels.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

from .fft_conv import PaddedRfft, channel_chunk

__all__ = ["BranchBatchNorm", "BranchWorkspace", "branch_bn_conv"]


def _parseval_weights(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``w_f`` with ``sum_t x[t] y[t] = sum_f w_f Re(X_f conj(Y_f))`` over the rfft half spectrum."""
    weights = torch.full((n // 2 + 1,), 2.0 / n, dtype=dtype, device=device)
    weights[0] = 1.0 / n
    if n % 2 == 0:
        weights[-1] = 1.0 / n
    return weights


class BranchWorkspace:
    """One layer's storage for the saved branch outputs of :func:`branch_bn_conv`, reused across steps.

    The saved branches are ``N`` times the activation (96 MB for a stage-1 MRConvNeXt-T layer at
    batch 16). Fresh, they cost a page fault per 4 KB on every step, and glibc's allocator, which
    maps allocations that large anew each time, ends up returning more of the heap to the system
    between ops, so the model's other ops fault more too (measured on the CPU; other devices have
    caching allocators and get no workspace). The storage is reused only once no autograd graph
    holds it (its only reference is this workspace), so gradient accumulation, ``retain_graph`` or
    two forwards before one backward get new storage. Storage is per thread (``nn.DataParallel``
    replicas share the layer object); copies and pickles of the layer start empty; :meth:`release`
    frees it (``BranchBatchNorm.eval()`` and moves do).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def storage(self) -> torch.Tensor | None:
        return getattr(self._local, "storage", None)

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        held = self.storage
        if (
            held is None
            or held.shape != shape
            or held.dtype != like.dtype
            or held.device != like.device
            or held._use_count() != 1  # a graph still holds it
        ):
            held = self._local.storage = like.new_empty(shape)
        return held

    def release(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> BranchWorkspace:
        return BranchWorkspace()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()


class _BranchBatchNormConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, kb, gamma, beta, alpha, eps, workspace):
        batch, dim, seq_len = u.shape
        num_branches, n = kb.shape[0], kb.shape[-1]
        count = batch * seq_len
        if count < 2:
            raise ValueError(f"MRConv BatchNorm needs more than 1 value per channel in training, got {tuple(u.shape)}")
        k_f = torch.fft.rfft(kb, n=n)  # (N, D, F)
        # sum_{t<L} c_i = sum_f w_f Re(C_f conj(W_f)) with W the spectrum of 1_[0, L): the means come
        # from the spectra, before the branch outputs exist
        window_w = torch.fft.rfft(u.new_ones(seq_len), n=n).conj_physical_() * _parseval_weights(n, u.dtype, u.device)
        shape = (num_branches, batch, dim, seq_len)
        branches = workspace.take(shape, u) if workspace is not None else u.new_empty(shape)  # centred: c_i - mu_i
        mean = u.new_empty(num_branches, dim)
        var = u.new_empty(num_branches, dim)
        y = u.new_empty(batch, dim, seq_len)
        step = channel_chunk(u, n)
        rfft = PaddedRfft(u, batch, step, n)
        for start in range(0, dim, step):
            block = slice(start, start + step)
            block_f = rfft(u[:, block])
            mean[:, block] = block_mean = (block_f.sum(0) * window_w * k_f[:, block]).real.sum(-1) / count
            for i in range(num_branches):
                c = torch.fft.irfft(block_f * k_f[i, block], n=n)[..., :seq_len]
                centred = torch.sub(c, block_mean[i, :, None], out=branches[i, :, block])
                var[i, block] = torch.linalg.vecdot(centred, centred).sum(0) / count  # two-pass, stable
            scale = alpha[:, block] * gamma[:, block] * torch.rsqrt(var[:, block] + eps)  # s_i
            shift = (alpha[:, block] * beta[:, block]).sum(0)  # sum_i s_i mu_i cancels against the centring
            out = torch.addcmul(shift[:, None], branches[0, :, block], scale[0, :, None], out=y[:, block])
            for i in range(1, num_branches):
                out.addcmul_(branches[i, :, block], scale[i, :, None])
        ctx.mark_non_differentiable(mean, var)
        # u, not its spectrum (twice the memory): the backward recomputes one rfft per block
        ctx.save_for_backward(u, k_f, branches, var, gamma, beta, alpha)
        ctx.n, ctx.seq_len, ctx.eps = n, seq_len, eps
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):
        u, k_f, branches, var, gamma, beta, alpha = ctx.saved_tensors
        n, seq_len = ctx.n, ctx.seq_len
        num_branches, batch, dim, _ = branches.shape
        count = batch * seq_len
        inv_std = torch.rsqrt(var + ctx.eps)
        scale = alpha * gamma * inv_std
        window_f = torch.fft.rfft(grad_y.new_ones(seq_len), n=n)  # spectrum of 1_[0, L)
        weights = _parseval_weights(n, grad_y.dtype, grad_y.device)
        sum_dy = grad_y.sum((0, 2))  # (D,)
        dot_hat = torch.empty_like(var)  # sum_{b,t} dy c_hat_i, (N, D)
        grad_u = grad_y.new_empty(batch, dim, seq_len) if ctx.needs_input_grad[0] else None
        grad_kb_f = torch.empty_like(k_f)
        step = channel_chunk(grad_y, n)
        rfft = PaddedRfft(grad_y, batch, step, n)
        for start in range(0, dim, step):
            block = slice(start, start + step)
            dy_f = rfft(grad_y[:, block])  # (B, c, F)
            dy_f.sub_(window_f * (sum_dy[block, None] / count))  # spectrum of dy - mean(dy) on [0, L)
            u_conj = rfft(u[:, block]).conj_physical_()
            k_conj = k_f[:, block].conj_physical()  # (N, c, F)
            cross = (u_conj * dy_f).sum(0)  # sum_b conj(U_b) DY_b, (c, F)
            # sum_{b,t} (dy - mean dy) c_i = sum_{b,t} dy (c_i - mu_i), by Parseval
            dot_hat[:, block] = ((cross.conj() * k_f[:, block]).real * weights).sum(-1) * inv_std[:, block]
            coef_dy = scale[:, block]
            coef_c = -coef_dy * dot_hat[:, block] * inv_std[:, block] / count
            grad_u_f = dy_f.mul_((coef_dy[..., None] * k_conj).sum(0))
            grad_kb_f[:, block] = coef_dy[..., None] * cross
            for i in range(num_branches):
                c_f = rfft(branches[i, :, block])  # (B, c, F)
                grad_kb_f[i, block] += (u_conj * c_f).sum(0) * coef_c[i, :, None]
                grad_u_f.addcmul_(c_f, coef_c[i, :, None] * k_conj[i])
            if grad_u is not None:
                grad_u[:, block] = torch.fft.irfft(grad_u_f, n=n)[..., :seq_len]
        grad_kb = torch.fft.irfft(grad_kb_f, n=n) if ctx.needs_input_grad[1] else None
        return grad_u, grad_kb, alpha * dot_hat, alpha * sum_dy, gamma * dot_hat + beta * sum_dy, None, None


def branch_bn_conv(
    u: torch.Tensor,
    kb: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    eps: float,
    workspace: BranchWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode Eq. 12: ``sum_i alpha_i BN_i(kb_i * u)`` with batch statistics.

    ``u``: ``(B, D, L)``; ``kb``: circular kernel buffers ``(N, D, n)``; ``gamma, beta, alpha``:
    ``(N, D)``. ``workspace`` lends the storage for the saved branch outputs (see
    :class:`BranchWorkspace`). Returns ``y`` ``(B, D, L)`` and the branches' batch mean and biased
    variance ``(N, D)`` (constants for autograd) for :meth:`BranchBatchNorm.update_running_stats`.
    """
    return _BranchBatchNormConv.apply(u, kb, gamma, beta, alpha, eps, workspace)


class BranchBatchNorm(nn.Module):
    """``N`` independent BatchNorms over ``D`` channels, one per resolution, stored stacked as ``(N, D)``.

    Holds the parameters and running statistics that :func:`branch_bn_conv` uses in training and
    :meth:`fold` turns into the deploy form's affine map. On the CPU it also keeps the workspace of
    the fused step's saved branches (:class:`BranchWorkspace`); elsewhere each step allocates anew.
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
        self.workspace = BranchWorkspace()

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """As ``nn.BatchNorm`` after one batch of ``count`` values per channel: running averages of the
        batch ``mean`` and unbiased variance (``var`` is biased) with ``momentum``, or cumulative ones
        for ``momentum=None``."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * (count / (count - 1))).to(self.running_var.dtype), factor)

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-branch ``(scale, shift)`` of the eval-mode affine map, Eq. 18."""
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def train(self, mode: bool = True) -> BranchBatchNorm:
        """As ``nn.Module.train``; switching to eval frees the workspace of the training step's branches."""
        if not mode:
            self.workspace.release()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.workspace.release()  # moved or cast: the held storage no longer matches
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"num_branches={self.num_branches}, dim={self.dim}, eps={self.eps}, momentum={self.momentum}"
