"""Fused train-form MRConv with exact per-branch BatchNorm (Eq. 12) and a hand-written backward.

Notation: ``u`` is the input ``(B, D, L)``, ``kb_i`` the circular kernel buffers ``(N, D, n)``
(:func:`~mrconvnext.fft_conv.kernel_buffer`), ``U = rfft(u)``, ``K_i = rfft(kb_i)``, and the
branch outputs ``c_i = irfft(U K_i)[:L]``. With batch statistics ``mu_i, sigma_i`` over
``(B, L)`` the layer is affine in the branch outputs::

    y = sum_i s_i c_i + b,   s_i = alpha_i gamma_i / sigma_i,   b = sum_i alpha_i (beta_i - gamma_i mu_i / sigma_i)

so the forward pass is one ``rfft`` of ``u``, ``N`` ``irfft`` and one weighted sum. BatchNorm's
backward makes each branch gradient affine in ``dy`` and ``c_i`` with per-channel scalars::

    dL/dc_i = a_i dy + b_i 1_[0,L) + e_i c_i,
    a_i = s_i,  e_i = -s_i m_i / sigma_i,  b_i = -s_i (mean(dy) - mu_i m_i / sigma_i),  m_i = mean(dy c_hat_i)

hence ``dL/du = irfft(sum_i conj(K_i) FFT(dL/dc_i))[:L]``: one ``rfft`` of ``dy``, ``N`` ``rfft``
of the saved ``c_i`` and one ``irfft``. Every reduction over the batch (``sum dy c_i`` by
Parseval, the kernel gradients ``sum_b conj(U_b) FFT(dL/dc_i)_b``) is taken on spectra already
at hand, leaving one small ``irfft`` of ``(N, D, n)`` without a batch factor.
"""

from __future__ import annotations

import torch

__all__ = ["branch_bn_conv"]


def _parseval_weights(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``w_f`` with ``sum_t x[t] y[t] = (1 / n) sum_f w_f Re(X_f conj(Y_f))`` over the rfft half spectrum."""
    weights = torch.full((n // 2 + 1,), 2.0, dtype=dtype, device=device)
    weights[0] = 1.0
    if n % 2 == 0:
        weights[-1] = 1.0
    return weights / n


class _BranchBatchNormConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, kb, gamma, beta, alpha, running_mean, running_var, factor, eps):
        batch, dim, seq_len = u.shape
        num_branches, n = kb.shape[0], kb.shape[-1]
        count = batch * seq_len
        if count < 2:
            raise ValueError(f"MRConv BatchNorm needs more than 1 value per channel in training, got {tuple(u.shape)}")
        u_f = torch.fft.rfft(u, n=n)  # (B, D, F)
        k_f = torch.fft.rfft(kb, n=n)  # (N, D, F)
        branches = u.new_empty(num_branches, batch, dim, seq_len)
        mean = u.new_empty(num_branches, dim)
        var = u.new_empty(num_branches, dim)
        for i in range(num_branches):
            branches[i] = torch.fft.irfft(u_f * k_f[i], n=n)[..., :seq_len]
            var[i], mean[i] = torch.var_mean(branches[i], dim=(0, 2), correction=0)
        inv_std = torch.rsqrt(var + eps)
        scale = alpha * gamma * inv_std  # s_i
        shift = (alpha * (beta - gamma * mean * inv_std)).sum(0)
        y = torch.addcmul(shift[:, None], branches[0], scale[0, :, None])
        for i in range(1, num_branches):
            y.addcmul_(branches[i], scale[i, :, None])
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), factor)
        ctx.save_for_backward(u_f, k_f, branches, mean, inv_std, scale, gamma, beta, alpha)
        ctx.shape = (batch, dim, seq_len, n)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u_f, k_f, branches, mean, inv_std, scale, gamma, beta, alpha = ctx.saved_tensors
        batch, dim, seq_len, n = ctx.shape
        count = batch * seq_len
        grad_y = grad_y.contiguous()
        real_dtype = grad_y.dtype
        dy_f = torch.fft.rfft(grad_y, n=n)  # (B, D, F)
        window_f = torch.fft.rfft(grad_y.new_ones(seq_len), n=n)  # spectrum of 1_[0, L)
        weights = _parseval_weights(n, real_dtype, grad_y.device)
        cross = (dy_f.conj() * u_f).sum(0)  # sum_b conj(DY_b) U_b, (D, F)
        sum_dy = grad_y.sum((0, 2))  # (D,)
        dot = ((cross * k_f).real * weights).sum(-1)  # sum_{b,t} dy c_i, (N, D)
        dot_hat = (dot - mean * sum_dy) * inv_std  # sum dy c_hat_i
        m_hat = dot_hat / count
        coef_dy = scale
        coef_c = -scale * m_hat * inv_std
        coef_one = -scale * (sum_dy / count - mean * m_hat * inv_std)

        k_conj = k_f.conj()
        grad_u_f = dy_f * (coef_dy[..., None] * k_conj).sum(0) + window_f * (coef_one[..., None] * k_conj).sum(0)
        grad_kb_f = coef_dy[..., None] * cross.conj() + coef_one[..., None] * (u_f.sum(0).conj() * window_f)
        u_conj = u_f.conj()
        for i in range(branches.shape[0]):
            c_f = torch.fft.rfft(branches[i], n=n)  # (B, D, F)
            grad_u_f.addcmul_(c_f, coef_c[i, :, None] * k_conj[i])
            grad_kb_f[i] += (u_conj * c_f).sum(0) * coef_c[i, :, None]
        grad_u = torch.fft.irfft(grad_u_f, n=n)[..., :seq_len] if ctx.needs_input_grad[0] else None
        grad_kb = torch.fft.irfft(grad_kb_f, n=n) if ctx.needs_input_grad[1] else None
        grad_gamma = alpha * dot_hat
        grad_beta = alpha * sum_dy
        grad_alpha = gamma * dot_hat + beta * sum_dy
        return grad_u, grad_kb, grad_gamma, grad_beta, grad_alpha, None, None, None, None


def branch_bn_conv(
    u: torch.Tensor,
    kb: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    factor: float,
    eps: float,
) -> torch.Tensor:
    """Training-mode Eq. 12: ``sum_i alpha_i BN_i(kb_i * u)`` with batch statistics.

    ``u``: ``(B, D, L)``; ``kb``: circular kernel buffers ``(N, D, n)``; ``gamma, beta, alpha``:
    ``(N, D)``. ``running_mean`` / ``running_var`` ``(N, D)`` are updated in place with
    momentum ``factor`` (unbiased variance, as ``F.batch_norm``). Returns ``(B, D, L)``.
    """
    return _BranchBatchNormConv.apply(u.contiguous(), kb, gamma, beta, alpha, running_mean, running_var, factor, eps)
