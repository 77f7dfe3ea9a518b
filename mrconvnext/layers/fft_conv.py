"""Depthwise long convolution with FFTs in O(L log L) (MRConv paper, Section 3.4).

Kernel layout
-------------
A *causal* kernel ``k`` of shape ``(D, K)`` applies ``k[:, j]`` at lag ``j``::

    y[t] = sum_{j=0}^{K-1} k[j] * u[t - j]                       (lags 0 .. K-1)

A *bidirectional* kernel has shape ``(2, D, K)``: ``k[0]`` is the causal kernel above and
``k[1]`` is the anti-causal kernel, applied at the negative lags ``-1 .. -K`` (the S4
convention; lag 0 belongs to the causal half only)::

    y[t] = sum_j k[0, j] * u[t - j] + sum_j k[1, j] * u[t + 1 + j]

Inputs outside ``[0, L)`` are zero. A kernel longer than the input is cut (taps beyond lag
``L - 1`` never reach an output); a shorter one is implicitly zero-padded.

Primitives
----------
Kernels are embedded in real circular buffers of length ``n`` (:func:`kernel_buffer`,
:func:`fft_length` picks ``n`` so that wrap-around cannot reach an output). With ``U = rfft(u)`` and
``K = rfft(kb)``, :func:`conv_buffer` computes ``y = irfft(U K)[:L] + b`` with a hand-written
backward: ``du = irfft(DY conj(K))[:L]``, ``dkb = irfft(sum_b conj(U_b) DY_b)`` (one FFT of ``dy``,
one inverse, one small inverse). Every op is independent per channel, so on the CPU the loops
walk over blocks of channels whose spectra fit in the L2 cache the OS reports (:func:`channel_chunk`) and pad
through one staging buffer (:class:`PaddedRfft`). :func:`toeplitz_kernel` and
:func:`fft_conv_spectrum` serve a fixed kernel from a cached matrix or spectrum. Half-precision
inputs are computed in float32 (:func:`full_precision`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "fft_conv",
    "fft_length",
    "full_precision",
    "no_autocast",
    "kernel_buffer",
    "kernel_buffers",
    "kernel_spectrum",
    "conv_buffer",
    "fft_conv_spectrum",
    "toeplitz_kernel",
    "next_fast_length",
    "channel_chunk",
    "cpu_cache",
    "PaddedRfft",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
_UNREPORTED_CACHE = (1 << 20, 64)  # L2 bytes and line bytes where the OS reports none


@functools.cache
def cpu_cache() -> tuple[int, int]:
    """``(bytes, line bytes)`` of one core's L2 cache as the OS reports it (Linux sysfs); 1 MiB and 64 B if it does
    not. The CPU loops size their channel blocks from it."""
    try:
        for index in sorted(_CACHE_DIR.glob("index*")):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                line = int((index / "coherency_line_size").read_text())
                return int(size.rstrip("KM")) * scale, line
    except (OSError, ValueError):
        pass
    return _UNREPORTED_CACHE


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device``; nothing to switch off where it has none (``meta``)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def full_precision(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` computed in float32 for half-precision ``x`` and with autocast off; returned in ``x``'s dtype.

    ``fn`` gets ``x`` in the compute dtype and casts its other operands to it. FFTs are never run
    in half precision: cuFFT's only takes power-of-two sizes and long sums lose accuracy.
    """
    with no_autocast(x.device):
        return fn(x.to(torch.float32 if x.dtype in _HALF_DTYPES else x.dtype)).to(x.dtype)


def next_fast_length(n: int) -> int:
    """Smallest integer >= ``n`` whose prime factors are 2, 3 and 5 (fast for pocketfft and cuFFT)."""
    # memoised in eager mode; torch.compile traces the plain function (it warns on lru_cache)
    return _fast_length(n) if torch.compiler.is_compiling() else _cached_fast_length(n)


def _fast_length(n: int) -> int:
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


_cached_fast_length = functools.lru_cache(maxsize=4096)(_fast_length)


def fft_length(seq_len: int, kernel_len: int, bidirectional: bool) -> int:
    """FFT length for which circular wrap-around cannot reach outputs ``[0, seq_len)``.

    Causal taps reach lags ``0 .. Kc-1`` and anti-causal ones ``-1 .. -Ka`` (both cut to the
    input). Positive lags up to ``L-1`` must not meet the anti-causal block at the end of the
    buffer (``n >= L + Ka``) and negative lags down to ``-(L-1)`` must not meet the causal
    block (``n >= L + Kc - 1``).
    """
    causal_len = min(kernel_len, seq_len)
    anticausal_len = min(kernel_len, seq_len - 1) if bidirectional else 0
    return next_fast_length(seq_len + max(anticausal_len, causal_len - 1))


