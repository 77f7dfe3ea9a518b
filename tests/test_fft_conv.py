import pytest
import torch

from mrconvnext import fft_conv, fft_length
from mrconvnext.layers.fft_conv import next_fast_length

from .reference import direct_conv, rel_err


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("seq_len,kernel_len", [(50, 80), (64, 64), (97, 13), (1, 5), (200, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fft_conv_matches_direct_conv(bidirectional, seq_len, kernel_len, dtype, tol):
    torch.manual_seed(seq_len + kernel_len)
    dim = 6
    u = torch.randn(3, dim, seq_len, dtype=dtype)
    shape = (2, dim, kernel_len) if bidirectional else (dim, kernel_len)
    k = torch.randn(shape, dtype=dtype)
    y = fft_conv(u, k, bidirectional=bidirectional)
    assert y.dtype == dtype and y.shape == u.shape
    k_cut = k[..., :seq_len]
    assert rel_err(y, direct_conv(u, k_cut, bidirectional)) < tol


def test_bidirectional_lag_layout():
    """k[0, j] acts at lag j, k[1, j] at lag -(j + 1): probe with an impulse."""
    seq_len, t0 = 16, 7
    u = torch.zeros(1, 1, seq_len, dtype=torch.float64)
    u[..., t0] = 1.0
    k = torch.zeros(2, 1, 4, dtype=torch.float64)
    k[0, 0, 2] = 3.0  # lag 2: y[t0 + 2]
    k[1, 0, 1] = 5.0  # lag -2: y[t0 - 2]
    y = fft_conv(u, k, bidirectional=True)[0, 0]
    expected = torch.zeros(seq_len, dtype=torch.float64)
    expected[t0 + 2] = 3.0
    expected[t0 - 2] = 5.0
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seq_len", [1, 7, 49, 196, 784, 3136, 16384])
def test_fft_length_has_no_wraparound_and_is_fast(seq_len):
    for bidirectional in (False, True):
        n = fft_length(seq_len, seq_len, bidirectional)
        assert n >= 2 * seq_len - 1
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1
    assert next_fast_length(97) == 100 and next_fast_length(128) == 128


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_in_float32_and_returns_input_dtype(dtype):
    torch.manual_seed(0)
    u = torch.randn(2, 4, 100)
    k = torch.randn(2, 4, 30)
    y = fft_conv(u.to(dtype), k, bidirectional=True)
    assert y.dtype == dtype
    ref = direct_conv(u.to(dtype).float(), k, True)
    assert rel_err(y, ref) < 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = fft_conv(u, k, bidirectional=True)
    assert y32.dtype == torch.float32
    assert rel_err(y32, direct_conv(u, k, True)) < 1e-5


def test_fft_conv_errors():
    u = torch.randn(2, 4, 10)
    with pytest.raises(ValueError, match=r"\(B, D, L\)"):
        fft_conv(u[0], torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\(D, K\)"):
        fft_conv(u, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(2, D, K\)"):
        fft_conv(u, torch.randn(4, 3), bidirectional=True)
    with pytest.raises(TypeError, match="floating-point"):
        fft_conv(u.long(), torch.randn(4, 3))
