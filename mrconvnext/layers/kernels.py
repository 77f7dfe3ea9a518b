"""Sub-kernel parameterizations of MRConv and their merging (paper Section 3.3, Eqs. 7, 9, 14-16).

Each module holds the parameters of all ``N`` resolutions of one layer and returns, on call,
the list of sub-kernels ``k_i`` of shape ``(num_directions, D, lengths[i])``. Resolution ``i``
has a *nominal* length ``l_0 * 2^i`` (its resolution) and an *actual* length cut to the
sequence length the layer is planned for. All random structure lives in persistent buffers.

* :class:`DenseKernel`: free taps (the paper's dense ablation).
* :class:`DilatedKernel`: Eq. 14, ``l_0`` taps at lags ``j * 2^i``.
* :class:`FourierKernel`: Eq. 15, ``ceil(l_0 / 2)`` low-frequency modes at length ``l_0 * 2^i``.
* :class:`SparseKernel`: Eq. 16, ``l_0`` taps at fixed random positions in ``[0, l_i)``.
* :class:`FourierSparseKernel`: Eq. 9, the two above scaled and summed.

:meth:`SubKernels.merge` is Eq. 7, ``sum_i w_i ZeroPad(k_i)`` (the reparameterized kernel of
Eqs. 8 and 13 once the BatchNorms are folded into ``w_i``); :func:`merge_kernels` is its generic form.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .fft_conv import no_autocast

__all__ = [
    "KERNEL_TYPES",
    "SubKernels",
    "DenseKernel",
    "DilatedKernel",
    "FourierKernel",
    "SparseKernel",
    "FourierSparseKernel",
    "create_kernel",
    "merge_kernels",
]

_BASES_CACHE_SIZE = 8


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


class SubKernels(nn.Module):
    """Base class: bookkeeping of lengths shared by every parameterization."""

    resamplable = False

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        lengths: list[int],
        nominal_lengths: list[int],
        num_directions: int,
    ) -> None:
        super().__init__()
        if len(lengths) != len(nominal_lengths):
            raise ValueError("lengths and nominal_lengths must have one entry per resolution")
        self.dim = dim
        self.kernel_size = kernel_size
        self.lengths = list(lengths)
        self.nominal_lengths = list(nominal_lengths)
        self.num_directions = num_directions

    @property
    def num_resolutions(self) -> int:
        return len(self.lengths)

    def _check_rate(self, rate: float) -> None:
        if rate != 1 and not self.resamplable:
            raise ValueError(
                f"{type(self).__name__} is not a continuous parameterization and cannot be resampled "
                f"(rate={rate}); only 'fourier' kernels support rate != 1"
            )

    def forward(self, rate: float = 1.0) -> list[torch.Tensor]:
        raise NotImplementedError

    def merge(self, weights: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """Merged kernel ``sum_i weights[i] * ZeroPad(k_i)`` (Eq. 7), ``(dirs, D, max length)``.

        ``weights``: ``(N, dirs, D, 1)``-broadcastable. Subclasses build it without
        materialising every sub-kernel where their structure allows.
        """
        return merge_kernels(self(rate), weights)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, lengths={self.lengths}"


class DenseKernel(SubKernels):
    """Free taps: ``l_i`` parameters per channel at resolution ``i`` (the paper's dense ablation)."""

    def __init__(self, dim, kernel_size, lengths, nominal_lengths, num_directions) -> None:
        super().__init__(dim, kernel_size, lengths, nominal_lengths, num_directions)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(num_directions, dim, n) / math.sqrt(n)) for n in lengths]
        )

    def forward(self, rate: float = 1.0) -> list[torch.Tensor]:
        self._check_rate(rate)
        return list(self.weights)


