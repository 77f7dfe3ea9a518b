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

Several processes (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, timm's ``--sync-bn``): the statistics
are those of the global batch, as ``nn.SyncBatchNorm``'s. :class:`BranchBatchNorm` is a ``_BatchNorm``, so
both converters replace it by an ``nn.SyncBatchNorm`` holding the same ``(N, D)`` tensors, and the fused step
reduces over its process group: the branch sums (from the spectrum of ``sum_b u_b``) and the count before the
branches are centred, their squared deviations after, then ``sum dy`` and ``sum dy c_hat_i`` in the backward
(two ``all_reduce`` each way). The output is then written in a second pass over the saved branches. The
gradients of ``gamma``, ``beta`` and ``alpha`` stay local sums, which data parallelism reduces, as in
``nn.SyncBatchNorm``. A single process takes the one-pass path above.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .fft_conv import PaddedRfft, channel_chunk

__all__ = [
    "BranchBatchNorm",
    "BranchWorkspace",
    "branch_bn_conv",
    "fold_batch_norm",
    "sync_group",
    "update_running_stats",
]


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


def sync_group(norm: nn.Module) -> dist.ProcessGroup | None:
    """The process group whose global batch gives ``norm``'s statistics: that of an ``nn.SyncBatchNorm`` (what
    ``convert_sync_batchnorm`` makes of a :class:`BranchBatchNorm`) spanning several processes; else None."""
    if not isinstance(norm, nn.SyncBatchNorm) or not dist.is_available() or not dist.is_initialized():
        return None
    group = norm.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _all_reduce(group: dist.ProcessGroup, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` summed over the processes of ``group``, in one ``all_reduce``."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def _combine(
    block: slice, branches: torch.Tensor, var: torch.Tensor, gamma, beta, alpha, eps: float, out: torch.Tensor
) -> None:
    """``sum_i s_i (c_i - mu_i) + sum_i alpha_i beta_i`` of the channels ``block`` into ``out`` ``(B, D, L)``:
    ``branches`` ``(N, B, D, L)`` centred, ``var`` and the parameters ``(N, D)``."""
    scale = alpha[:, block] * gamma[:, block] * torch.rsqrt(var[:, block] + eps)  # s_i
    shift = (alpha[:, block] * beta[:, block]).sum(0)  # sum_i s_i mu_i cancels against the centring
    out = out[:, block]
    torch.addcmul(shift[:, None], branches[0, :, block], scale[0, :, None], out=out)
    for i in range(1, branches.shape[0]):
        out.addcmul_(branches[i, :, block], scale[i, :, None])


class _BranchBatchNormConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, kb, gamma, beta, alpha, eps, workspace, group):
        batch, dim, seq_len = u.shape
        num_branches, n = kb.shape[0], kb.shape[-1]
        count = batch * seq_len
        if count < 2 and group is None:
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
        if group is not None:  # the global means first: the branch sums are linear in sum_b u_b
            sums = (torch.fft.rfft(u.sum(0), n=n) * window_w * k_f).real.sum(-1)  # (N, D)
            sums, count = _all_reduce(group, sums, u.new_full((1,), count))
            mean = sums / count
        for start in range(0, dim, step):
            block = slice(start, start + step)
            block_f = rfft(u[:, block])
            if group is None:
                mean[:, block] = (block_f.sum(0) * window_w * k_f[:, block]).real.sum(-1) / count
            for i in range(num_branches):
                c = torch.fft.irfft(block_f * k_f[i, block], n=n)[..., :seq_len]
                centred = torch.sub(c, mean[i, block, None], out=branches[i, :, block])
                var[i, block] = torch.linalg.vecdot(centred, centred).sum(0)  # two-pass, stable
            if group is None:  # one pass: the block's output while its branches are in cache
                var[:, block] /= count
                _combine(block, branches, var, gamma, beta, alpha, eps, y)
        if group is not None:
            (var,) = _all_reduce(group, var)
            var /= count
            for start in range(0, dim, step):
                block = slice(start, start + step)
                _combine(block, branches, var, gamma, beta, alpha, eps, y)
        unbiased = var * (count / (count - 1))
        ctx.mark_non_differentiable(mean, unbiased)
        # u, not its spectrum (twice the memory): the backward recomputes one rfft per block
        ctx.save_for_backward(u, k_f, branches, var, gamma, beta, alpha)
        ctx.n, ctx.seq_len, ctx.eps, ctx.group, ctx.count = n, seq_len, eps, group, count
        return y, mean, unbiased

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):
        u, k_f, branches, var, gamma, beta, alpha = ctx.saved_tensors
        n, seq_len, group, count = ctx.n, ctx.seq_len, ctx.group, ctx.count
        num_branches, batch, dim, _ = branches.shape
        inv_std = torch.rsqrt(var + ctx.eps)
        scale = alpha * gamma * inv_std
        window_f = torch.fft.rfft(grad_y.new_ones(seq_len), n=n)  # spectrum of 1_[0, L)
        weights = _parseval_weights(n, grad_y.dtype, grad_y.device)
        step = channel_chunk(grad_y, n)
        sum_dy = grad_y.sum((0, 2))  # (D,)
        dot_hat = torch.empty_like(var)  # sum_{b,t} dy c_hat_i, (N, D)
        if group is not None:
            # local sums for the parameters' gradients (data parallelism adds them up), global ones for dL/du
            for start in range(0, dim, step):
                block = slice(start, start + step)
                for i in range(num_branches):
                    dot_hat[i, block] = torch.linalg.vecdot(branches[i, :, block], grad_y[:, block]).sum(0)
            dot_hat *= inv_std
            local_sum_dy, local_dot_hat = sum_dy, dot_hat
            sum_dy, dot_hat = _all_reduce(group, sum_dy, dot_hat)
        grad_u = grad_y.new_empty(batch, dim, seq_len) if ctx.needs_input_grad[0] else None
        grad_kb_f = torch.empty_like(k_f)
        rfft = PaddedRfft(grad_y, batch, step, n)
        for start in range(0, dim, step):
            block = slice(start, start + step)
            dy_f = rfft(grad_y[:, block])  # (B, c, F)
            dy_f.sub_(window_f * (sum_dy[block, None] / count))  # spectrum of dy - mean(dy) on [0, L)
            u_conj = rfft(u[:, block]).conj_physical_()
            k_conj = k_f[:, block].conj_physical()  # (N, c, F)
            cross = (u_conj * dy_f).sum(0)  # sum_b conj(U_b) DY_b, (c, F)
            if group is None:
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
        if group is not None:
            sum_dy, dot_hat = local_sum_dy, local_dot_hat
        return grad_u, grad_kb, alpha * dot_hat, alpha * sum_dy, gamma * dot_hat + beta * sum_dy, None, None, None


def branch_bn_conv(
    u: torch.Tensor,
    kb: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    eps: float,
    workspace: BranchWorkspace | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode Eq. 12: ``sum_i alpha_i BN_i(kb_i * u)`` with batch statistics.

    ``u``: ``(B, D, L)``; ``kb``: circular kernel buffers ``(N, D, n)``; ``gamma, beta, alpha``:
    ``(N, D)``. ``workspace`` lends the storage for the saved branch outputs (see
    :class:`BranchWorkspace`); with ``group`` (:func:`sync_group`) the statistics are those of the batches of all
    its processes together. Returns ``y`` ``(B, D, L)`` and the branches' batch mean and unbiased variance
    ``(N, D)`` (constants for autograd) for :func:`update_running_stats`.
    """
    return _BranchBatchNormConv.apply(u, kb, gamma, beta, alpha, eps, workspace, group)


@torch.no_grad()
def update_running_stats(norm: _BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    """As ``nn.BatchNorm`` after one batch: running averages of the batch ``mean`` and unbiased ``var`` with
    ``norm.momentum``, or cumulative ones for ``momentum=None``. ``norm``: a :class:`BranchBatchNorm` or the
    ``nn.SyncBatchNorm`` it was converted to."""
    norm.num_batches_tracked.add_(1)
    factor = norm.momentum if norm.momentum is not None else 1.0 / int(norm.num_batches_tracked)
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
    norm.running_var.lerp_(var.to(norm.running_var.dtype), factor)


def fold_batch_norm(norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-branch ``(scale, shift)`` of ``norm``'s eval-mode affine map, Eq. 18."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


class BranchBatchNorm(_BatchNorm):
    """``N`` independent BatchNorms over ``D`` channels, one per resolution, stored stacked as ``(N, D)``.

    Holds the parameters and running statistics that :func:`branch_bn_conv` uses in training and
    :func:`fold_batch_norm` turns into the deploy form's affine map; it has no forward of its own. A ``_BatchNorm``
    over ``num_features = D``, so that ``convert_sync_batchnorm`` (torch's, and timm's for ``--sync-bn``) turns it
    into an ``nn.SyncBatchNorm`` holding the same tensors, whose statistics the fused step then takes over all
    processes. On the CPU it also keeps the workspace of the fused step's saved branches
    (:class:`BranchWorkspace`); elsewhere each step allocates anew.
    """

    def __init__(self, num_branches: int, dim: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(dim, eps, momentum)
        self.num_branches = num_branches
        self.weight = nn.Parameter(self.weight.new_ones(num_branches, dim))
        self.bias = nn.Parameter(self.bias.new_zeros(num_branches, dim))
        self.running_mean = self.running_mean.new_zeros(num_branches, dim)
        self.running_var = self.running_var.new_ones(num_branches, dim)
        self.workspace = BranchWorkspace()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "BranchBatchNorm is applied by MRConv's fused training step (branch_bn_conv) and merged into its "
            "eval-mode kernel; it has no forward of its own"
        )

    def train(self, mode: bool = True) -> BranchBatchNorm:
        """As ``nn.Module.train``; switching to eval frees the workspace of the training step's branches."""
        if not mode:
            self.workspace.release()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.workspace.release()  # moved or cast: the held storage no longer matches
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"num_branches={self.num_branches}, dim={self.num_features}, eps={self.eps}, momentum={self.momentum}"