def _check_kernel(u: torch.Tensor, k: torch.Tensor, bidirectional: bool) -> None:
    if u.ndim != 3:
        raise ValueError(f"fft_conv expects u of shape (B, D, L), got shape {tuple(u.shape)}")
    expected_ndim = 3 if bidirectional else 2
    if k.ndim != expected_ndim or k.shape[-2] != u.shape[1] or (bidirectional and k.shape[0] != 2):
        layout = "(2, D, K)" if bidirectional else "(D, K)"
        raise ValueError(
            f"fft_conv expects a {'bidirectional' if bidirectional else 'causal'} kernel of shape {layout} "
            f"with D={u.shape[1]}, got shape {tuple(k.shape)}"
        )
    if not (u.is_floating_point() and k.is_floating_point()):
        raise TypeError(f"fft_conv expects floating-point tensors, got u: {u.dtype}, k: {k.dtype}")


def _buffer_pieces(k: torch.Tensor, seq_len: int, n: int, bidirectional: bool) -> list[torch.Tensor]:
    """``[causal taps, zero gap, flipped anti-causal taps]``, whose concatenation is the buffer.

    Built without padding or summing full-length tensors: their backward passes (and those of
    ``select``/slices that cover everything) would zero-fill full-size gradients.
    """
    if bidirectional:
        causal, anticausal = k.unbind(-3)
        if anticausal.shape[-1] > seq_len - 1:
            anticausal = anticausal[..., : max(seq_len - 1, 0)]
        anticausal = anticausal.flip(-1)
    else:
        causal, anticausal = k, k[..., :0]
    if causal.shape[-1] > seq_len:
        causal = causal[..., :seq_len]
    gap = n - causal.shape[-1] - anticausal.shape[-1]
    if gap < 0:
        raise ValueError(
            f"FFT length n={n} is too short for {causal.shape[-1]} causal and {anticausal.shape[-1]} anti-causal "
            f"taps; use fft_length()"
        )
    return [causal, causal.new_zeros(*causal.shape[:-1], gap), anticausal]


def kernel_buffer(k: torch.Tensor, seq_len: int, n: int, bidirectional: bool) -> torch.Tensor:
    """Kernels embedded in a real circular buffer of length ``n``: ``(*, D, n)``.

    ``k`` is ``(*, D, K)`` (causal) or ``(*, 2, D, K)`` (bidirectional, see module docstring).
    The causal half sits at positions ``0 .. Kc-1``; the anti-causal half is flipped into the
    last ``Ka`` positions so that ``k[1, j]`` lands on circular lag ``-(j + 1)``.
    """
    return torch.cat(_buffer_pieces(k, seq_len, n, bidirectional), dim=-1)


def kernel_buffers(kernels: list[torch.Tensor], seq_len: int, n: int, bidirectional: bool) -> torch.Tensor:
    """:func:`kernel_buffer` of sub-kernels of different lengths, stacked: ``(N, D, n)``.

    ``kernels[i]`` is ``(D, K_i)`` or ``(2, D, K_i)``. Built with one concatenation of the
    actual taps and zero gaps (no padding of every sub-kernel to the longest one), so the
    cost and the backward pass scale with ``sum_i K_i``, not ``N * max K_i``. The result is a
    strided view; its rows are contiguous.
    """
    pieces = [piece for k in kernels for piece in _buffer_pieces(k, seq_len, n, bidirectional)]
    dim = pieces[0].shape[0]
    return torch.cat(pieces, dim=-1).view(dim, len(kernels), n).transpose(0, 1)


