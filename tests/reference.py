"""Independent references for the tests: direct ``conv1d`` in float64, no FFTs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def direct_conv(u: torch.Tensor, k: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """``y[t] = sum_j kc[j] u[t-j] + sum_j ka[j] u[t+1+j]`` with ``conv1d`` (cross-correlation)."""
    u = u.double()
    k = k.double()
    seq_len, dim = u.shape[-1], u.shape[1]
    causal = k[0] if bidirectional else k
    width = causal.shape[-1]
    y = F.conv1d(F.pad(u, (width - 1, 0)), causal.flip(-1).unsqueeze(1), groups=dim)
    if bidirectional:
        anti = k[1]
        taps = anti.shape[-1]
        weight = F.pad(anti, (1, 0)).unsqueeze(1)  # w[m] = ka[m - 1]
        y = y + F.conv1d(F.pad(u, (0, taps)), weight, groups=dim)
    return y[..., :seq_len]


def branch_reference(layer, u: torch.Tensor) -> torch.Tensor:
    """Eval-mode Eq. 12 computed branch by branch with ``direct_conv`` and explicit BN."""
    out = 0
    kernels = layer.kernel()
    for i, k in enumerate(kernels):
        c = direct_conv(u, k if layer.bidirectional else k[0], layer.bidirectional)
        mean = layer.norm.running_mean[i].double()[:, None]
        var = layer.norm.running_var[i].double()[:, None]
        gamma = layer.norm.weight[i].double()[:, None]
        beta = layer.norm.bias[i].double()[:, None]
        normed = (c - mean) / torch.sqrt(var + layer.norm.eps) * gamma + beta
        out = out + layer.alpha[i].double()[:, None] * normed
    return out


def randomize_(layer) -> None:
    """Random, non-trivial parameters and BN statistics (never zeros or identity)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.ndim >= 1:
                p.copy_(torch.randn_like(p) * 0.5 + (0.7 if "scale" in name or "alpha" in name else 0.0))
        if hasattr(layer, "norm"):
            layer.norm.weight.copy_(torch.rand_like(layer.norm.weight) * 1.5 + 0.25)
            layer.norm.running_mean.normal_(0.0, 0.5)
            layer.norm.running_var.uniform_(0.3, 3.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
