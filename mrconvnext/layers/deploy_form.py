"""The deploy form of MRConv: one long kernel and a bias per channel (paper Eq. 13)::

    y = k_rep * u + b

With gradients (fine-tuning a deployed layer) the kernel goes through the differentiable
:func:`~mrconvnext.layers.fft_conv.conv_buffer`. For inference the kernel is fixed, so its spectrum is
cached per layer, keyed by sequence length, device and dtype and checked against the parameters'
version counters and storage (in-place updates, ``load_state_dict`` and moves invalidate it); the
bias rides in the FFT's DC bin. On the CPU a layer whose Toeplitz matrices ``(D, L, L)`` stay small may use them
instead (one batched matmul): the first call of each input shape times both forms on that input and keeps the
faster for the rest of the process (:func:`toeplitz_is_faster`), so the choice follows the machine it runs on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .fft_conv import (
    conv_buffer,
    fft_conv_spectrum,
    fft_length,
    full_precision,
    kernel_buffer,
    kernel_spectrum,
    toeplitz_kernel,
)

__all__ = ["TOEPLITZ_MAX_BYTES", "deploy_conv", "fastest", "toeplitz_is_faster"]

TOEPLITZ_MAX_BYTES = 1 << 26  # a layer's cached Toeplitz matrices: a memory bound, beyond it the FFT is used
_CACHE_SIZE = 8
_FASTER: dict[tuple, bool] = {}  # input shape, kernel length, dtype, threads -> whether the Toeplitz form won


def fastest(fn: Callable[[], object], repeats: int = 7) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after one warm-up call (the least disturbed by load)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def toeplitz_is_faster(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bidirectional: bool) -> bool:
    """Whether the Toeplitz form beat the FFT when timed on the first input of this shape (CPU inference only).

    False (the FFT form) while ``torch.compile`` traces (a Python-side record would change its guards), on other
    devices and where the matrices would exceed :data:`TOEPLITZ_MAX_BYTES`.
    """
    batch, dim, seq_len = u.shape
    too_large = dim * seq_len**2 * u.element_size() > TOEPLITZ_MAX_BYTES
    if u.device.type != "cpu" or too_large or torch.compiler.is_compiling():
        return False
    key = (tuple(u.shape), weight.shape[-1], bidirectional, u.dtype, torch.get_num_threads())
    if key not in _FASTER:
        fixed, shift = weight.detach().to(u.dtype), bias.detach().to(u.dtype)
        n = fft_length(seq_len, weight.shape[-1], bidirectional)
        toeplitz, spectrum = (
            toeplitz_kernel(fixed, seq_len, bidirectional),
            kernel_spectrum(fixed, seq_len, n, bidirectional),
        )
        with torch.no_grad():
            direct = fastest(lambda: _toeplitz_conv(u, toeplitz, shift), repeats=2)
            fft = fastest(lambda: fft_conv_spectrum(u, spectrum, n, shift), repeats=2)
        _FASTER[key] = direct < fft
    return _FASTER[key]


def _toeplitz_conv(u: torch.Tensor, toeplitz: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # baddbmm over (D, B, L) needs unit-stride rows: with channels-last input it falls back to one matmul per channel
    rows = u if u.stride(-1) == 1 else u.contiguous()
    return torch.baddbmm(shift[:, None, None], rows.transpose(0, 1), toeplitz).transpose(0, 1)


def deploy_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bidirectional: bool, cache: dict
) -> torch.Tensor:
    """``weight * x + bias`` for ``x`` ``(B, D, L)``, ``weight`` in :func:`~mrconvnext.layers.fft_conv.fft_conv`'s layout.

    ``cache`` is the layer's own dict of inference kernels (spectra or Toeplitz matrices).
    """
    seq_len = x.shape[-1]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        n = fft_length(seq_len, weight.shape[-1], bidirectional)
        return full_precision(
            lambda u: conv_buffer(u, kernel_buffer(weight.to(u.dtype), seq_len, n, bidirectional), bias.to(u.dtype)),
            x,
        )
    return full_precision(lambda u: _cached_inference(u, weight, bias, bidirectional, cache), x)


def _cached_inference(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bidirectional: bool, cache: dict
) -> torch.Tensor:
    seq_len = u.shape[-1]
    direct = toeplitz_is_faster(u, weight, bias, bidirectional)
    n = fft_length(seq_len, weight.shape[-1], bidirectional)
    # under torch.compile the kernel is computed in the graph (a Python-side cache would invalidate the
    # compiled guards on every call); inference tensors have no version counter; meta tensors no storage
    cacheable = not (
        torch.compiler.is_compiling() or weight.is_inference() or bias.is_inference() or u.device.type == "meta"
    )
    key = (seq_len, direct, u.device, u.dtype)
    version = (weight._version, weight.data_ptr(), bias._version, bias.data_ptr()) if cacheable else None
    cached = cache.get(key) if cacheable else None
    if cached is None or cached[0] != version:
        fixed = weight.detach().to(u.dtype)
        if direct:
            kernel = toeplitz_kernel(fixed, seq_len, bidirectional)
        else:
            kernel = kernel_spectrum(fixed, seq_len, n, bidirectional)
        cached = (version, kernel)
        if cacheable:
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[key] = cached
    kernel = cached[1]
    shift = bias.detach().to(u.dtype)
    if direct:
        return _toeplitz_conv(u, kernel, shift)
    return fft_conv_spectrum(u, kernel, n, shift)
