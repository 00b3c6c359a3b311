"""The CPU's two float32 matrix-product paths for the products our layers
are built on: ATen's ``torch.mm`` (MKL in torch's x86 wheels) against
oneDNN's ``mkldnn::_linear_pointwise`` (the op torch.compile's CPU backend
uses for a Linear), the weight unpacked and packed once.

``python -m benchmarks.gemm_backends [--reps 11]`` prints a markdown table,
median ms of each product and its rate. CPU only.

Why it exists: on this project's AVX-512 AMD CPU ATen's product runs below
oneDNN's for most shapes, which sets two things: the BN-LSTM's per-step
product goes through oneDNN with the weight packed once per call
(``csrc/bn_lstm_layer.cpp``), and the ceiling of ``CosineLinear`` against
the composition of torch ops (docs/cosine_norm.md): the composition is its
matrix products plus a few memory passes, so even a layer that ran its
products on the faster path and added nothing else would gain only what
that path gains.

Shapes ``(M, K, N)``, the product ``(M, K) @ (K, N)``:

- CosineLinear(1024, 1024) at batch 4096: forward ``x @ W.T``, backward
  ``dy @ W`` and ``dy.T @ x``;
- BN-LSTM at batch 64, input 128, hidden 512, 100 steps: the per-step
  ``h @ W_hh.T``, the input projection of all steps ``x @ W_ih.T`` and the
  weight gradient ``dgates.T @ h`` over all steps.

oneDNN takes its weight as ``(N, K)`` rows, made once outside the timed
calls (for ``dy @ W`` a layer makes ``W.T`` contiguous once per step: 1 MiB
to 4 MiB here); a left factor given transposed (``dy.T @ x``) is made
contiguous inside the timed call, as a layer would have to.
"""
from __future__ import annotations

import argparse
import sys
from typing import List

import torch

from .conv_bn import median_seconds

# (label, M, K, N, left transposed): the left factor is given as the
# transpose of a contiguous (K, M) tensor, as in a weight gradient.
SHAPES = [
    ("CosineLinear forward x @ W.T", 4096, 1024, 1024, False),
    ("CosineLinear backward dy @ W", 4096, 1024, 1024, False),
    ("CosineLinear backward dy.T @ x", 1024, 4096, 1024, True),
    ("BN-LSTM step h @ W_hh.T", 64, 512, 2048, False),
    ("BN-LSTM input projection x @ W_ih.T", 6400, 128, 2048, False),
    ("BN-LSTM weight gradient dgates.T @ h", 2048, 6400, 512, True),
]


def rows(reps: int) -> List[str]:
    linear = torch.ops.mkldnn._linear_pointwise
    reorder = torch.ops.mkldnn._reorder_linear_weight
    out = ["| product | M x K x N | torch.mm ms (GFLOP/s) | oneDNN ms (GFLOP/s) | oneDNN, weight packed ms | "
           "torch.mm / oneDNN |", "|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for label, m, k, n, left_transposed in SHAPES:
        a = torch.randn(k, m, generator=g).t() if left_transposed else torch.randn(m, k, generator=g)
        b = torch.randn(k, n, generator=g)
        weight = b.t().contiguous()  # oneDNN's (N, K) weight, made once as a layer's parameter is
        packed = reorder(weight, m)
        # The three in turns (3 warm-up rounds), so a slow spell falls on all alike.
        seconds = median_seconds({"mm": lambda: torch.mm(a, b),
                                  "onednn": lambda: linear(a.contiguous(), weight, None, "none", [], ""),
                                  "packed": lambda: linear(a.contiguous(), packed, None, "none", [], "")},
                                 "cpu", 3, reps)
        mm_ms, dnn_ms, packed_ms = (seconds[k] * 1e3 for k in ("mm", "onednn", "packed"))
        torch.testing.assert_close(linear(a.contiguous(), weight, None, "none", [], ""), torch.mm(a, b),
                                   rtol=1e-4, atol=1e-3 * k ** 0.5)
        gflop = 2 * m * k * n / 1e9
        out.append(f"| {label} | {m} x {k} x {n} | {mm_ms:.3g} ({gflop / mm_ms * 1e3:.0f}) | {dnn_ms:.3g} "
                   f"({gflop / dnn_ms * 1e3:.0f}) | {packed_ms:.3g} | {mm_ms / min(dnn_ms, packed_ms):.2f}x |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gemm_backends", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=11)
    args = ap.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        print("this torch has no oneDNN: nothing to compare", file=sys.stderr)
        return 1
    print(f"# float32 matrix products on the CPU ({torch.get_num_threads()} threads, torch {torch.__version__})\n")
    print("\n".join(rows(args.reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
