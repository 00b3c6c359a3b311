"""Cosine Normalization layers: ``torchnorm.nn.CosineConv2d`` and
``torchnorm.nn.CosineLinear`` against the composition of torch ops a user
would write for the same layer (``torchnorm.reference.cosine_conv2d_composition``
and ``cosine_linear_composition``: the convolution or matmul, the patch norms
by a convolution of x^2 with ones (the row norms for the linear layer), the
weight norms, and the division), same parameters, same input, same run.

``python -m benchmarks.cosine_norm [--device cpu|cuda] [--quick] [--out results.md]``
(also run by ``python -m benchmarks`` as the suite ``cosine_norm``). Writes a
markdown report and a CSV of the same rows beside it.

Rows: ``CosineConv2d(64, 64, 3, padding=1)`` at input (32, 64, 56, 56) and
``CosineLinear(1024, 1024)`` at batch 4096, float32, default arguments (no
bias, eps 1e-8); forward and forward+backward (a training step's:
``torch.autograd.grad`` of the output for the input and the weight), the input
and the weight requiring grad in both. The composition uses ATen's convolution /
matmul for the dot product; so does torchnorm's convolution, while its linear
layer runs ``x @ W.T`` and ``dy @ W`` through oneDNN on the CPU in float32
(``csrc/common/cpu_products.h``; ``dy.T @ x`` stays ATen's). A third model,
ATen's dot product alone (``F.conv2d`` / ``F.linear``), gives the ceiling:
composition time over its time is the speedup of a layer that added nothing
to ATen's dot product (the linear layer, with the faster product, can pass
it).

Goal: torchnorm at least 1.3x faster than the composition (composition time
over torchnorm time). The two are timed in turns
(:func:`benchmarks.conv_bn.timed_rounds`), so a slow spell of a shared machine
lands on all alike; the report gives each median and the speedup from the
medians and, in brackets, the median of the per-round speedups.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Tuple

import torch

from . import harness
from .conv_bn import (checked_calls, median_cell, median_columns, per_round_ratio, ratio_suite_main, report_title,
                      timed_rounds, write_report)
from .harness import release_memory

# (layer, input shape, constructor arguments)
FULL_CASES = (("CosineConv2d", (32, 64, 56, 56), (64, 64, 3), {"padding": 1}),
              ("CosineLinear", (4096, 1024), (1024, 1024), {}))
QUICK_CASES = (("CosineConv2d", (2, 8, 8, 8), (8, 8, 3), {"padding": 1}),
               ("CosineLinear", (16, 32), (32, 32), {}))

# Composition time over torchnorm time, at least.
GOAL_SPEEDUP = 1.3

# "dot": the layer's convolution / matmul alone (ATen's, with autograd), the
# time no implementation built on ATen's product can beat: composition / dot
# is the speedup's ceiling for those.
PROVIDERS = ("composition", "torchnorm", "dot")
MODES = ("forward", "forward+backward")


def speedup_verdict(speedup: float, goal: float = GOAL_SPEEDUP) -> str:
    """A speedup against its goal (at least `goal`), for the report."""
    return f"{'met' if speedup >= goal else 'NOT met'} (goal >= {goal:.2f}x)"


class Composition(torch.nn.Module):
    """A cosine layer's parameters through torch ops: the composition a user
    would write (``dot_only=False``), or its dot product alone."""

    def __init__(self, layer: torch.nn.Module, dot_only: bool = False) -> None:
        super().__init__()
        self.layer, self.dot_only = layer, dot_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchnorm import nn, reference

        m = self.layer
        if isinstance(m, nn.CosineConv2d):
            if self.dot_only:
                return torch.nn.functional.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
            return reference.cosine_conv2d_composition(x, m.weight, m.bias, m.stride, m.padding, m.dilation,
                                                       m.groups, m.eps)
        if self.dot_only:
            return torch.nn.functional.linear(x, m.weight, m.bias)
        return reference.cosine_linear_composition(x, m.weight, m.bias, m.eps)


def layers(name: str, args: tuple, kwargs: dict, device: str) -> Dict[str, torch.nn.Module]:
    """torchnorm's layer (seeded), and the composition and the dot product over the same parameters."""
    import torchnorm.nn

    torch.manual_seed(0)
    layer = getattr(torchnorm.nn, name)(*args, **kwargs).to(device)
    return {"composition": Composition(layer), "torchnorm": layer, "dot": Composition(layer, dot_only=True)}


