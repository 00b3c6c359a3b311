"""Weight-normalized layers at module level: ``torchnorm.weight_norm``
against ``torch.nn.utils.parametrizations.weight_norm`` on the same layer,
weights and input, in the same run.

``python -m benchmarks.weight_norm [--device cpu|cuda] [--quick] [--out results.md]``
(also run by ``python -m benchmarks`` as the suite ``weight_norm``). Writes a
markdown report and a CSV of the same rows beside it.

Layers (float32, dim=0, the default: one norm per output unit):

- ``Conv2d(256, 256, 3, padding=1)`` on (8, 256, 14, 14): a ResNet stage-4
  sized convolution at a small training batch;
- ``Linear(4096, 4096)`` on (256, 4096): a large fully connected layer at
  batch 256 (its weight, 64 MiB, is as big as the activations).

Rows per layer: ``forward`` (the parametrization and the layer, grad
enabled, as in training), ``forward+backward`` (the training step:
``torch.autograd.grad`` of the output for the input, g, v and the bias;
no ``.grad`` accumulation) and ``weight only`` (the parametrization alone,
forward and backward: ``module.weight`` and the gradients of g and v for a
given gradient of the weight: the part the two implementations differ in,
without the convolution's or matmul's time around it).

Goal: torchnorm's time at most 1.00x torch's on each training step (not
slower). The two are timed in turns (:func:`benchmarks.conv_bn.timed_rounds`),
so a slow spell of a shared machine lands on both; the report gives each
median and the median of the per-round ratios.
"""
from __future__ import annotations

import copy
import statistics
import sys
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from . import harness
from .conv_bn import iqr, median_cell, ratio_suite_main, report_title, timed_rounds, verdict, write_report
from .harness import release_memory

# name -> (label, layer factory, input shape)
FULL_LAYERS = {
    "conv2d": ("Conv2d(256, 256, 3, padding=1)", lambda: nn.Conv2d(256, 256, 3, padding=1), (8, 256, 14, 14)),
    "linear": ("Linear(4096, 4096)", lambda: nn.Linear(4096, 4096), (256, 4096)),
}
QUICK_LAYERS = {
    "conv2d": ("Conv2d(8, 8, 3, padding=1)", lambda: nn.Conv2d(8, 8, 3, padding=1), (2, 8, 6, 6)),
    "linear": ("Linear(64, 64)", lambda: nn.Linear(64, 64), (8, 64)),
}

GOAL = 1.0  # torchnorm's time at most this multiple of torch's
BASELINE = "torch"
PROVIDERS = ("torch", "torchnorm")
LABELS = {"torch": "torch parametrization", "torchnorm": "torchnorm.weight_norm"}
MODES = ("forward", "forward+backward", "weight only")


def models(make: Callable[[], nn.Module], device: str) -> Dict[str, nn.Module]:
    """The layer weight-normalized by each provider, from the same seeded weights."""
    import torchnorm

    torch.manual_seed(0)
    base = make().to(device)
    return {"torch": nn.utils.parametrizations.weight_norm(copy.deepcopy(base)),
            "torchnorm": torchnorm.weight_norm(copy.deepcopy(base))}


