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
"""

from __future__ import annotations

import functools

import torch

from ._mrconv_autograd import _PaddedRfft, channel_chunk, conv_buffer

__all__ = [
    "fft_conv",
    "fft_length",
    "kernel_buffer",
    "kernel_buffers",
    "merge_kernels",
    "kernel_spectrum",
    "fft_conv_spectrum",
    "toeplitz_kernel",
    "next_fast_length",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


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


def merge_kernels(kernels: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[i] * ZeroPad(kernels[i])`` (Eq. 7) for kernels of non-decreasing length.

    ``kernels[i]``: ``(*, D, K_i)``; ``weights``: ``(N, *, D, 1)``-broadcastable. Summed segment by
    segment (taps ``[K_{j-1}, K_j)`` only get the kernels that reach them), costing ``sum_i K_i``.
    """
    lengths = [k.shape[-1] for k in kernels]
    if lengths != sorted(lengths):
        raise ValueError(f"merge_kernels expects kernels of non-decreasing length, got {lengths}")
    bounds = [0] + lengths
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    # split, not slicing: split's backward concatenates, slicing's zero-fills a full-size gradient per slice
    pieces = [k.split(sizes[: i + 1], dim=-1) for i, k in enumerate(kernels)]
    segments = [
        sum(weights[i] * pieces[i][j] for i in range(j, len(kernels))) for j, size in enumerate(sizes) if size > 0
    ]
    return torch.cat(segments, dim=-1)


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
    rfft = _PaddedRfft(u, batch, step, n)
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
    out_dtype = u.dtype
    compute_dtype = torch.float32 if out_dtype in _HALF_DTYPES else out_dtype
    seq_len = u.shape[-1]
    n = fft_length(seq_len, k.shape[-1], bidirectional)
    with torch.autocast(device_type=u.device.type, enabled=False):
        y = conv_buffer(u.to(compute_dtype), kernel_buffer(k.to(compute_dtype), seq_len, n, bidirectional))
    return y.to(out_dtype)
