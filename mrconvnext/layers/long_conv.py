"""A deploy-form MRConv as one long depthwise convolution in export-friendly ops (paper Eq. 13).

The eager deploy form (:mod:`~mrconvnext.layers.deploy_form`) caches spectra in Python and sizes channel blocks
from the batch, which neither exporter can trace, and the TorchScript-based ONNX exporter has no FFT at all.
:class:`LongConv` is the same convolution at the layer's planned length ``L`` (merged kernel, Eqs. 8, 13, 18)
in one of three exact forms (float32, within ~1e-6 of a float64 direct convolution):

* ``'matmul'``: the circular convolution of length ``n = Q_1 Q_2 ... Q_k`` through a DFT factored in ``k``
  Cooley-Tukey steps, each one MatMul against small constant matrices shared by all channels, on activations
  laid out ``(B, L, D)`` (channels last, so every MatMul is a large GEMM): position ``t`` splits into digits with
  ``Q_1`` the slowest, the first step transforms that digit and, the input being real, keeps only its Hermitian
  half (``Q_1 // 2 + 1`` frequencies); every later step's twiddle factors are folded into one matrix per
  frequency prefix. The last step writes each complex value twice, so that one broadcast ``Mul`` by the kernel's
  spectrum and the next MatMul carry out the complex product. ``k = 1`` is the dense DFT.
* ``'toeplitz'``: the dense Toeplitz matrices ``(D, L, L)``, gathered in the graph from the ``(D, 2L - 1)`` taps
  (the file holds the taps, not ``D L^2`` constants), then one batched MatMul (``D L^2`` MACs per sample).
* ``'dft'``: ONNX's ``DFT`` op (from ``torch.fft.rfft``/``irfft`` through the dynamo exporter) at a power-of-two
  length: onnxruntime has a radix-2 FFT for powers of two only (other lengths take an O(n^2) DFT that also lost
  float32 accuracy, 4e-4 at n = 6272).

``method='auto'`` and the choice of ``n`` and its factors are made by a cost model, per sample averaged over
batch 1 and batch 8: MACs, GEMM calls and elements written, each priced by :class:`RuntimeCosts` measured by a
short calibration in the target runtime (:func:`torch_costs` here, ``mrconvnext.utils.onnx.onnxruntime_costs``
for ONNX), never by constants fitted to one machine. ``benchmarks/benchmark.py --targets 6`` prints the measured
table the model's choices can be checked against.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .deploy_form import fastest, power_of_two_length, spectral_conv
from .mrconv import MRConv, MRConv2d

__all__ = [
    "LONG_CONV_METHODS",
    "TOEPLITZ_MAX_BYTES",
    "LongConv",
    "RuntimeCosts",
    "Op",
    "calibrate",
    "dft_ops",
    "toeplitz_ops",
    "plan_long_conv",
    "torch_costs",
]

LONG_CONV_METHODS = ("auto", "toeplitz", "matmul", "dft")
TOEPLITZ_MAX_BYTES = 2**30  # the Toeplitz matrices one call gathers, (D, L, L) float32
PLAN_BATCHES = (1, 8)  # the cost model averages the per-sample cost over these batch sizes
_MAX_FACTORS = 4
_LENGTHS = 4  # candidate DFT lengths
_SMOOTH_PRIMES = (2, 3, 5, 7)


@dataclass(frozen=True)
class Op:
    """One graph op of a form: multiply-adds, GEMM calls (a MatMul runs one per matrix product), elements it
    writes, and the bytes it touches (inputs, constants and output), which set the price of each element."""

    macs: float = 0.0
    calls: float = 0.0
    elements: float = 0.0
    nbytes: float = 0.0


@dataclass(frozen=True)
class RuntimeCosts:
    """Prices measured in one runtime by :func:`calibrate`: seconds per MAC and per GEMM call, and seconds per
    written element at a few working-set sizes ``(bytes, seconds)`` (the caches make small tensors cheaper)."""

    mac_s: float
    call_s: float
    element_s: tuple[tuple[float, float], ...]

    def element_price(self, nbytes: float) -> float:
        """Seconds per element for an op touching ``nbytes``: interpolated in log size between the measured points."""
        points = self.element_s
        if nbytes <= points[0][0]:
            return points[0][1]
        for (low, low_s), (high, high_s) in itertools.pairwise(points):
            if nbytes <= high:
                weight = math.log(nbytes / low) / math.log(high / low)
                return low_s + weight * (high_s - low_s)
        return points[-1][1]

    def seconds(self, ops: list[Op]) -> float:
        return sum(
            op.macs * self.mac_s + op.calls * self.call_s + op.elements * self.element_price(op.nbytes) for op in ops
        )


_PROBE_SIZES = (2**14, 2**17, 2**20, 2**23)  # elements of the Mul probes: from within L2 to well past L3


def calibrate(
    time_matmul: Callable[[tuple[int, ...], tuple[int, ...]], float],
    time_mul: Callable[[tuple[int, ...], tuple[int, ...]], float],
) -> RuntimeCosts:
    """:class:`RuntimeCosts` from probes timed in the target runtime (fastest of a few runs each).

    ``time_matmul(a, b)`` times ``matmul`` of a constant of shape ``a`` with an input of shape ``b``; ``time_mul(x,
    c)`` an input ``x`` times a broadcast constant ``c``. Broadcast Muls of 16K to 8M elements price a written
    element by working-set size, one large GEMM a MAC, a MatMul of 1024 8x8 products a call.
    """
    fixed = time_mul((1, 1), (1,))  # what a run costs besides its work (subtracted from every probe)
    element_s = tuple((12.0 * size, max(time_mul((1, size), (size,)) - fixed, 0.0) / size) for size in _PROBE_SIZES)
    costs = RuntimeCosts(0.0, 0.0, element_s)
    outputs = 256 * 2048
    big = time_matmul((256, 256), (1, 256, 2048)) - fixed - outputs * costs.element_price(12.0 * outputs)
    costs = RuntimeCosts(max(big / (256 * outputs), 1e-15), 0.0, element_s)
    calls, small = 1024, 1024 * 64
    tiny = time_matmul((calls, 8, 8), (1, calls, 8, 8)) - fixed - costs.seconds([Op(8 * small, 0, small, 12.0 * small)])
    return RuntimeCosts(costs.mac_s, max(tiny / calls, 0.0), element_s)


@functools.cache
def torch_costs(threads: int | None = None) -> RuntimeCosts:
    """:func:`calibrate` in eager PyTorch on the CPU (for ``torch.export`` graphs), with ``threads`` intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:

        def time_matmul(a: tuple[int, ...], b: tuple[int, ...]) -> float:
            left, right = torch.randn(a), torch.randn(b)
            return fastest(lambda: torch.matmul(left, right))

        def time_mul(x: tuple[int, ...], c: tuple[int, ...]) -> float:
            left, right = torch.randn(x), torch.randn(c)
            return fastest(lambda: left * right)

        with torch.no_grad():
            return calibrate(time_matmul, time_mul)
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- the cost model
def _needed_length(seq_len: int, causal_taps: int, anticausal_taps: int) -> int:
    """Shortest circular buffer with no wrap-around onto outputs ``[0, L)`` (lags ``-Ka .. Kc-1``)."""
    return seq_len + max(anticausal_taps, causal_taps - 1)


