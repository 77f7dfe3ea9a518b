"""Every sub-kernel definition and every form of the layer against oracles written from the paper.

The oracles read only the layer's raw parameters and buffers (tap weights, Fourier modes, sparse
positions, scales, BN parameters) and build each sub-kernel by explicit loops over its taps, in
float64, from the paper's definitions: the resolution plan (Section 3.2), dilated (Eq. 14), Fourier
(Eq. 15), sparse (Eq. 16), Fourier + sparse (Eq. 9), the concat variant (SGConv Eq. 1). Layer outputs
are then compared with those kernels convolved by ``direct_conv`` (``conv1d``), so a wrong kernel
definition in the library (a halved dilation, a Fourier kernel sampled at the wrong length, a repeated
sparse position) fails here even though the layer stays self-consistent.
"""

import math

import pytest
import torch

from mrconvnext import KERNEL_TYPES, MRConv

from .reference import direct_conv, random_mrconv, rel_err

DIM = 4
SEQ_LEN = 100  # with l_0 = 6 the last resolution (nominal 192) is cut to 100 taps
KERNEL_SIZE = 6


def oracle_plan(seq_len, kernel_size, combine, max_resolutions=None):
    """Section 3.2: the fewest resolutions whose longest nominal length ``l_0 2^(N-1)`` covers ``seq_len``."""
    num_res = 1
    while kernel_size * 2 ** (num_res - 1) < seq_len:
        num_res += 1
    if max_resolutions is not None:
        num_res = min(num_res, max_resolutions)
    if combine == "concat":  # SGConv Eq. 1: segment i has length l_0 2^max(i-1, 0), not cut
        nominal = [kernel_size * 2 ** max(i - 1, 0) for i in range(num_res)]
        return nominal, nominal
    nominal = [kernel_size * 2**i for i in range(num_res)]
    return [min(n, seq_len) for n in nominal], nominal


def oracle_dilated(weight, lengths, nominal, kernel_size):
    """Eq. 14: tap ``j`` of resolution ``i`` at lag ``j * p_i`` with dilation ``p_i = nominal_i / l_0``
    (``2^i``; ``2^max(i-1, 0)`` for concat segments), taps past the cut length dropped."""
    kernels = []
    for i, length in enumerate(lengths):
        dilation = nominal[i] // kernel_size
        k = torch.zeros(*weight.shape[1:-1], length, dtype=torch.float64)
        for j in range(kernel_size):
            if j * dilation < length:
                k[..., j * dilation] = weight[i, ..., j].double()
        kernels.append(k)
    return kernels


def oracle_fourier(modes, lengths, nominal, rate=1.0):
    """Eq. 15: ``k[t] = rate * sum_f c_f exp(2 pi i f t / n)`` over the Hermitian spectrum, ``n = nominal / rate``.

    Modes are the parameters' interleaved (real, imaginary) pairs; only modes strictly below the
    Nyquist frequency of ``n`` samples (``2 f < n``) contribute, the imaginary part of DC is ignored,
    and ``round(length / rate)`` taps are returned.
    """
    coeffs = modes.double().unflatten(-1, (-1, 2))  # (N, dirs, D, modes, 2)
    kernels = []
    for i, length in enumerate(lengths):
        n = max(1, round(nominal[i] / rate))
        taps = max(1, round(length / rate))
        k = torch.zeros(*coeffs.shape[1:-2], taps, dtype=torch.float64)
        for t in range(taps):
            value = coeffs[i, ..., 0, 0].clone()
            for f in range(1, coeffs.shape[-2]):
                if 2 * f < n:
                    angle = 2 * math.pi * f * t / n
                    value += 2 * (coeffs[i, ..., f, 0] * math.cos(angle) - coeffs[i, ..., f, 1] * math.sin(angle))
            k[..., t] = rate * value
        kernels.append(k)
    return kernels


def check_sparse_positions(positions, lengths, kernel_size):
    """Eq. 16's support: ``l_0`` distinct positions in ``[0, l_i)`` per resolution, direction and channel."""
    for i, length in enumerate(lengths):
        for row in positions[i].reshape(-1, positions.shape[-1]).tolist():
            assert len(row) == kernel_size and len(set(row)) == kernel_size, f"resolution {i}: positions {row}"
            assert all(0 <= p < length for p in row), f"resolution {i}: positions {row} outside [0, {length})"


