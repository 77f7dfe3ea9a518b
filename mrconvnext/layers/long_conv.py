"""A deploy-form MRConv as one long depthwise convolution in export-friendly ops (paper Eq. 13).

The eager deploy form (:mod:`~mrconvnext.layers.deploy_form`) caches spectra in Python and sizes channel blocks
from the batch, which neither exporter can trace, and the TorchScript-based ONNX exporter has no FFT at all.
:class:`LongConv` is the same convolution at the layer's planned length ``L``, its merged kernel (Eqs. 8, 13,
18) stored as a constant in one of three exact forms (all float32, within ~1e-6 of a float64 direct
convolution):

* ``'toeplitz'``: dense Toeplitz matrices ``(D, L, L)``, one batched MatMul (``D L^2`` MACs/sample);
* ``'matmul'``: the circular convolution of length ``n = n1 n2`` through a DFT factored as in
  Cooley-Tukey's four-step FFT, each step a MatMul with a small constant cosine/sine matrix shared
  by all channels (``~4 n L / n1 + 8 n n1`` MACs per channel), and the kernel's spectrum;
* ``'dft'``: ONNX's ``DFT`` op (opset 17+, from ``torch.fft.rfft``/``irfft`` through the dynamo-based
  ``torch.onnx.export``) at a power-of-two length: onnxruntime has a radix-2 FFT for powers of two
  only (other lengths take an O(n^2) DFT that also lost float32 accuracy, 4e-4 at n = 6272).

onnxruntime 1.32 (CPU, 1 thread; ``benchmarks/benchmark.py --targets 6 --threads 1``) ran the
MatMul DFT 1.5-6x faster than its own DFT op at every MRConvNeXt-T and LRA shape measured, and the
Toeplitz MatMul faster still for the short maps (L = 49: 10x; L = 196: 4x at batch 8, slower at
batch 1) but slower from L = 784 on; its constants grow as ``D L^2`` (59 MB per MRConvNeXt-T stage-3
layer, 530 MB for the stage). ``method='auto'`` therefore takes the Toeplitz form up to
``L =`` :data:`ONNX_TOEPLITZ_MAX_LEN` (and while its constant stays under :data:`TOEPLITZ_MAX_BYTES` per
layer), the MatMul DFT beyond.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .deploy_form import power_of_two_length, spectral_conv
from .mrconv import MRConv, MRConv2d

__all__ = ["LONG_CONV_METHODS", "ONNX_TOEPLITZ_MAX_LEN", "TOEPLITZ_MAX_BYTES", "LongConv"]

LONG_CONV_METHODS = ("auto", "toeplitz", "matmul", "dft")
ONNX_TOEPLITZ_MAX_LEN = 128  # measured in onnxruntime, see the module docstring
TOEPLITZ_MAX_BYTES = 2**26  # 64 MiB of Toeplitz constants per layer


def _factor_length(seq_len: int, causal_taps: int, anticausal_taps: int) -> tuple[int, int]:
    """``(n1, n2)`` for the factored DFT of length ``n = n1 n2`` without wrap-around onto ``[0, L)``.

    Costs ``4 n ceil(L / n1) + 8 n n1`` MACs per row (see :meth:`LongConv._conv_matmul`): ``n1`` is the
    power of two nearest ``sqrt(L / 2)``, ``n2`` the fewest rows of ``n1`` that cover the length needed.
    """
    need = seq_len + max(anticausal_taps, causal_taps - 1)
    n1 = 1 << max(0, round(math.log2(max(seq_len / 2, 1)) / 2))
    return n1, -(-need // n1)


def _complex_matrix(real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
    """``[[Re, Im], [-Im, Re]]``: right-multiplying ``[x_re | x_im]`` by it multiplies ``x`` by ``Re + i Im``."""
    return torch.cat([torch.cat([real, imag], 1), torch.cat([-imag, real], 1)], 0)


@register_notrace_module  # a leaf of timm's FX traces: its length check branches on the input shape
class LongConv(nn.Module):
    """A deploy-form MRConv at its planned length ``L`` in export-friendly ops.

    ``kernel`` has :func:`mrconvnext.layers.fft_conv` layout: ``(D, K)`` causal (lags ``0 .. K-1``) or
    ``(2, D, K)`` bidirectional (``kernel[1]`` at lags ``-1 .. -K``); ``y = k * u + bias``.
    ``image=True`` takes ``(B, D, H, W)`` maps with ``H * W = L`` (flattened row-major, as MRConv2d).
    """

    def __init__(
        self,
        kernel: torch.Tensor,
        bias: torch.Tensor,
        seq_len: int,
        bidirectional: bool,
        image: bool = False,
        method: str = "auto",
    ) -> None:
        super().__init__()
        if method not in LONG_CONV_METHODS:
            raise ValueError(f"unknown long-convolution method {method!r}; expected one of {list(LONG_CONV_METHODS)}")
        self.seq_len = seq_len
        self.image = image
        kernel = kernel.detach().double()
        dim = kernel.shape[-2]
        toeplitz_bytes = 4 * dim * seq_len**2
        if method == "auto":
            method = (
                "toeplitz" if seq_len <= ONNX_TOEPLITZ_MAX_LEN and toeplitz_bytes <= TOEPLITZ_MAX_BYTES else "matmul"
            )
        elif method == "toeplitz" and toeplitz_bytes > 16 * TOEPLITZ_MAX_BYTES:
            raise ValueError(
                f"Toeplitz form of a layer with D={dim}, L={seq_len} needs {toeplitz_bytes / 2**30:.1f} GiB of "
                f"constants (limit {16 * TOEPLITZ_MAX_BYTES / 2**30:.0f} GiB); use method='matmul' or 'dft'"
            )
        self.method = method
        causal = kernel[0] if bidirectional else kernel
        anticausal = kernel[1, :, : seq_len - 1] if bidirectional else kernel[:, :0]
        causal = causal[:, :seq_len]
        self.register_buffer("bias", bias.detach().float().reshape(dim, 1))
        if self.method == "toeplitz":
            # taps by lag -(L-1) .. L-1; T[d, s, t] = tap at lag t - s, so y[b, d] = u[b, d] @ T[d]
            taps = kernel.new_zeros(dim, 2 * seq_len - 1)
            taps[:, seq_len - 1 : seq_len - 1 + causal.shape[1]] = causal
            taps[:, seq_len - 1 - anticausal.shape[1] : seq_len - 1] = anticausal.flip(-1)
            lags = seq_len - 1 + torch.arange(seq_len)[None, :] - torch.arange(seq_len)[:, None]
            self.register_buffer("toeplitz", taps[:, lags].float())
            return
        if self.method == "dft":
            self.n = power_of_two_length(seq_len, causal.shape[1], anticausal.shape[1])
        else:
            self.n1, self.n2 = _factor_length(seq_len, causal.shape[1], anticausal.shape[1])
            self.n = self.n1 * self.n2
        # circular buffer: causal taps at 0 .. Kc-1, anti-causal ones flipped into the last Ka positions
        buffer = kernel.new_zeros(dim, self.n)
        buffer[:, : causal.shape[1]] = causal
        buffer[:, self.n - anticausal.shape[1] :] = anticausal.flip(-1)
        if self.method == "dft":
            spectrum = torch.fft.rfft(buffer)
            self.register_buffer("spectrum_real", spectrum.real.float())
            self.register_buffer("spectrum_imag", spectrum.imag.float())
        else:
            self._init_factored_dft(torch.fft.fft(buffer))

    def _init_factored_dft(self, spectrum: torch.Tensor) -> None:
        """Constants of :meth:`_conv_matmul`: ``t = t1 + n1 t2``, ``f = f2 + n2 f1``, all in float64 first."""
        n, n1, n2 = self.n, self.n1, self.n2
        rows = -(-self.seq_len // n1)  # T2: rows of n1 samples that hold the input (the rest is zero padding)
        angle = -2 * math.pi / n

        def unit(exponent: torch.Tensor, period: int) -> tuple[torch.Tensor, torch.Tensor]:
            phase = angle * n / period * (exponent % period)
            return torch.cos(phase), torch.sin(phase)

        f2, t1, t2, f1 = (torch.arange(size, dtype=torch.float64) for size in (n2, n1, rows, n1))
        w2 = unit(f2[:, None] * t2[None, :], n2)  # (n2, T2): inner DFT over t2
        self.register_buffer("inner", torch.cat(w2, 0).float())  # (2 n2, T2): real rows, then imaginary rows
        self.register_buffer("twiddle", torch.stack(unit(f2[:, None] * t1[None, :], n)).float())  # (2, n2, n1)
        w1 = unit(t1[:, None] * f1[None, :], n1)  # (n1, n1): outer DFT over t1
        self.register_buffer("outer", _complex_matrix(*w1).float())
        self.register_buffer("outer_inverse", _complex_matrix(w1[0], -w1[1]).float())
        # inverse inner DFT, real part only, rows t2 < T2, with the 1/n of the inverse transform
        self.register_buffer("inner_inverse", (torch.cat([w2[0].t(), w2[1].t()], 1) / n).float())  # (T2, 2 n2)
        spectrum = spectrum.view(-1, n1, n2).transpose(1, 2)  # [d, f2, f1] = spectrum[d, f2 + n2 f1]
        self.register_buffer("spectrum", torch.stack([spectrum.real, spectrum.imag]).float())  # (2, D, n2, n1)

    @classmethod
    def from_mrconv(cls, layer: MRConv, method: str = "auto") -> LongConv:
        """From a deploy-form layer, or a train-form one in eval mode (its merged kernel, Eqs. 8, 13, 18)."""
        if layer.training and not layer.deploy:
            raise ValueError("a train-form MRConv exports in eval mode only (its BatchNorms use running statistics)")
        kernel, bias = layer.merged_kernel()
        return cls(kernel, bias, layer.seq_len, layer.bidirectional, isinstance(layer, MRConv2d), method)

    def forward(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        if rate != 1:
            raise ValueError(f"the exported graph is fixed to the training sampling rate; got rate={rate}")
        shape = x.shape
        if self.image:
            x = x.flatten(2)
        if x.shape[-1] != self.seq_len:
            raise ValueError(
                f"the exported graph is built for the planned length L={self.seq_len} (kernels are fixed to "
                f"their training length); got an input of shape {tuple(shape)}"
            )
        if self.method == "toeplitz":
            y = torch.matmul(x.transpose(0, 1), self.toeplitz).transpose(0, 1)
        elif self.method == "matmul":
            y = self._conv_matmul(x)
        else:
            y = spectral_conv(x, self.spectrum_real, self.spectrum_imag, self.n)
        return (y + self.bias).reshape(shape)

    def _conv_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Circular convolution of length ``n = n1 n2`` by a factored DFT (Cooley-Tukey's four steps) as MatMuls.

        Complex values travel as ``[real | imaginary]`` halves of the last axis. Forward: DFT over ``t2``
        (only the ``T2`` rows holding the input), twiddles, DFT over ``t1``; product with the kernel's
        spectrum; inverse in reverse order, keeping the real part of the ``T2`` output rows.
        """
        n1, n2 = self.n1, self.n2
        rows = self.inner.shape[1]
        batch, dim = x.shape[0], x.shape[1]
        u = F.pad(x, (0, rows * n1 - self.seq_len)).reshape(batch, dim, rows, n1)
        a = torch.matmul(self.inner, u)  # (B, D, 2 n2, n1)
        re, im = a[..., :n2, :], a[..., n2:, :]
        tw_re, tw_im = self.twiddle[0], self.twiddle[1]
        a = torch.cat([re * tw_re - im * tw_im, re * tw_im + im * tw_re], -1)  # (B, D, n2, 2 n1)
        spec = torch.matmul(a, self.outer)
        re, im = spec[..., :n1], spec[..., n1:]
        k_re, k_im = self.spectrum[0], self.spectrum[1]
        spec = torch.cat([re * k_re - im * k_im, re * k_im + im * k_re], -1)
        b = torch.matmul(spec, self.outer_inverse)
        re, im = b[..., :n1], b[..., n1:]
        b = torch.cat([re * tw_re + im * tw_im, im * tw_re - re * tw_im], -2)  # (B, D, 2 n2, n1)
        y = torch.matmul(self.inner_inverse, b)  # (B, D, T2, n1)
        return y.reshape(batch, dim, rows * n1)[..., : self.seq_len]

    def extra_repr(self) -> str:
        size = f", n={self.n}" if self.method != "toeplitz" else ""
        return f"seq_len={self.seq_len}, method={self.method!r}{size}, image={self.image}"
