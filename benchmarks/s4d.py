"""S4D's diagonal state-space convolution (Gu et al., 2022), the baseline of the sequence benchmark.

Follows ``s4d.py`` of state-spaces/s4 (the standalone S4D layer): a diagonal state matrix
``A = -exp(log_A_real) + i * A_imag`` with S4D-Lin initialisation (``A_n = -1/2 + i pi n``), ``N/2``
complex modes per channel, zero-order-hold discretisation with a learned step ``dt``, and the kernel

    K[h, l] = 2 Re( sum_n C[h, n] (exp(dt_h A[h, n]) - 1) / A[h, n] * exp(dt_h A[h, n] l) ),

recomputed on every forward (as ``s4d.py``; ``cache_kernel=True`` keeps its spectrum in eval mode) and
applied causally with FFTs of length ``2L``. ``S4DConv`` is the sequence
layer only; the benchmark puts it in place of MRConv inside the same S4 block (skip ``D``, GELU, Linear,
GLU), so both models share everything else.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class S4DConv(nn.Module):
    """Causal S4D convolution of ``(B, H, L)`` inputs; ``forward(x, rate)`` as ``MRConv`` (``rate`` must be 1)."""

    def __init__(
        self, dim: int, d_state: int = 64, dt_min: float = 0.001, dt_max: float = 0.1, cache_kernel: bool = False
    ) -> None:
        super().__init__()
        self.cache_kernel = cache_kernel  # eval mode: keep the kernel's spectrum (s4d.py recomputes it every call)
        self._spectrum: torch.Tensor | None = None
        self.log_dt = nn.Parameter(torch.rand(dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(dim, d_state // 2, dtype=torch.cfloat)))
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(dim, d_state // 2)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(d_state // 2, dtype=torch.float).repeat(dim, 1))

    def kernel(self, length: int) -> torch.Tensor:
        """``K`` ``(H, L)`` of the module docstring, its ``(H, N/2, L)`` terms in real arithmetic (as fast as
        ``s4d.py``'s complex ``exp`` and ``einsum`` on a GPU, many times faster on a CPU)."""
        dt = self.log_dt.exp()
        A = -self.log_A_real.exp() + 1j * self.A_imag
        dtA = A * dt[:, None]
        C = torch.view_as_complex(self.C) * (dtA.exp() - 1.0) / A
        positions = torch.arange(length, device=A.device, dtype=dt.dtype)
        decay = (dtA.real[..., None] * positions).exp()
        phase = dtA.imag[..., None] * positions
        return 2 * (decay * (C.real[..., None] * phase.cos() - C.imag[..., None] * phase.sin())).sum(dim=1)

    def forward(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        if rate != 1:
            raise ValueError("this S4D baseline runs at its training rate only")
        length = x.shape[-1]
        if self.cache_kernel and not self.training:
            if self._spectrum is None or self._spectrum.shape[-1] != length + 1:
                self._spectrum = torch.fft.rfft(self.kernel(length), n=2 * length).detach()
            k_f = self._spectrum
        else:
            k_f = torch.fft.rfft(self.kernel(length), n=2 * length)
        x_f = torch.fft.rfft(x, n=2 * length)
        return torch.fft.irfft(x_f * k_f, n=2 * length)[..., :length]
