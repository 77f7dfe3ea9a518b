"""Layer self-check: every kernel type's reparameterization and FFT convolution against a direct convolution.

``python -m mrconvnext.selfcheck`` (``make selfcheck``). For each kernel type an MRConv with random parameters
and BatchNorm statistics is evaluated in its train form (eval mode), reparameterized (paper Eqs. 8, 13, 18)
and evaluated again; both outputs are compared with a float64 direct convolution (``conv1d``) of the input
with the merged kernel. Ends with ``PASS`` (exit status 0) or ``FAIL`` naming the kernel types over the
tolerance (exit status 1). Timing is the benchmarks' job (``make benchmark``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .layers.kernels import KERNEL_TYPES
from .layers.mrconv import MRConv
from .utils.cli import HelpFormatter

TOLERANCE = 1e-5  # max |error| / max |output| in float32


def _randomize_(layer: MRConv) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 2 else 0.0))
        layer.norm.running_mean.normal_()
        layer.norm.running_var.uniform_(0.5, 2.0)


def direct_conv(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_j k0[j] x[t - j] + sum_j k1[j] x[t + 1 + j] + b`` by ``conv1d`` in float64 (bidirectional)."""
    x, kernel = x.double(), kernel.double()
    seq_len, dim = x.shape[-1], x.shape[1]
    causal, anticausal = kernel[0, :, :seq_len], kernel[1, :, : seq_len - 1]
    padded = F.pad(x, (causal.shape[-1] - 1, 0))
    y = F.conv1d(padded, causal.flip(-1)[:, None], groups=dim)
    if anticausal.shape[-1]:
        y = y + F.conv1d(F.pad(x[..., 1:], (0, anticausal.shape[-1])), anticausal[:, None], groups=dim)
    return y + bias.double()[:, None]


def create_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> int:
    create_parser().parse_args(argv)
    torch.manual_seed(0)
    batch, dim, seq_len, kernel_size = 2, 48, 784, 49  # MRConvNeXt-T stage 2: L = 28 x 28
    x = torch.randn(batch, dim, seq_len)
    print(f"MRConv self-check: B={batch}, D={dim}, L={seq_len}, kernel_size={kernel_size}, bidirectional")
    print(f"{'kernel_type':<16}{'N':>3}{'train form err':>16}{'deploy form err':>17}")
    failed = []
    for kernel_type in sorted(KERNEL_TYPES):
        layer = MRConv(dim, seq_len, kernel_size, kernel_type=kernel_type).eval()
        _randomize_(layer)
        reference = direct_conv(x, *layer.merged_kernel())
        scale = reference.abs().max()
        train_err = ((layer(x).double() - reference).abs().max() / scale).item()
        layer.reparameterize()
        deploy_err = ((layer(x).double() - reference).abs().max() / scale).item()
        print(f"{kernel_type:<16}{len(layer.lengths):>3}{train_err:>16.2e}{deploy_err:>17.2e}")
        if max(train_err, deploy_err) > TOLERANCE:
            failed.append(kernel_type)
    if failed:
        print(f"FAIL: {', '.join(failed)} above the tolerance {TOLERANCE:g}")
        return 1
    print(f"PASS: every kernel type within {TOLERANCE:g} of the float64 direct convolution, in both forms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