class DilatedKernel(SubKernels):
    """``l_0`` taps with dilation ``2^i`` (Eq. 14); taps beyond a cut length are dropped."""

    def __init__(self, dim, kernel_size, lengths, nominal_lengths, num_directions) -> None:
        super().__init__(dim, kernel_size, lengths, nominal_lengths, num_directions)
        num_res = len(lengths)
        self.weight = nn.Parameter(torch.randn(num_res, num_directions, dim, kernel_size) / math.sqrt(kernel_size))

    def dilation(self, index: int) -> int:
        return max(1, self.nominal_lengths[index] // self.kernel_size)

    def forward(self, rate: float = 1.0) -> list[torch.Tensor]:
        self._check_rate(rate)
        kernels = []
        for i, length in enumerate(self.lengths):
            dilation = self.dilation(i)
            taps = min(self.kernel_size, (length - 1) // dilation + 1)
            k = self.weight.new_zeros(self.num_directions, self.dim, length)
            k[..., : taps * dilation : dilation] = self.weight[i, ..., :taps]
            kernels.append(k)
        return kernels


class FourierKernel(SubKernels):
    """``ceil(l_0 / 2)`` complex low-frequency modes, zero-padded and inverse-FFT'd (Eq. 15).

    The kernel is ``k[t] = sum_f c_f exp(2 pi i f t / l_i)`` (``irfft`` with ``norm="forward"``):
    a band-limited function sampled ``l_i`` times, so its amplitude does not shrink with
    length and it can be re-sampled at another rate without aliasing (see ``forward``).
    """

    resamplable = True

    def __init__(self, dim, kernel_size, lengths, nominal_lengths, num_directions) -> None:
        super().__init__(dim, kernel_size, lengths, nominal_lengths, num_directions)
        self.num_modes = math.ceil(kernel_size / 2)
        std = 1.0 / math.sqrt(2 * self.num_modes)
        # (N, dirs, D, 2 * modes): real/imaginary interleaved; at most 4-D so that
        # ``model.to(memory_format=torch.channels_last)`` (timm's --channels-last) works
        self.modes = nn.Parameter(torch.randn(len(lengths), num_directions, dim, 2 * self.num_modes) * std)
        self._bases: dict = {}  # merge()'s cosine/sine bases per sampling plan, device and dtype

    def coefficients(self) -> torch.Tensor:
        """Complex Fourier coefficients ``(N, dirs, D, modes)``."""
        return torch.view_as_complex(self.modes.contiguous().unflatten(-1, (self.num_modes, 2)))

    def _sampling(self, rate: float) -> list[tuple[int, int, int]]:
        """Per resolution: irfft length ``n``, modes kept ``keep`` and taps returned ``m``."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        plan = []
        for length, nominal in zip(self.lengths, self.nominal_lengths, strict=True):
            n = max(1, round(nominal / rate))
            keep = min(self.num_modes, (n + 1) // 2)  # strictly below Nyquist: nothing aliases
            plan.append((n, keep, max(1, round(length / rate))))
        return plan

    def forward(self, rate: float = 1.0) -> list[torch.Tensor]:
        """Sub-kernels sampled at ``1 / rate`` times the training rate.

        ``rate=2`` evaluates the same continuous kernel on every second sample (for inputs
        decimated by 2): modes above the new Nyquist frequency are dropped (no aliasing) and
        the kernel is scaled by ``rate`` so that ``sum_t k[t] u[t]`` keeps approximating the
        same integral.
        """
        coeffs = self.coefficients()
        kernels = []
        for i, (n, keep, taps) in enumerate(self._sampling(rate)):
            k = torch.fft.irfft(coeffs[i, ..., :keep], n=n, norm="forward")
            kernels.append((k * rate if rate != 1 else k)[..., :taps])
        return kernels

    def merge(self, weights: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """Eq. 7 as one matmul per segment against cached cosine/sine bases (no irfft per resolution).

        Taps ``[m_{j-1}, m_j)`` are reached by resolutions ``j .. N-1`` only, so segment ``j`` is
        ``[w_j c_j, ..., w_{N-1} c_{N-1}] @ basis_j``: ``sum_i m_i * 2 modes`` multiply-adds per
        row, forward and backward, which BLAS runs faster than the ``N`` FFTs and the merge.
        """
        plan = tuple(self._sampling(rate))
        key = (plan, float(rate), self.modes.device, self.modes.dtype)
        if torch.compiler.is_exporting():  # real bases built in the graph: no complex tensors (ONNX has none)
            bases = _fourier_bases(plan, self.num_modes, float(rate), *key[2:])
        elif torch.compiler.is_compiling():  # the cached bases are Python state: trace the irfft path instead
            return super().merge(weights, rate)
        else:
            bases = self._bases.get(key)
            if bases is None:
                if len(self._bases) >= _BASES_CACHE_SIZE:
                    self._bases.clear()
                bases = self._bases[key] = _fourier_bases(plan, self.num_modes, float(rate), *key[2:])
        with no_autocast(self.modes.device):
            scaled = (weights * self.modes).movedim(0, -2)  # (dirs, D, N, 2 * modes)
            segments = [scaled[..., first:, :].flatten(-2) @ basis for first, basis in bases]
        return torch.cat(segments, dim=-1) if len(segments) > 1 else segments[0]

    def _apply(self, fn, recurse=True):
        self._bases.clear()  # moved or cast: rebuilt on the new device and dtype
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bases": {}}  # copies and pickles start without the cache


def _fourier_bases(
    plan: tuple[tuple[int, int, int], ...], num_modes: int, rate: float, device: torch.device, dtype: torch.dtype
) -> tuple[tuple[int, torch.Tensor], ...]:
    """``(j, basis_j)`` per non-empty tap segment ``[m_{j-1}, m_j)`` of :meth:`FourierKernel.merge`.

    Row ``2f`` / ``2f + 1`` of resolution ``i`` holds the derivative of ``irfft(c, n_i, norm="forward")``
    with respect to ``Re c_f`` / ``Im c_f`` (times ``rate``): ``w_f cos(2 pi f t / n_i)`` and
    ``-w_f sin(2 pi f t / n_i)``, ``w_0 = 1`` (the imaginary part of DC is ignored), ``w_f = 2`` else;
    rows of modes dropped at this rate are zero. ``basis_j`` stacks resolutions ``j .. N-1``.
    """
    bounds = [0] + [taps for _, _, taps in plan]
    freqs = torch.arange(num_modes, dtype=torch.float64)[:, None]
    rows = []
    for n, keep, taps in plan:
        t = torch.arange(taps, dtype=torch.float64)
        angle = 2 * math.pi * torch.remainder(freqs * t, n) / n  # reduced mod n: exact arguments
        weight = torch.full((num_modes, 1), 2.0 * rate, dtype=torch.float64)
        weight[0] = rate
        weight[keep:] = 0
        basis = torch.stack([weight * angle.cos(), -weight * angle.sin()], dim=1)  # (modes, 2, taps)
        basis[0, 1] = 0
        rows.append(basis.reshape(2 * num_modes, taps))
    bases = []
    with torch.inference_mode(False):  # kept and reused under autograd: must not be inference tensors
        for first in range(len(plan)):
            start, end = bounds[first], bounds[first + 1]
            if end > start:
                stacked = torch.cat([basis[:, start:end] for basis in rows[first:]])
                bases.append((first, stacked.to(device=device, dtype=dtype)))
    return tuple(bases)


class SparseKernel(SubKernels):
    """``l_0`` taps at random positions drawn once, without replacement, in ``[0, l_i)`` (Eq. 16).

    Positions are drawn per channel and direction from torch's global generator and kept in
    the persistent buffer ``positions`` so they survive save/load.
    """

    def __init__(self, dim, kernel_size, lengths, nominal_lengths, num_directions) -> None:
        super().__init__(dim, kernel_size, lengths, nominal_lengths, num_directions)
        num_res = len(lengths)
        self.weight = nn.Parameter(torch.randn(num_res, num_directions, dim, kernel_size) / math.sqrt(kernel_size))
        positions = torch.stack(
            [torch.rand(num_directions, dim, n).argsort(dim=-1)[..., :kernel_size] for n in lengths]
        )
        self.register_buffer("positions", positions.sort(dim=-1).values, persistent=True)

    def forward(self, rate: float = 1.0) -> list[torch.Tensor]:
        self._check_rate(rate)
        kernels = []
        for i, length in enumerate(self.lengths):
            k = self.weight.new_zeros(self.num_directions, self.dim, length)
            kernels.append(k.scatter(-1, self.positions[i], self.weight[i]))
        return kernels

    def merge(self, weights: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """Eq. 7 as one ``scatter_add`` of all ``N * l_0`` weighted taps."""
        self._check_rate(rate)
        shape = torch.broadcast_shapes(weights.shape[1:-1], self.weight.shape[1:-1])
        return self.add_taps(self.weight.new_zeros(*shape, self.lengths[-1]), weights)

    def add_taps(self, kernel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``kernel + sum_i weights[i] * ZeroPad(k_i)`` for ``kernel`` ``(dirs, D, max length)``, out of place."""
        taps = (weights * self.weight).movedim(0, -2).flatten(-2)  # (dirs, D, N * l_0)
        return kernel.scatter_add(-1, self.positions.movedim(0, -2).flatten(-2).expand_as(taps), taps)


class FourierSparseKernel(SubKernels):
    """Fourier and sparse kernels of equal length merged with per-channel scales (Eq. 9).

    ``k_i = beta_f[i] * fourier_i + beta_s[i] * sparse_i``: linear rescaling, so the two are
    merged during training and each resolution costs one convolution.
    """

    def __init__(self, dim, kernel_size, lengths, nominal_lengths, num_directions) -> None:
        super().__init__(dim, kernel_size, lengths, nominal_lengths, num_directions)
        self.fourier = FourierKernel(dim, kernel_size, lengths, nominal_lengths, num_directions)
        self.sparse = SparseKernel(dim, kernel_size, lengths, nominal_lengths, num_directions)
        self.scale = nn.Parameter(torch.ones(2, len(lengths), num_directions, dim))

    def forward(self, rate: float = 1.0) -> list[torch.Tensor]:
        self._check_rate(rate)
        fourier, sparse = self.fourier(), self.sparse()
        return [
            self.scale[0, i, ..., None] * f + self.scale[1, i, ..., None] * s
            for i, (f, s) in enumerate(zip(fourier, sparse, strict=True))
        ]

    def merge(self, weights: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        self._check_rate(rate)
        scale = self.scale[..., None]
        return self.sparse.add_taps(self.fourier.merge(weights * scale[0]), weights * scale[1])


KERNEL_TYPES: dict[str, type[SubKernels]] = {
    "dense": DenseKernel,
    "dilated": DilatedKernel,
    "fourier": FourierKernel,
    "sparse": SparseKernel,
    "fourier_sparse": FourierSparseKernel,
}


def create_kernel(
    kernel_type: str,
    dim: int,
    kernel_size: int,
    lengths: list[int],
    nominal_lengths: list[int],
    num_directions: int,
) -> SubKernels:
    """Build the sub-kernel module named ``kernel_type`` (one of ``KERNEL_TYPES``)."""
    if kernel_type not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel_type {kernel_type!r}; expected one of {sorted(KERNEL_TYPES)}")
    return KERNEL_TYPES[kernel_type](dim, kernel_size, lengths, nominal_lengths, num_directions)