def channel_chunk(x: torch.Tensor, n: int) -> int:
    """Channels per block of ``x`` ``(B, D, L)`` so that ``B * chunk * n`` real values fill about one L2 cache.

    With channels adjacent in memory (a channels-last map flattened by ``MRConv2d``) a block
    spans at least one cache line of channels, or every block would pull in whole lines to use
    a few values of each. On the CPU only: a GPU wants the whole tensor in one launch.
    """
    batch, dim = x.shape[0], x.shape[1]
    if x.device.type != "cpu":
        return dim
    cache_bytes, line_bytes = cpu_cache()
    chunk = cache_bytes // max(1, batch * n * x.element_size())
    if x.stride(1) == 1 and dim > 1:
        chunk = max(chunk, line_bytes // x.element_size())
    return max(1, min(dim, chunk))


class PaddedRfft:
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


class _ConvBuffer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, kb, bias):
        batch, dim, seq_len = u.shape
        n = kb.shape[-1]
        k_f = torch.fft.rfft(kb, n=n)
        u_f = u.new_empty(batch, dim, n // 2 + 1, dtype=k_f.dtype)
        y = u.new_empty(batch, dim, seq_len)
        step = channel_chunk(u, n)
        rfft = PaddedRfft(u, batch, step, n)
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
        rfft = PaddedRfft(grad_y, batch, step, n)
        for start in range(0, dim, step):
            block = slice(start, start + step)
            dy_f = rfft(grad_y[:, block])
            grad_kb_f[block] = (u_f[:, block].conj_physical() * dy_f).sum(0)
            if grad_u is not None:
                grad_u[:, block] = torch.fft.irfft(dy_f.mul_(k_f[block].conj_physical()), n=n)[..., :seq_len]
        grad_kb = torch.fft.irfft(grad_kb_f, n=n) if ctx.needs_input_grad[1] else None
        grad_bias = grad_y.sum((0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_u, grad_kb, grad_bias


def conv_buffer(u: torch.Tensor, kb: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise convolution of ``u`` ``(B, D, L)`` with circular kernel buffers ``kb`` ``(D, n)``, plus ``bias``.

    ``n`` must be large enough that wrap-around does not reach ``[0, L)`` (see ``fft_length``).
    The bias rides in the DC bin (``n * b``), which saves a pass over the output.
    """
    return _ConvBuffer.apply(u, kb, bias)


def kernel_spectrum(k: torch.Tensor, seq_len: int, n: int, bidirectional: bool) -> torch.Tensor:
    """Real FFT (length ``n``) of :func:`kernel_buffer`: a complex tensor ``(*, D, n // 2 + 1)``."""
    return torch.fft.rfft(kernel_buffer(k, seq_len, n, bidirectional), n=n)


def fft_conv_spectrum(u: torch.Tensor, k_f: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Convolve ``u`` ``(B, D, L)`` with a kernel given by its length-``n`` spectrum ``(D, n//2+1)``.

    Runs over blocks of channels that fit in cache, zero-padded through one staging buffer. An
    optional per-channel ``bias`` ``(D,)`` is added in the frequency domain: a constant over the
    whole circular buffer is ``n * bias`` in the DC bin, which saves a pass over the output.
    """
    batch, dim, seq_len = u.shape
    y = u.new_empty(batch, dim, seq_len)
    step = channel_chunk(u, n)
    rfft = PaddedRfft(u, batch, step, n)
    for start in range(0, dim, step):
        block = slice(start, start + step)
        y_f = rfft(u[:, block]).mul_(k_f[block])
        if bias is not None:
            y_f[..., 0] += bias[block] * n
        y[:, block] = torch.fft.irfft(y_f, n=n)[..., :seq_len]
    return y


def toeplitz_kernel(k: torch.Tensor, seq_len: int, bidirectional: bool) -> torch.Tensor:
    """Dense Toeplitz matrices ``T`` ``(D, L, L)`` with ``y[b, d] = u[b, d] @ T[d]`` (direct convolution).

    Built from the circular buffer of length ``2L - 1`` (no wrap-around), rolled so that
    position ``p`` holds lag ``p - (L - 1)``; ``T[d, s, t]`` is the tap at lag ``t - s``.
    Costs ``D L^2`` multiply-adds per sample: cheaper than two FFTs for short sequences.
    """
    buffer = kernel_buffer(k, seq_len, 2 * seq_len - 1, bidirectional).roll(seq_len - 1, -1)
    return buffer.unfold(-1, seq_len, 1).flip(-2).contiguous()


def fft_conv(u: torch.Tensor, k: torch.Tensor, bidirectional: bool = False) -> torch.Tensor:
    """Depthwise long convolution ``y = k * u`` computed with real FFTs.

    Args:
        u: input ``(B, D, L)``.
        k: kernel ``(D, K)`` if causal, ``(2, D, K)`` if ``bidirectional`` (see module docstring).
        bidirectional: whether ``k`` carries an anti-causal half.

    Returns ``(B, D, L)`` in the dtype of ``u``. Half-precision inputs (and autocast regions)
    are computed in float32, since cuFFT's half precision only takes power-of-two sizes and
    long sums lose accuracy.
    """
    _check_kernel(u, k, bidirectional)
    seq_len = u.shape[-1]
    n = fft_length(seq_len, k.shape[-1], bidirectional)
    return full_precision(lambda x: conv_buffer(x, kernel_buffer(k.to(x.dtype), seq_len, n, bidirectional)), u)
