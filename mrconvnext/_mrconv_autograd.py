"""Channel-chunked FFT convolutions with hand-written backward passes (MRConv paper, Sections 3.2, 3.4).

Notation: ``u`` is the input ``(B, D, L)``, ``kb`` circular kernel buffers of length ``n``
(:func:`~mrconvnext.fft_conv.kernel_buffer`), ``U = rfft(u)``, ``K = rfft(kb)``.

Every op here is independent per channel, so both functions walk over blocks of channels whose
spectra fit in the L2 cache: the elementwise products, reductions and FFTs of one block then
run from cache instead of streaming full ``(B, D, n)`` tensors through memory between calls.

``conv_buffer``: ``y = irfft(U K)[:L] + b``; backward ``du = irfft(DY conj(K))[:L]``,
``dkb = irfft(sum_b conj(U_b) DY_b)``: one FFT of ``dy``, one inverse, one small inverse.

``branch_bn_conv`` (train-form Eq. 12 with exact BatchNorm): branch outputs
``c_i = irfft(U K_i)[:L]`` and batch statistics ``mu_i, sigma_i`` over ``(B, L)`` make the
layer affine in the centred branch outputs::

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
and leave one small ``irfft`` of ``(N, D, n)`` without a batch factor.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["BranchWorkspace", "branch_bn_conv", "conv_buffer", "channel_chunk"]

_CHUNK_BYTES = 1 << 21  # one chunk's real rows (B, chunk, n) in float32: about the L2 cache of one core
_CACHE_LINE_BYTES = 64


def channel_chunk(x: torch.Tensor, n: int) -> int:
    """Channels per block of ``x`` ``(B, D, L)`` so that ``B * chunk * n`` real values take about ``_CHUNK_BYTES``.

    With channels adjacent in memory (a channels-last map flattened by ``MRConv2d``) a block
    spans at least one cache line of channels, or every block would pull in whole lines to use
    a few values of each. On the CPU only: a GPU wants the whole tensor in one launch.
    """
    batch, dim = x.shape[0], x.shape[1]
    if x.device.type != "cpu":
        return dim
    chunk = _CHUNK_BYTES // max(1, batch * n * x.element_size())
    if x.stride(1) == 1 and dim > 1:
        chunk = max(chunk, _CACHE_LINE_BYTES // x.element_size())
    return max(1, min(dim, chunk))


class _PaddedRfft:
    """``rfft(x, n)`` of channel blocks through one zero-padded staging buffer.

    ``torch.fft.rfft(x, n=n)`` allocates, zero-fills and copies a padded tensor per call; here
    the padding is written once and only the ``L`` taps of each block are copied in.
    """

    def __init__(self, like: torch.Tensor, batch: int, step: int, n: int) -> None:
        self.buffer = like.new_zeros(batch, step, n)
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.buffer[:, : x.shape[1]]
        rows[..., : x.shape[-1]].copy_(x)
        return torch.fft.rfft(rows, n=self.n)


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
    between ops, so the model's other ops fault more too (BENCHMARKS.md rows 20-21). The storage is
    reused only once no autograd graph holds it (its only reference is this workspace), so
    gradient accumulation, ``retain_graph`` or two forwards before one backward get new storage.
    Storage is per thread (``nn.DataParallel`` replicas share the layer object); copies and pickles
    of the layer start empty; :meth:`release` frees it (``MRConv.eval()`` does).
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


class _ConvBuffer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, kb, bias):
        batch, dim, seq_len = u.shape
        n = kb.shape[-1]
        k_f = torch.fft.rfft(kb, n=n)
        u_f = u.new_empty(batch, dim, n // 2 + 1, dtype=k_f.dtype)
        y = u.new_empty(batch, dim, seq_len)
        step = channel_chunk(u, n)
        rfft = _PaddedRfft(u, batch, step, n)
        for start in range(0, dim, step):
            block = slice(start, start + step)
            u_f[:, block] = block_f = rfft(u[:, block])
            y_f = block_f * k_f[block]
            if bias is not None:
                y_f[..., 0] += bias[block] * n
            y[:, block] = torch.fft.irfft(y_f, n=n)[..., :seq_len]
        ctx.save_for_backward(u_f, k_f)
        ctx.n, ctx.seq_len, ctx.has_bias = n, seq_len, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u_f, k_f = ctx.saved_tensors
        n, seq_len = ctx.n, ctx.seq_len
        batch, dim, _ = u_f.shape
        grad_u = grad_y.new_empty(batch, dim, seq_len) if ctx.needs_input_grad[0] else None
        grad_kb_f = torch.empty_like(k_f)
        step = channel_chunk(grad_y, n)
        rfft = _PaddedRfft(grad_y, batch, step, n)
        for start in range(0, dim, step):
            block = slice(start, start + step)
            dy_f = rfft(grad_y[:, block])
            grad_kb_f[block] = (u_f[:, block].conj_physical() * dy_f).sum(0)
            if grad_u is not None:
                grad_u[:, block] = torch.fft.irfft(dy_f.mul_(k_f[block].conj_physical()), n=n)[..., :seq_len]
        grad_kb = torch.fft.irfft(grad_kb_f, n=n) if ctx.needs_input_grad[1] else None
        grad_bias = grad_y.sum((0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_u, grad_kb, grad_bias


class _BranchBatchNormConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, kb, gamma, beta, alpha, running_mean, running_var, factor, eps, workspace):
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
        rfft = _PaddedRfft(u, batch, step, n)
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
            out = torch.addcmul(shift[:, None], branches[0, :, block], scale[0, :, None])
            for i in range(1, num_branches):
                out.addcmul_(branches[i, :, block], scale[i, :, None])
            y[:, block] = out
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), factor)
        # u, not its spectrum (twice the memory): the backward recomputes one rfft per block
        ctx.save_for_backward(u, k_f, branches, var, gamma, beta, alpha)
        ctx.n, ctx.seq_len, ctx.eps = n, seq_len, eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
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
        rfft = _PaddedRfft(grad_y, batch, step, n)
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
        return grad_u, grad_kb, alpha * dot_hat, alpha * sum_dy, gamma * dot_hat + beta * sum_dy, *[None] * 5


def conv_buffer(u: torch.Tensor, kb: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise convolution of ``u`` ``(B, D, L)`` with circular kernel buffers ``kb`` ``(D, n)``, plus ``bias``.

    ``n`` must be large enough that wrap-around does not reach ``[0, L)`` (see ``fft_length``).
    The bias rides in the DC bin (``n * b``), which saves a pass over the output.
    """
    return _ConvBuffer.apply(u, kb, bias)


def branch_bn_conv(
    u: torch.Tensor,
    kb: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    factor: float,
    eps: float,
    workspace: BranchWorkspace | None = None,
) -> torch.Tensor:
    """Training-mode Eq. 12: ``sum_i alpha_i BN_i(kb_i * u)`` with batch statistics.

    ``u``: ``(B, D, L)``; ``kb``: circular kernel buffers ``(N, D, n)``; ``gamma, beta, alpha``:
    ``(N, D)``. ``running_mean`` / ``running_var`` ``(N, D)`` are updated in place with
    momentum ``factor`` (unbiased variance, as ``F.batch_norm``). ``workspace`` lends the storage
    for the saved branch outputs (see :class:`BranchWorkspace`). Returns ``(B, D, L)``.
    """
    return _BranchBatchNormConv.apply(u, kb, gamma, beta, alpha, running_mean, running_var, factor, eps, workspace)