def _steps(model: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """The timed calls: the forward, and forward + the gradients of the input and the weight."""
    targets = [x] + list(model.parameters())

    def forward():
        model(x)

    def full():
        torch.autograd.grad(model(x), targets, dy)

    return {"forward": forward, "forward+backward": full}


def _time_case(case: tuple, device: str, warmup: int, reps: int, failures: List[Tuple[str, str]]) -> List[dict]:
    name, shape, args, kwargs = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    models = layers(name, args, kwargs, device)
    with torch.no_grad():
        dy = torch.randn(models["dot"](x).shape, generator=gen).to(device)
    label = "x".join(map(str, shape))
    calls = checked_calls("cosine_norm", f"{name} {label}", device,
                          {p: (lambda m=m: _steps(m, x, dy)) for p, m in models.items()}, failures)
    rows = []
    for mode in MODES:
        harness.log(f"cosine_norm {name} {mode} ({label} float32, {device}): timing {reps} calls each, "
                    f"{', '.join(calls)} in turn")
        rounds = timed_rounds({p: fns[mode] for p, fns in calls.items()}, device, warmup, reps)
        row = {"benchmark": f"{name} {label} {mode}", "layer": name, "mode": mode, "shape": label,
               "dtype": "float32", "device": harness.device_name(device), "threads": torch.get_num_threads(),
               "torch_version": torch.__version__}
        ms = median_columns(row, rounds, PROVIDERS)
        row.update(speedup="", speedup_per_round="", goal="", ceiling="")
        if "composition" in ms and "torchnorm" in ms:
            speedup = ms["composition"] / ms["torchnorm"]
            row.update(speedup=f"{speedup:.4g}", goal=speedup_verdict(speedup),
                       speedup_per_round=f"{per_round_ratio(rounds, 'composition', 'torchnorm'):.4g}")
        if "composition" in ms and "dot" in ms:
            row["ceiling"] = f"{ms['composition'] / ms['dot']:.4g}"
        harness.log("  " + ", ".join(f"{p} {row[f'{p}_ms']} ms" for p in calls)
                    + (f"; speedup {row['speedup']}x (ceiling {row['ceiling']}x)" if row["speedup"] else ""))
        rows.append(row)
    del calls, x, dy, models
    return rows


def run(device: str, quick: bool, out_md: str) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """Time the rows on ``device``, write the report; return ``(rows, failures)``."""
    cases = QUICK_CASES if quick else FULL_CASES
    warmup, reps = (1, 2) if quick else ((5, 20) if device == "cuda" else (2, 11))
    failures, rows = [], []
    for case in cases:
        rows += _time_case(case, device, warmup, reps, failures)
        release_memory(device)  # this case's tensors and graphs go before the next
    write(rows, out_md, quick)
    harness.log(f"cosine_norm: wrote {out_md}")
    return rows, failures


COLUMNS = (["benchmark", "layer", "mode", "shape", "dtype", "device", "threads", "torch_version"]
           + [f"{p}_{c}" for p in PROVIDERS for c in ("ms", "iqr_ms")]
           + ["speedup", "speedup_per_round", "goal", "ceiling"])


def write(rows: List[dict], out_md: str, quick: bool = False) -> None:
    """The report: a CSV of the rows (COLUMNS) and a markdown table beside it."""
    lines = [report_title("Cosine Normalization layers", rows, quick), "",
             "float32, default arguments (no bias, eps 1e-8), input and weight requiring grad; forward+backward is "
             "`torch.autograd.grad` of the output for the input and the weight. Median ms per call (interquartile "
             "range). The composition is the torch ops a user would write for the same layer "
             "(`torchnorm.reference.cosine_*_composition`: the conv / matmul, the patch norms by a conv of x^2 "
             "with ones, the weight norms, the division); \"dot alone\" is ATen's conv / matmul by itself, "
             "which the composition builds on (torchnorm's linear layer runs its forward and dy @ W products "
             "through oneDNN on the CPU, so it can beat it). Speedup: composition time over torchnorm's, from the medians and, in "
             "brackets, the median of the per-round ratios (the three timed in turns); ceiling: composition "
             "time over the dot product's, the speedup of a layer that added nothing to ATen's product. "
             f"Goal: at least {GOAL_SPEEDUP:.2f}x.", "",
             "| layer | input | mode | composition ms | torchnorm ms | dot alone ms | speedup | ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = (f"{float(r['speedup']):.2f}x ({float(r['speedup_per_round']):.2f}x): {r['goal']}"
                   if r["speedup"] else "n/a")
        ceiling = f"{float(r['ceiling']):.2f}x" if r["ceiling"] else "n/a"
        lines.append(f"| {r['layer']} | {r['shape']} | {r['mode']} | {median_cell(r, 'composition')} | "
                     f"{median_cell(r, 'torchnorm')} | {median_cell(r, 'dot')} | {speedup} | {ceiling} |")
    write_report(rows, COLUMNS, out_md, lines)


def main(argv=None) -> int:
    return ratio_suite_main("python -m benchmarks.cosine_norm", __doc__, "cosine-norm", run, argv)


if __name__ == "__main__":
    sys.exit(main())