def oracle_sparse(weight, positions, lengths):
    """Eq. 16: ``k[t] = sum_j delta(t = T_j) w_j``."""
    kernels = []
    for i, length in enumerate(lengths):
        k = torch.zeros(*weight.shape[1:-1], length, dtype=torch.float64)
        for a in range(weight.shape[1]):
            for d in range(weight.shape[2]):
                for j in range(weight.shape[3]):
                    k[a, d, int(positions[i, a, d, j])] += weight[i, a, d, j].double()
        kernels.append(k)
    return kernels


def oracle_subkernels(layer, rate=1.0):
    """Sub-kernels ``(dirs, D, l_i)`` of ``layer`` from its raw parameters, float64."""
    kernel = layer.kernel
    lengths, nominal = oracle_plan(layer.seq_len, layer.kernel_size, layer.combine)
    kind = layer.kernel_type
    with torch.no_grad():
        if kind == "dense":
            return [w.double().clone() for w in kernel.weights]
        if kind == "dilated":
            return oracle_dilated(kernel.weight, lengths, nominal, layer.kernel_size)
        if kind == "fourier":
            return oracle_fourier(kernel.modes, lengths, nominal, rate)
        if kind == "sparse":
            check_sparse_positions(kernel.positions, lengths, layer.kernel_size)
            return oracle_sparse(kernel.weight, kernel.positions, lengths)
        # Eq. 9: k_i = beta_f,i * fourier_i + beta_s,i * sparse_i, per direction and channel
        check_sparse_positions(kernel.sparse.positions, lengths, layer.kernel_size)
        fourier = oracle_fourier(kernel.fourier.modes, lengths, nominal)
        sparse = oracle_sparse(kernel.sparse.weight, kernel.sparse.positions, lengths)
        scale = kernel.scale.double()
        return [
            scale[0, i, ..., None] * f + scale[1, i, ..., None] * s
            for i, (f, s) in enumerate(zip(fourier, sparse, strict=True))
        ]


def oracle_concat_kernel(layer, rate=1.0):
    """SGConv Eq. 1 before normalisation: ``cat_i(decay^i k_i)`` cut to the planned length."""
    kernels = oracle_subkernels(layer, rate)
    full = torch.cat([layer.decay**i * k for i, k in enumerate(kernels)], dim=-1)
    return full[..., : max(1, round(layer.seq_len / rate))]


def conv(layer, x, k):
    return direct_conv(x, k if layer.bidirectional else k[0], layer.bidirectional)


def oracle_output(layer, x, rate=1.0):
    """The layer's output from the oracle kernels: Eq. 12 (batch or running statistics), Eq. 9 scaled
    sum, or the concat kernel; float64."""
    x = x.double()
    with torch.no_grad():
        if layer.combine == "concat":
            return conv(layer, x, oracle_concat_kernel(layer, rate) / layer.kernel_norm.double())
        out = 0
        for i, k in enumerate(oracle_subkernels(layer, rate)):
            alpha = layer.alpha[i].double()[:, None]
            if layer.branch_norm == "scale":
                out = out + alpha * conv(layer, x, k / layer.kernel_norm[i].double())
                continue
            c = conv(layer, x, k)
            norm = layer.norm
            if norm.training:
                mean, var = c.mean((0, 2))[:, None], c.var((0, 2), unbiased=False)[:, None]
            else:
                mean, var = norm.running_mean[i].double()[:, None], norm.running_var[i].double()[:, None]
            gamma, beta = norm.weight[i].double()[:, None], norm.bias[i].double()[:, None]
            out = out + alpha * ((c - mean) / torch.sqrt(var + norm.eps) * gamma + beta)
        return out


def make_layer(kernel_type, bidirectional=True, combine="sum", branch_norm="batch", seed=0):
    layer = random_mrconv(
        DIM, SEQ_LEN, KERNEL_SIZE, seed, kernel_type=kernel_type, bidirectional=bidirectional, combine=combine,
        branch_norm=branch_norm,
    )  # fmt: skip
    return layer