def _steps(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, dw: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """The timed calls of one model."""
    params = list(model.parameters())
    targets = [x] + params
    g_and_v = [model.parametrizations.weight.original0, model.parametrizations.weight.original1]

    def forward():
        model(x)

    def full():
        torch.autograd.grad(model(x), targets, dy)

    def weight_only():
        torch.autograd.grad(model.weight, g_and_v, dw)

    return {"forward": forward, "forward+backward": full, "weight only": weight_only}


def _time_layer(label: str, make: Callable[[], nn.Module], shape: tuple, device: str, warmup: int,
                reps: int, failures: List[Tuple[str, str]]) -> List[dict]:
    """The rows of one layer (one per mode)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    calls = {}
    for provider, model in models(make, device).items():
        try:
            with torch.no_grad():
                dy = torch.randn(model(x).shape, generator=gen).to(device)
                dw = torch.randn(model.weight.shape, generator=gen).to(device)
            fns = _steps(model, x, dy, dw)
            fns["forward+backward"]()  # one untimed call: errors surface here
            calls[provider] = fns
        except Exception as e:  # noqa: BLE001 - report it, time the others
            harness.log(f"weight_norm {provider} {label} on {device}: FAILED ({type(e).__name__}: {e})")
            failures.append((f"weight_norm {provider} {label} {device}", f"{type(e).__name__}: {e}"))
    shape_label = "x".join(map(str, shape))
    rows = []
    for mode in MODES:
        harness.log(f"weight_norm {mode} ({label} on {shape_label} float32, {device}): timing {reps} calls each, "
                    f"{', '.join(calls)} in turn")
        rounds = timed_rounds({p: fns[mode] for p, fns in calls.items()}, device, warmup, reps)
        ms = {p: statistics.median(t) * 1e3 for p, t in rounds.items()}
        row = {"layer": label, "input": shape_label, "mode": mode, "dtype": "float32",
               "device": harness.device_name(device), "threads": torch.get_num_threads(),
               "torch_version": torch.__version__}
        for p in PROVIDERS:
            row[f"{p}_ms"] = f"{ms[p]:.4g}" if p in ms else ""
            row[f"{p}_iqr_ms"] = f"{iqr(rounds[p]) * 1e3:.3g}" if p in ms else ""
        if "torchnorm" in ms and BASELINE in ms:
            ratio = ms["torchnorm"] / ms[BASELINE]
            # The calls of a round ran back to back: their ratio is free of the
            # machine's slower drifts, which move both medians.
            paired = statistics.median(a / b for a, b in zip(rounds["torchnorm"], rounds[BASELINE]))
            row["ratio"], row["ratio_per_round"] = f"{ratio:.4g}", f"{paired:.4g}"
            row["goal"] = verdict(ratio, GOAL) if mode == "forward+backward" else ""
        else:
            row["ratio"] = row["ratio_per_round"] = row["goal"] = ""
        harness.log("  " + ", ".join(f"{p} {row[f'{p}_ms']} ms" for p in calls)
                    + f"; torchnorm / torch: {row['ratio']}x")
        rows.append(row)
    del calls, x
    return rows


def run(device: str, quick: bool, out_md: str) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """Time the rows on ``device``, write the report; return ``(rows, failures)``.
    A provider that fails to run is a failure, reported, its columns left empty."""
    layers = QUICK_LAYERS if quick else FULL_LAYERS
    warmup, reps = (1, 2) if quick else ((5, 20) if device == "cuda" else (2, 15))
    failures, rows = [], []
    for label, make, shape in layers.values():
        rows += _time_layer(label, make, shape, device, warmup, reps, failures)
        release_memory(device)  # this layer's tensors, models and graphs go before the next
    write(rows, out_md, quick)
    harness.log(f"weight_norm: wrote {out_md}")
    return rows, failures


COLUMNS = (["layer", "input", "mode", "dtype", "device", "threads", "torch_version"]
           + [f"{p}_{c}" for p in PROVIDERS for c in ("ms", "iqr_ms")] + ["ratio", "ratio_per_round", "goal"])


def write(rows: List[dict], out_md: str, quick: bool = False) -> None:
    """The report: a CSV of the rows (COLUMNS) and a markdown table beside it."""
    lines = [report_title("Weight normalization", rows, quick), "",
             "float32, dim=0; torchnorm.weight_norm against torch.nn.utils.parametrizations.weight_norm on the "
             "same layer, weights and input. forward+backward is the training step: `torch.autograd.grad` of the "
             "output for the input, g, v and the bias; weight only is the parametrization alone (module.weight, "
             "then the gradients of g and v). Median ms per call (interquartile range); the ratio is torchnorm's "
             "time over torch's, from the medians and, in brackets, the median of the per-round ratios (the two "
             f"timed in turns). Goal: at most {GOAL:.2f}x torch's time on the training step.", "",
             "| layer | input | mode | " + " | ".join(f"{LABELS[p]} ms" for p in PROVIDERS)
             + " | torchnorm / torch | goal |",
             "|---" * (5 + len(PROVIDERS)) + "|"]

    for r in rows:
        ratio = f"{float(r['ratio']):.3f}x ({float(r['ratio_per_round']):.3f}x)" if r["ratio"] else "n/a"
        lines.append(f"| {r['layer']} | {r['input']} | {r['mode']} | "
                     + " | ".join(median_cell(r, p) for p in PROVIDERS) + f" | {ratio} | {r['goal']} |")
    write_report(rows, COLUMNS, out_md, lines)


def main(argv=None) -> int:
    return ratio_suite_main("python -m benchmarks.weight_norm", __doc__, "weight-norm", run, argv)


if __name__ == "__main__":
    sys.exit(main())
