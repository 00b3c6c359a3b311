"""Small-batch norms at module level: ``torchnorm.nn.OnlineNorm2d`` and
``torchnorm.nn.StreamingNorm2d`` against torchnorm's own
``torchnorm.nn.BatchNorm2d`` on the same input, in the same run.

``python -m benchmarks.small_batch [--device cpu|cuda] [--quick] [--out results.md]``
(also run by ``python -m benchmarks`` as the suite ``small_batch``). Writes a
markdown report and a CSV of the same rows beside it.

Rows: forward and forward+backward, float32, training mode, at
(32, 64, 56, 56) and (256, 64, 28, 28) (both 6.4 M elements, 51 MB a
tensor). Every call runs with the input and the parameters requiring grad, as
in a training step; forward+backward takes ``torch.autograd.grad`` of the
output with respect to the input and the parameters (no ``.grad``
accumulation is timed). The models:

- ``batch_norm``: ``torchnorm.nn.BatchNorm2d(64)`` (batch statistics, running
  statistics updated): the baseline;
- ``online_norm``: ``OnlineNorm2d(64, ecm=None, affine=True)``: the
  normalization and its affine, the like of BatchNorm2d;
- ``online_norm_ls``: ``OnlineNorm2d(64)`` with the default error
  compensation ``ecm="ls"`` (layer scaling: one more per-sample RMS norm over
  C, H, W), as the module is used by default;
- ``streaming_norm``: ``StreamingNorm2d(64)`` (defaults alpha=(0.5, 0.5),
  k1=0.7), when torchnorm has it; each timed call ends with its
  ``weight_update()``, which a training loop calls after every optimizer step.

Goal: each at most 1.5x BatchNorm2d's time on the same shape and mode. The
models are timed in turns (:func:`benchmarks.conv_bn.timed_rounds`), so a
slow spell of a shared machine lands on all of them alike; the report gives
each median and the median of the per-round ratios. Between shapes every
tensor, model and graph of the shape is dropped and freed heap handed back
(``malloc_trim``), so the suite's memory is that of its largest shape.
"""
from __future__ import annotations

import statistics
import sys
from typing import Callable, Dict, List, Tuple

import torch

from . import harness
from .conv_bn import iqr, median_cell, ratio_suite_main, report_title, timed_rounds, verdict, write_report


FULL_SHAPES = ((32, 64, 56, 56), (256, 64, 28, 28))
QUICK_SHAPES = ((2, 8, 8, 8), (8, 8, 4, 4))

# Each model's time at most this multiple of BatchNorm2d's.
GOAL_VS_BATCH_NORM = 1.5

BASELINE = "batch_norm"
PROVIDERS = ("batch_norm", "online_norm", "online_norm_ls", "online_norm_no_affine", "streaming_norm")
LABELS = {"batch_norm": "BatchNorm2d", "online_norm": "OnlineNorm2d (ecm=None)",
          "online_norm_ls": 'OnlineNorm2d (ecm="ls")', "online_norm_no_affine": "OnlineNorm2d (ecm=None, affine=False)",
          "streaming_norm": "StreamingNorm2d"}
MODES = ("forward", "forward+backward")
NOT_AVAILABLE = "not available"


def streaming_available() -> bool:
    """Whether this torchnorm has StreamingNorm2d (it came after OnlineNorm2d)."""
    import torchnorm.nn

    return hasattr(torchnorm.nn, "StreamingNorm2d")


def models(channels: int, device: str) -> Dict[str, torch.nn.Module]:
    """The models, in training mode, seeded; StreamingNorm2d only where torchnorm has it."""
    import torchnorm.nn

    torch.manual_seed(0)
    out = {"batch_norm": torchnorm.nn.BatchNorm2d(channels),
           "online_norm": torchnorm.nn.OnlineNorm2d(channels, ecm=None, affine=True),
           "online_norm_ls": torchnorm.nn.OnlineNorm2d(channels),
           "online_norm_no_affine": torchnorm.nn.OnlineNorm2d(channels, ecm=None, affine=False)}
    if streaming_available():
        out["streaming_norm"] = torchnorm.nn.StreamingNorm2d(channels)
    return {name: m.to(device).train() for name, m in out.items()}