FORMS = [("sum", "batch"), ("sum", "scale"), ("concat", "batch")]


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_resolution_plan_matches_section_3_2(combine):
    for seq_len, kernel_size in [(100, 6), (3136, 196), (49, 28), (16384, 64), (7, 7)]:
        layer = MRConv(2, seq_len, kernel_size, kernel_type="dilated", combine=combine)
        lengths, nominal = oracle_plan(seq_len, kernel_size, combine)
        assert (layer.lengths, layer.nominal_lengths) == (lengths, nominal)
        assert [k.shape[-1] for k in layer.kernel()] == lengths


@pytest.mark.parametrize("kernel_type", sorted(KERNEL_TYPES))
@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_sub_kernels_match_oracle(kernel_type, combine):
    layer = make_layer(kernel_type, combine=combine)
    with torch.no_grad():
        for k, expected in zip(layer.kernel(), oracle_subkernels(layer), strict=True):
            assert k.shape == expected.shape
            assert rel_err(k, expected) < 1e-6


@pytest.mark.parametrize("kernel_type", sorted(KERNEL_TYPES))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("combine, norm", FORMS)
def test_every_form_matches_oracle(kernel_type, bidirectional, combine, norm):
    """Train form in train and eval mode, then the deploy form, all against the oracle kernels."""
    layer = make_layer(kernel_type, bidirectional, combine, norm).double()
    x = torch.randn(3, DIM, SEQ_LEN, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        assert rel_err(layer.train()(x), oracle_output(layer.train(), x)) < 1e-10
        layer.eval()
        expected = oracle_output(layer, x)
        assert rel_err(layer(x), expected) < 1e-10
        short = x[..., :37]
        expected_short = oracle_output(layer, short)
        assert rel_err(layer(short), expected_short) < 1e-10
        layer.reparameterize()
        assert rel_err(layer(x), expected) < 1e-10
        assert rel_err(layer(short), expected_short) < 1e-10


@pytest.mark.parametrize("rate", [2.0, 0.5, 3.0])
@pytest.mark.parametrize("combine, norm", FORMS)
def test_fourier_resampling_matches_oracle(rate, combine, norm):
    layer = make_layer("fourier", True, combine, norm).double().eval()
    for k, expected in zip(layer.kernel(rate), oracle_subkernels(layer, rate), strict=True):
        assert k.shape == expected.shape
        assert rel_err(k.detach(), expected) < 1e-10
    x = torch.randn(2, DIM, round(SEQ_LEN / rate), dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(layer(x, rate=rate), oracle_output(layer, x, rate)) < 1e-10


@pytest.mark.parametrize("kernel_type", ["sparse", "fourier_sparse"])
def test_sparse_positions_are_distinct_in_range_and_persisted(kernel_type):
    layer = make_layer(kernel_type)
    key = "kernel.positions" if kernel_type == "sparse" else "kernel.sparse.positions"
    positions = layer.state_dict()[key]
    check_sparse_positions(positions, layer.lengths, KERNEL_SIZE)
    torch.manual_seed(123)  # other positions in the fresh layer, until the state dict is loaded
    fresh = MRConv(DIM, SEQ_LEN, KERNEL_SIZE, kernel_type=kernel_type)
    assert not torch.equal(fresh.state_dict()[key], positions)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.state_dict()[key], positions)


@pytest.mark.parametrize("kernel_type", sorted(KERNEL_TYPES))
def test_concat_norm_is_the_oracle_norm_at_construction(kernel_type):
    torch.manual_seed(0)
    layer = MRConv(DIM, SEQ_LEN, KERNEL_SIZE, kernel_type=kernel_type, combine="concat", decay=0.7)
    expected = oracle_concat_kernel(layer).norm(dim=-1, keepdim=True)
    assert rel_err(layer.kernel_norm, expected) < 1e-6
    assert layer.deploy_kernel_len == SEQ_LEN


@pytest.mark.parametrize("kernel_type", sorted(KERNEL_TYPES))
def test_scale_norm_is_the_oracle_sub_kernel_norm_at_construction(kernel_type):
    torch.manual_seed(0)
    layer = MRConv(DIM, SEQ_LEN, KERNEL_SIZE, kernel_type=kernel_type, branch_norm="scale")
    for i, k in enumerate(oracle_subkernels(layer)):
        assert rel_err(layer.kernel_norm[i], k.norm(dim=-1, keepdim=True)) < 1e-6
