"""The deploy form of MRConv: one long kernel and a bias per channel (paper Eq. 13)::

    y = k_rep * u + b

With gradients (fine-tuning a deployed layer) the kernel goes through the differentiable
:func:`~mrconvnext.layers.fft_conv.conv_buffer`. For inference the kernel is fixed, so its spectrum is
cached per layer, keyed by sequence length, device and dtype and checked against the parameters'
version counters and storage (in-place updates, ``load_state_dict`` and moves invalidate it); the
bias rides in the FFT's DC bin. On the CPU a layer whose Toeplitz matrices ``(D, L, L)`` stay small may use them
instead (one batched matmul): the first call of each input shape times both forms on that input and keeps the
faster for the rest of the process (:func:`toeplitz_is_faster`), so the choice follows the machine it runs on.

While ``torch.export`` traces (also the dynamo-based ONNX exporter, timm's ``onnx_export(..., use_dynamo=True)``)
MRConv takes :func:`export_conv` instead: the same convolution in ops both take, with no Python-side cache,
channel blocks or in-place spectrum updates.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .fft_conv import (
    conv_buffer,
    fft_conv_spectrum,
    fft_length,
    full_precision,
    kernel_buffer,
    kernel_spectrum,
    toeplitz_kernel,
)

__all__ = [
    "TOEPLITZ_MAX_BYTES",
    "deploy_conv",
    "export_conv",
    "fastest",
    "power_of_two_length",
    "spectral_conv",
    "toeplitz_is_faster",
]

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

    False (the FFT form) while ``torch.compile`` traces (a Python-side record would change its guards), while a
    dispatch mode such as ``FlopCounterMode`` watches the ops (its timings are the mode's, and what it counts
    stays the same on every machine), on other devices and where the matrices would exceed
    :data:`TOEPLITZ_MAX_BYTES`.
    """
    batch, dim, seq_len = u.shape
    too_large = dim * seq_len**2 * u.element_size() > TOEPLITZ_MAX_BYTES
    watched = _get_current_dispatch_mode() is not None
    if u.device.type != "cpu" or too_large or watched or torch.compiler.is_compiling():
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


def power_of_two_length(seq_len: int, causal_taps: int, anticausal_taps: int) -> int:
    """Power of two with no circular wrap-around onto outputs ``[0, L)`` (lags ``-Ka .. Kc-1``): onnxruntime has
    a radix-2 FFT for powers of two only (other lengths take an O(n^2) DFT that loses float32 accuracy)."""
    need = seq_len + max(anticausal_taps, causal_taps - 1)
    return 1 << (need - 1).bit_length()


def spectral_conv(x: torch.Tensor, spectrum_real: torch.Tensor, spectrum_imag: torch.Tensor, n: int) -> torch.Tensor:
    """``irfft(rfft(x, n) K, n)[..., :L]`` for ``x`` ``(B, D, L)`` and a kernel spectrum ``K`` ``(D, n // 2 + 1)``
    given by its real and imaginary parts: complex values only in and out of the FFTs, as ONNX's DFT op has them."""
    spectrum = torch.view_as_real(torch.fft.rfft(x, n=n))
    real, imag = spectrum[..., 0], spectrum[..., 1]
    product = torch.stack(
        [real * spectrum_real - imag * spectrum_imag, real * spectrum_imag + imag * spectrum_real], -1
    )
    return torch.fft.irfft(torch.view_as_complex(product), n=n)[..., : x.shape[-1]]


def export_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """:func:`deploy_conv` in ops that ``torch.export`` and the ONNX exporter take: power-of-two real FFTs of
    the whole tensor, the kernel's spectrum computed in the graph, the bias added to the output."""
    seq_len = x.shape[-1]
    causal = min(weight.shape[-1], seq_len)
    anticausal = min(weight.shape[-1], seq_len - 1) if bidirectional else 0
    n = power_of_two_length(seq_len, causal, anticausal)
    spectrum = torch.view_as_real(torch.fft.rfft(kernel_buffer(weight, seq_len, n, bidirectional), n=n))
    return spectral_conv(x, spectrum[..., 0], spectrum[..., 1], n) + bias[:, None]
