"""Layer self-check: build an MRConv per kernel type, reparameterize it, report error and timing.

``python -m mrconvnext.selfcheck``
"""

from __future__ import annotations

import time

import torch

from .mrconv import MRConv


def _randomize_(layer: MRConv) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 2 else 0.0))
        if hasattr(layer, "norm"):
            layer.norm.running_mean.normal_()
            layer.norm.running_var.uniform_(0.5, 2.0)


def _time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    batch, dim, seq_len = 8, 96, 3136
    x = torch.randn(batch, dim, seq_len)
    print(f"MRConv self-check: B={batch}, D={dim}, L={seq_len}, kernel_size=196, bidirectional")
    print(f"{'kernel_type':<16}{'N':>3}{'max rel err':>14}{'train ms':>11}{'deploy ms':>11}{'speedup':>9}")
    for kernel_type in ("dense", "dilated", "fourier", "sparse", "fourier_sparse"):
        layer = MRConv(dim, seq_len, 196, kernel_type=kernel_type).eval()
        _randomize_(layer)
        train_ms = _time(lambda layer=layer: layer(x)) * 1e3
        y_train = layer(x)
        layer.reparameterize()
        deploy_ms = _time(lambda layer=layer: layer(x)) * 1e3
        err = ((layer(x) - y_train).abs().max() / y_train.abs().max()).item()
        print(
            f"{kernel_type:<16}{len(layer.lengths):>3}{err:>14.2e}{train_ms:>11.1f}{deploy_ms:>11.1f}"
            f"{train_ms / deploy_ms:>8.2f}x"
        )
        if err > 1e-5:
            raise SystemExit(f"reparameterization error {err:.2e} exceeds 1e-5 for {kernel_type}")


if __name__ == "__main__":
    main()