def _smooth(n: int) -> bool:
    for p in _SMOOTH_PRIMES:
        while n % p == 0:
            n //= p
    return n == 1


def _factorizations(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Ordered factorizations of ``n`` into ``parts`` factors >= 2 (``(n,)`` for one part)."""
    if parts == 1:
        yield (n,)
        return
    for d in range(2, n // 2 + 1):
        if n % d == 0:
            for rest in _factorizations(n // d, parts - 1):
                yield (d, *rest)


def _blocks(n: int, factors: tuple[int, ...]) -> list[int]:
    """``P_j``: the positions one digit of step ``j`` spans (``n / (Q_1 ... Q_j)``)."""
    return [n // math.prod(factors[: j + 1]) for j in range(len(factors))]


def _elementwise(elements: float, inputs: float = 1.0) -> Op:
    """An op writing ``elements`` float32 values after reading ``inputs`` times as many."""
    return Op(elements=elements, nbytes=4.0 * (1 + inputs) * elements)


def _matmul(macs: float, calls: float, inputs: float, constants: float, outputs: float) -> Op:
    return Op(macs, calls, outputs, 4.0 * (inputs + constants + outputs))


def dft_ops(seq_len: int, dim: int, factors: tuple[int, ...], batch: int = 1) -> list[Op]:
    """The ops of the factored DFT form (``method='matmul'``) on ``batch`` samples of ``(L, D)``."""
    n, k = math.prod(factors), len(factors)
    blocks = _blocks(n, factors)
    rows = -(-seq_len // blocks[0])  # T: rows of P_1 positions that hold the input
    padded = rows * blocks[0] * dim * batch
    half = factors[0] // 2 + 1
    first = (4 if k == 1 else 2) * half  # output rows of the first step, per column
    activation = seq_len * dim * batch
    ops = [_elementwise(activation)]  # to channels last
    if padded != activation:
        ops.append(_elementwise(padded))
    spectrum = first * blocks[0] * dim * batch
    forward = [_matmul(first * padded, batch, padded, first * rows, spectrum)]
    inverse = [_matmul(first * padded, batch, spectrum, first * rows, padded)]
    prefixes = half
    for j in range(1, k):
        out = (4 if j == k - 1 else 2) * factors[j]
        size_in, size_out = spectrum, prefixes * out * blocks[j] * dim * batch
        constants = prefixes * out * 2 * factors[j]
        macs = 2 * factors[j] * size_out
        forward.append(_matmul(macs, batch * prefixes, size_in, constants, size_out))
        inverse.insert(0, _matmul(macs, batch * prefixes, size_out, constants, size_in))
        spectrum = size_out
        prefixes *= factors[j]
    product = Op(elements=spectrum, nbytes=4.0 * (2 * spectrum + spectrum / batch))
    ops += [*forward, product, *inverse]
    if padded != activation:
        ops.append(_elementwise(activation))
    return [*ops, _elementwise(activation), _elementwise(activation)]  # bias, back to channels first


def toeplitz_ops(seq_len: int, dim: int, batch: int = 1) -> list[Op]:
    """The ops of the Toeplitz form: one gather of ``(D, L, L)`` per call, one GEMM per channel."""
    matrices, activation = dim * seq_len**2, seq_len * dim * batch
    gather = Op(elements=matrices, nbytes=4.0 * (matrices + 2 * dim * seq_len) + 4.0 * seq_len**2)
    matmul = _matmul(batch * matrices, dim, activation, matrices, activation)
    return [_elementwise(activation), gather, matmul, _elementwise(activation), _elementwise(activation)]


def _per_sample(costs: RuntimeCosts, ops: Callable[[int], list[Op]]) -> float:
    return statistics.fmean(costs.seconds(ops(batch)) / batch for batch in PLAN_BATCHES)


@functools.cache
def _best_factors(seq_len: int, need: int, dim: int, costs: RuntimeCosts) -> tuple[int, ...]:
    """The factors of the cheapest ``n``: one of the ``_LENGTHS`` shortest ``n >= need`` with prime factors 2-7."""
    best, best_cost = (), math.inf
    lengths = itertools.islice((n for n in itertools.count(need) if _smooth(n)), _LENGTHS)
    for n in lengths:
        for parts in range(1, _MAX_FACTORS + 1):
            for factors in _factorizations(n, parts):
                cost = _per_sample(costs, lambda b, f=factors: dft_ops(seq_len, dim, f, b))
                if cost < best_cost:
                    best, best_cost = factors, cost
    return best


def plan_long_conv(
    seq_len: int, dim: int, causal_taps: int, anticausal_taps: int, method: str, costs: RuntimeCosts
) -> tuple[str, tuple[int, ...]]:
    """``(method, factors)``: ``'auto'`` resolved to the cheaper of Toeplitz and the factored DFT under ``costs``,
    and the DFT's factors (empty for the other forms)."""
    factors = _best_factors(seq_len, _needed_length(seq_len, causal_taps, anticausal_taps), dim, costs)
    if method == "auto":
        toeplitz = _per_sample(costs, lambda b: toeplitz_ops(seq_len, dim, b))
        dft = _per_sample(costs, lambda b: dft_ops(seq_len, dim, factors, b))
        fits = 4 * dim * seq_len**2 <= TOEPLITZ_MAX_BYTES
        method = "toeplitz" if fits and toeplitz < dft else "matmul"
    return method, factors if method == "matmul" else ()


# ----------------------------------------------------------------------------- the factored DFT's constants
def _unit(exponent: torch.Tensor, period: int) -> torch.Tensor:
    """``exp(-2 pi i exponent / period)`` in complex128."""
    return torch.exp(-2j * math.pi * (exponent % period).double() / period)


def _step_matrices(n: int, factors: tuple[int, ...], rows: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Complex ``M_j[G][g, b]`` per step (``G`` the frequency prefixes so far) and the frequency of each output.

    Step ``j`` transforms digit ``b_j`` of the position into digit ``g_j`` of the frequency; the twiddle between
    the steps, ``W_n^(P_j b_j G)`` with ``G = g_1 + Q_1 g_2 + ...`` the prefix's frequency, is folded into the
    matrix (``W_n = exp(-2 pi i / n)``). The first step sees only the ``rows`` input digits and keeps the Hermitian
    half of its frequencies.
    """
    blocks = _blocks(n, factors)
    half = factors[0] // 2 + 1
    prefix = torch.arange(half)
    matrices = [_unit(prefix[:, None] * torch.arange(rows)[None, :], factors[0])[None]]
    stride = factors[0]
    for j in range(1, len(factors)):
        g = b = torch.arange(factors[j])
        exponent = (n // factors[j]) * g[None, :, None] * b[None, None, :] + blocks[j] * b * prefix[:, None, None]
        matrices.append(_unit(exponent, n))
        prefix = (prefix[:, None] + stride * g[None, :]).reshape(-1)
        stride *= factors[j]
    return matrices, prefix


def _forward_real(matrix: torch.Tensor, first: bool, last: bool) -> torch.Tensor:
    """Real form of one forward step: rows ``(g, c')`` (``c'`` real, imaginary), or ``(p, c', g)`` twice over for
    the last step; columns ``(c, b)`` (``b`` alone for the real input of the first step)."""
    re, im = matrix.real, matrix.imag
    real_part, imag_part = (re, im) if first else (torch.cat([re, -im], -1), torch.cat([im, re], -1))
    if last:  # [Re; Im; Re; Im]: the spectrum multiplies the first pair by Re K, the second by Im K
        stacked = torch.stack([real_part, imag_part] * 2, -3)
        return stacked.reshape(matrix.shape[0], 4 * matrix.shape[1], -1)
    return torch.stack([real_part, imag_part], -2).reshape(matrix.shape[0], 2 * matrix.shape[1], -1)


def _inverse_real(adjoint: torch.Tensor, first: bool, last: bool) -> torch.Tensor:
    """Real form of one inverse step (the adjoint ``(b, g)`` of a forward step): rows ``(c', b)`` (real part only
    for the first factor); columns ``(g, c)``, or ``(p, c', g)`` for the last step, where the complex product
    with the spectrum is ``(S_00 - S_11) + i (S_01 + S_10)``."""
    re, im = adjoint.real, adjoint.imag
    if last:
        rows = [torch.stack([re, -im, -im, -re], -2), torch.stack([im, re, re, -im], -2)]
    else:
        rows = [torch.stack([re, -im], -1), torch.stack([im, re], -1)]
    stacked = torch.stack(rows[:1] if first else rows, 1)
    return stacked.reshape(adjoint.shape[0], stacked.shape[1] * adjoint.shape[1], -1)


@register_notrace_module  # a leaf of timm's FX traces: its length check branches on the input shape
class LongConv(nn.Module):
    """A deploy-form MRConv at its planned length ``L`` in export-friendly ops.

    ``kernel`` has :func:`mrconvnext.layers.fft_conv` layout: ``(D, K)`` causal (lags ``0 .. K-1``) or
    ``(2, D, K)`` bidirectional (``kernel[1]`` at lags ``-1 .. -K``); ``y = k * u + bias``.
    ``image=True`` takes ``(B, D, H, W)`` maps with ``H * W = L`` (flattened row-major, as MRConv2d).
    ``costs`` prices the forms for ``method='auto'`` and the DFT's factors (default: :func:`torch_costs`);
    ``factors`` sets them instead (``method='matmul'``; their product ``n`` must avoid wrap-around onto ``[0, L)``).
    """

    def __init__(
        self,
        kernel: torch.Tensor,
        bias: torch.Tensor,
        seq_len: int,
        bidirectional: bool,
        image: bool = False,
        method: str = "auto",
        costs: RuntimeCosts | None = None,
        factors: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if method not in LONG_CONV_METHODS:
            raise ValueError(f"unknown long-convolution method {method!r}; expected one of {list(LONG_CONV_METHODS)}")
        self.seq_len = seq_len
        self.image = image
        self.factors: tuple[int, ...] = ()
        kernel = kernel.detach().double()
        dim = kernel.shape[-2]
        causal = (kernel[0] if bidirectional else kernel)[:, :seq_len]
        anticausal = kernel[1, :, : seq_len - 1] if bidirectional else kernel[:, :0]
        if method == "toeplitz" and 4 * dim * seq_len**2 > TOEPLITZ_MAX_BYTES:
            raise ValueError(
                f"Toeplitz form of a layer with D={dim}, L={seq_len} gathers {4 * dim * seq_len**2 / 2**30:.1f} GiB "
                f"per call (limit {TOEPLITZ_MAX_BYTES / 2**30:.0f} GiB); use method='matmul' or 'dft'"
            )
        need = _needed_length(seq_len, causal.shape[1], anticausal.shape[1])
        if factors is not None:
            if method != "matmul" or math.prod(factors) < need or min(factors) < 1:
                raise ValueError(
                    f"factors={factors} need method='matmul' and a product of at least {need} (L={seq_len})"
                )
            self.factors = tuple(factors)
        elif method in ("auto", "matmul"):
            method, self.factors = plan_long_conv(
                seq_len, dim, causal.shape[1], anticausal.shape[1], method, costs or torch_costs()
            )
        self.method = method
        self.register_buffer("bias", bias.detach().float().reshape(dim))
        if method == "toeplitz":
            # taps by lag -(L-1) .. L-1; T[d, s, t] = taps[d, lags[s L + t]] is the tap at lag t - s
            taps = kernel.new_zeros(dim, 2 * seq_len - 1)
            taps[:, seq_len - 1 : seq_len - 1 + causal.shape[1]] = causal
            taps[:, seq_len - 1 - anticausal.shape[1] : seq_len - 1] = anticausal.flip(-1)
            self.register_buffer("taps", taps.float())
            lags = seq_len - 1 + torch.arange(seq_len)[None, :] - torch.arange(seq_len)[:, None]
            self.register_buffer("lags", lags.flatten().int())
            return
        if method == "dft":
            self.n = power_of_two_length(seq_len, causal.shape[1], anticausal.shape[1])
        else:
            self.n = math.prod(self.factors)
        # circular buffer: causal taps at 0 .. Kc-1, anti-causal ones flipped into the last Ka positions
        buffer = kernel.new_zeros(dim, self.n)
        buffer[:, : causal.shape[1]] = causal
        buffer[:, self.n - anticausal.shape[1] :] = anticausal.flip(-1)
        if method == "dft":
            spectrum = torch.fft.rfft(buffer)
            self.register_buffer("spectrum_real", spectrum.real.float())
            self.register_buffer("spectrum_imag", spectrum.imag.float())
        else:
            self._init_factored_dft(torch.fft.fft(buffer))

    def _init_factored_dft(self, spectrum: torch.Tensor) -> None:
        """Constants of :meth:`_conv_matmul`, computed in float64: one real matrix per step and direction."""
        factors, n, dim = self.factors, self.n, spectrum.shape[0]
        self.blocks = _blocks(n, factors)
        self.rows = -(-self.seq_len // self.blocks[0])
        matrices, frequencies = _step_matrices(n, factors, self.rows)
        half = factors[0] // 2 + 1
        weights = torch.full((half,), 2.0, dtype=torch.float64)  # Hermitian pairs of the first digit count twice
        weights[0] = 1
        if factors[0] % 2 == 0:
            weights[-1] = 1
        last = len(factors) - 1
        for j, matrix in enumerate(matrices):
            forward = _forward_real(matrix, j == 0, j == last)
            adjoint = matrix.conj().transpose(-1, -2)
            if j == 0:  # real part of the inverse DFT: Hermitian weights and 1/n
                adjoint = adjoint * weights / n
            inverse = _inverse_real(adjoint, j == 0, j == last)
            self.register_buffer(f"forward_{j}", (forward[0] if j == 0 else forward).float())
            self.register_buffer(f"inverse_{j}", (inverse[0] if j == 0 else inverse).float())
        last_rows = factors[-1] if last else half
        k_f = spectrum[:, frequencies].t().reshape(-1, last_rows, dim)  # (prefixes, Q_k, D)
        k_4 = torch.stack([k_f.real, k_f.real, k_f.imag, k_f.imag], 1)  # rows (p, c', g) as the last step writes
        self.register_buffer("spectrum", k_4.reshape(k_f.shape[0], 4 * last_rows, dim).float())

    @classmethod
    def from_mrconv(cls, layer: MRConv, method: str = "auto", costs: RuntimeCosts | None = None) -> LongConv:
        """From a deploy-form layer, or a train-form one in eval mode (its merged kernel, Eqs. 8, 13, 18)."""
        if layer.training and not layer.deploy:
            raise ValueError("a train-form MRConv exports in eval mode only (its BatchNorms use running statistics)")
        kernel, bias = layer.merged_kernel()
        return cls(kernel, bias, layer.seq_len, layer.bidirectional, isinstance(layer, MRConv2d), method, costs)

    def forward(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        if rate != 1:
            raise ValueError(f"the exported graph is fixed to the training sampling rate; got rate={rate}")
        shape = x.shape
        length = math.prod(shape[2:])
        if length != self.seq_len or len(shape) != (4 if self.image else 3):
            raise ValueError(
                f"the exported graph is built for the planned length L={self.seq_len} (kernels are fixed to "
                f"their training length); got an input of shape {tuple(shape)}"
            )
        if self.method == "matmul":
            # channels last: (B, L, D) in and out; an image map leaves as a channels-last view (B, D, H, W), which
            # the next block's permute to (B, H, W, D) cancels
            rows = x.permute(0, *range(2, x.ndim), 1).reshape(shape[0], self.seq_len, shape[1])
            y = self._conv_matmul(rows) + self.bias
            return y.reshape(shape[0], *shape[2:], shape[1]).permute(0, x.ndim - 1, *range(1, x.ndim - 1))
        x = x.flatten(2)
        if self.method == "toeplitz":
            toeplitz = self.taps.index_select(1, self.lags).reshape(-1, self.seq_len, self.seq_len)  # ONNX Gather
            y = torch.matmul(x.transpose(0, 1), toeplitz).transpose(0, 1)
        else:
            y = spectral_conv(x, self.spectrum_real, self.spectrum_imag, self.n)
        return (y + self.bias[:, None]).reshape(shape)

    def _conv_matmul(self, u: torch.Tensor) -> torch.Tensor:
        """Circular convolution of ``u`` ``(B, L, D)`` by the factored DFT (one MatMul per step and direction).

        Each step's input has the digit it transforms, with the real/imaginary index, as the axis before the
        trailing ``(remaining positions, D)`` block, and one matrix per frequency prefix in front; its output rows
        are ordered so that a reshape gives the next step that layout, with no transposes.
        """
        batch, dim, factors, blocks = u.shape[0], u.shape[-1], self.factors, self.blocks
        padded = self.rows * blocks[0]
        if padded != self.seq_len:
            u = F.pad(u, (0, 0, 0, padded - self.seq_len))
        h = torch.matmul(self.forward_0, u.reshape(batch, self.rows, blocks[0] * dim))
        for j in range(1, len(factors)):
            h = torch.matmul(getattr(self, f"forward_{j}"), h.reshape(batch, -1, 2 * factors[j], blocks[j] * dim))
        h = h.reshape(batch, *self.spectrum.shape) * self.spectrum
        for j in range(len(factors) - 1, 0, -1):
            h = torch.matmul(getattr(self, f"inverse_{j}"), h)
            if j > 1:
                h = h.reshape(batch, -1, 2 * factors[j - 1], blocks[j - 1] * dim)
        h = h.reshape(batch, -1, blocks[0] * dim)
        y = torch.matmul(self.inverse_0, h).reshape(batch, padded, dim)
        return y[:, : self.seq_len] if padded != self.seq_len else y

    def extra_repr(self) -> str:
        size = {"toeplitz": "", "dft": f", n={getattr(self, 'n', 0)}", "matmul": f", factors={self.factors}"}
        return f"seq_len={self.seq_len}, method={self.method!r}{size[self.method]}, image={self.image}"