def _steps(model: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """The timed calls of a model: its training forward, and forward + gradients
    (each followed by ``weight_update()`` where the model has one)."""
    targets = [x] + list(model.parameters())
    update = getattr(model, "weight_update", None) or (lambda: None)

    def forward():
        model(x)
        update()

    def full():
        torch.autograd.grad(model(x), targets, dy)
        update()

    return {"forward": forward, "forward+backward": full}


def _time_shape(shape: tuple, device: str, warmup: int, reps: int,
                failures: List[Tuple[str, str]]) -> List[dict]:
    """The rows of one shape (one per mode)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(device)
    label = "x".join(map(str, shape))
    calls = {}
    for name, model in models(shape[1], device).items():
        try:
            fns = _steps(model, x, dy)
            fns["forward+backward"]()  # one untimed call: errors surface here
            calls[name] = fns
        except Exception as e:  # noqa: BLE001 - report it, time the others
            harness.log(f"small_batch {name} {label} on {device}: FAILED ({type(e).__name__}: {e})")
            failures.append((f"small_batch {name} {label} {device}", f"{type(e).__name__}: {e}"))
    rows = []
    for mode in MODES:
        harness.log(f"small_batch {mode} ({label} float32, {device}): timing {reps} calls each, "
                    f"{', '.join(calls)} in turn")
        rounds = timed_rounds({name: fns[mode] for name, fns in calls.items()}, device, warmup, reps)
        ms = {name: statistics.median(t) * 1e3 for name, t in rounds.items()}
        row = {"benchmark": f"{label} {mode}", "mode": mode, "shape": label, "dtype": "float32",
               "device": harness.device_name(device), "threads": torch.get_num_threads(),
               "torch_version": torch.__version__}
        for name in PROVIDERS:
            missing = NOT_AVAILABLE if name == "streaming_norm" and not streaming_available() else ""
            row[f"{name}_ms"] = f"{ms[name]:.4g}" if name in ms else missing
            row[f"{name}_iqr_ms"] = f"{iqr(rounds[name]) * 1e3:.3g}" if name in ms else ""
            if name == BASELINE:
                continue
            if name in ms and BASELINE in ms:
                ratio = ms[name] / ms[BASELINE]
                # The calls of a round ran back to back: their ratio is free of
                # the machine's slower drifts, which move both medians.
                paired = statistics.median(a / b for a, b in zip(rounds[name], rounds[BASELINE]))
                row[f"{name}_vs_bn"], row[f"{name}_vs_bn_per_round"] = f"{ratio:.4g}", f"{paired:.4g}"
                row[f"{name}_goal"] = verdict(ratio, GOAL_VS_BATCH_NORM)
            else:
                row[f"{name}_vs_bn"] = row[f"{name}_vs_bn_per_round"] = ""
                row[f"{name}_goal"] = missing
        harness.log("  " + ", ".join(f"{n} {row[f'{n}_ms']} ms" for n in calls) + "; vs BatchNorm2d: "
                    + ", ".join(f"{n} {row[f'{n}_vs_bn']}x" for n in calls if n != BASELINE))
        rows.append(row)
    del calls, x, dy
    return rows


def run(device: str, quick: bool, out_md: str) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """Time the rows on ``device``, write the report; return ``(rows, failures)``.

    A model that fails to run is a failure, reported, its columns left empty;
    the others are still timed. StreamingNorm2d missing from this torchnorm is
    no failure: its columns say "not available".
    """
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    warmup, reps = (1, 2) if quick else ((5, 20) if device == "cuda" else (2, 15))
    if not streaming_available():
        harness.log("small_batch: torchnorm.nn has no StreamingNorm2d: its rows say 'not available'")
    failures, rows = [], []
    for shape in shapes:
        rows += _time_shape(shape, device, warmup, reps, failures)
        harness.release_memory(device)  # this shape's tensors, models and graphs go before the next shape
    write(rows, out_md, quick)
    harness.log(f"small_batch: wrote {out_md}")
    return rows, failures


COLUMNS = (["benchmark", "mode", "shape", "dtype", "device", "threads", "torch_version"]
           + [f"{n}_{c}" for n in PROVIDERS for c in ("ms", "iqr_ms")]
           + [f"{n}_{c}" for n in PROVIDERS if n != BASELINE for c in ("vs_bn", "vs_bn_per_round", "goal")])


def write(rows: List[dict], out_md: str, quick: bool = False) -> None:
    """The report: a CSV of the rows (COLUMNS) and a markdown table beside it."""
    others = [n for n in PROVIDERS if n != BASELINE]
    lines = [report_title("Small-batch norms", rows, quick), "",
             "float32, training mode, input and parameters requiring grad; forward+backward is "
             "`torch.autograd.grad` of the output for the input and the parameters. Median ms per call "
             "(interquartile range); ratios are each model's time over torchnorm's BatchNorm2d on the same "
             "shape and mode, in the same run (the models timed in turns), from the medians and, in brackets, "
             f"the median of the per-round ratios. Goal: at most {GOAL_VS_BATCH_NORM:.2f}x BatchNorm2d. "
             'OnlineNorm2d (ecm=None) is the normalization plus its affine; ecm="ls" (the default) adds '
             "layer scaling; affine=False is the op alone (the module applies its affine with two torch ops). "
             "StreamingNorm2d's calls each end with its `weight_update()`.", "",
             "| shape | mode | " + " | ".join(f"{LABELS[n]} ms" for n in PROVIDERS) + " | "
             + " | ".join(f"{LABELS[n]} / BatchNorm2d" for n in others) + " |",
             "|---" * (2 + len(PROVIDERS) + len(others)) + "|"]

    def cell(r, name):
        return NOT_AVAILABLE if r[name + "_ms"] == NOT_AVAILABLE else median_cell(r, name)

    def ratio(r, name):
        if not r[f"{name}_vs_bn"]:
            return r[f"{name}_goal"] or "n/a"
        return f"{float(r[f'{name}_vs_bn']):.2f}x ({float(r[f'{name}_vs_bn_per_round']):.2f}x): {r[f'{name}_goal']}"

    for r in rows:
        lines.append(f"| {r['shape']} | {r['mode']} | " + " | ".join(cell(r, n) for n in PROVIDERS) + " | "
                     + " | ".join(ratio(r, n) for n in others) + " |")
    write_report(rows, COLUMNS, out_md, lines)


def main(argv=None) -> int:
    return ratio_suite_main("python -m benchmarks.small_batch", __doc__, "small-batch", run, argv)


if __name__ == "__main__":
    sys.exit(main())
