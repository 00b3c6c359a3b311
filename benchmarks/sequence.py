"""BN-LSTM at module level: ``torchnorm.nn.BNLSTM`` against the same BN-LSTM
written step by step with torch ops (what a user writes without torchnorm),
and against ``torch.nn.LSTM`` of the same size (no normalization; cuDNN on a
GPU, oneDNN on the CPU).

``python -m benchmarks.sequence [--device cpu|cuda] [--quick] [--out results.md]``
(also run by ``python -m benchmarks`` as the suite ``sequence``). Writes a
markdown report and a CSV of the same rows beside it.

Rows: forward and forward+backward of one layer, float32, training mode
(batch statistics, running statistics updated), at batch 64, input 128,
hidden 512, 100 steps. Every call runs with the input and the parameters
requiring grad, as in a training step, so the forward builds the graph a
training forward builds; forward+backward takes ``torch.autograd.grad`` of
the output sequence (no ``.grad`` accumulation is timed). The three models
are timed in turns (:func:`benchmarks.conv_bn.timed_rounds`), so a slow
spell of a shared machine lands on all of them alike; the report gives each
median and the median of the per-round ratios.
"""
from __future__ import annotations

import copy
import gc
import statistics
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import harness
from .conv_bn import iqr, median_cell, ratio_suite_main, report_title, timed_rounds, verdict, write_report


# (batch, input, hidden, steps): the size the goals are set for, and a tiny one for --quick.
FULL_SIZE = (64, 128, 512, 100)
QUICK_SIZE = (4, 8, 16, 5)

# The goals, the same on CPU and GPU: torchnorm's time at most this
# fraction of the composition's (at least 2x faster), and at most this
# multiple of torch.nn.LSTM's (the price of the normalization).
GOAL_VS_COMPOSITION = 0.5
GOAL_VS_LSTM = 1.5

PROVIDERS = ("torchnorm", "composition", "lstm")
# The matrix-product ops of a BN-LSTM call (the profiler's names on CPU and
# CUDA). Their time in torchnorm's call is a floor no normalization kernel can
# go below: the composition does the same products, so torchnorm's products
# over the composition's whole time is the best ratio reachable here.
PRODUCT_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise"})
MODES = ("forward", "forward+backward")


def bn_lstm_composition(x: torch.Tensor, model: torch.nn.Module,
                        hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """BN-LSTM over a ``(T, N, I)`` input written with torch ops, one step at a
    time, the way a user writes it without torchnorm: per step two matrix
    products, ``F.batch_norm`` of each on that step's row of the running
    statistics, the LSTM cell, ``F.batch_norm`` of the cell.

    It uses the layer-0 parameters and buffers of ``model``, a one-layer
    ``torchnorm.nn.BNLSTM`` (so both compute with the same weights, and
    training updates the same kind of per-step running statistics in place);
    its ``training`` flag picks batch or running statistics. Returns
    ``(output, (h_n, c_n))`` with ``h_n``, ``c_n`` of shape ``(N, H)``.
    """
    m = model
    steps, batch, hidden = x.shape[0], x.shape[1], m.hidden_size
    h, c = hx if hx is not None else (x.new_zeros(batch, hidden), x.new_zeros(batch, hidden))

    def bn(z, name, t, weight, bias=None):
        # Steps at or beyond max_length share the last row of statistics.
        row = min(t, m.max_length - 1)
        mean = getattr(m, f"bn_{name}_running_mean_l0")[row]  # a view: F.batch_norm updates the buffer
        var = getattr(m, f"bn_{name}_running_var_l0")[row]
        return F.batch_norm(z, mean, var, weight, bias, training=m.training, momentum=m.momentum, eps=m.eps)

    outputs = []
    for t in range(steps):
        gates = (bn(x[t] @ m.weight_ih_l0.t(), "ih", t, m.bn_ih_weight_l0)
                 + bn(h @ m.weight_hh_l0.t(), "hh", t, m.bn_hh_weight_l0))
        if m.bias_l0 is not None:
            gates = gates + m.bias_l0
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(bn(c, "c", t, m.bn_c_weight_l0, m.bn_c_bias_l0))
        outputs.append(h)
    return torch.stack(outputs), (h, c)


class _Composition(torch.nn.Module):
    """:func:`bn_lstm_composition` as a module over its own copy of a BNLSTM's state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)

    def forward(self, x):
        return bn_lstm_composition(x, self.model)


def models(size: tuple, device: str) -> Dict[str, torch.nn.Module]:
    """The three models of a size, in training mode, seeded: torchnorm's BNLSTM, the
    composition over a copy of its parameters, and torch.nn.LSTM."""
    import torchnorm.nn

    _, inputs, hidden, steps = size
    torch.manual_seed(0)
    bn_lstm = torchnorm.nn.BNLSTM(inputs, hidden, max_length=steps)
    return {"torchnorm": bn_lstm.to(device).train(),
            "composition": _Composition(bn_lstm).to(device).train(),
            "lstm": torch.nn.LSTM(inputs, hidden).to(device).train()}


def _steps(model: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """The timed calls of a model: its training forward, and forward + gradients."""
    targets = [x] + list(model.parameters())

    def forward():
        model(x)

    def full():
        torch.autograd.grad(model(x)[0], targets, dy)

    return {"forward": forward, "forward+backward": full}


def product_ms(fn: Callable[[], None], device: str, calls: int = 3) -> float:
    """The least, over ``calls`` profiled calls of ``fn``, of the time its
    matrix products (PRODUCT_OPS) took, in ms: their own time on the CPU,
    their kernels' time on a GPU. The least, because it stands for a floor: a
    call that was descheduled mid-product only adds time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    times = []
    for _ in range(calls):
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        times.append(sum((e.self_device_time_total if device == "cuda" else e.self_cpu_time_total)
                         for e in prof.key_averages() if e.key in PRODUCT_OPS) / 1e3)
    return min(times)


def run(device: str, quick: bool, out_md: str) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """Time the rows on ``device``, write the report; return ``(rows, failures)``.

    A model that cannot run here (e.g. BNLSTM on a device torchnorm has no
    kernel for) is a failure, reported, and its columns left empty; the
    others are still timed.
    """
    size = QUICK_SIZE if quick else FULL_SIZE
    batch, inputs, hidden, steps = size
    warmup, reps = (1, 2) if quick else ((5, 20) if device == "cuda" else (2, 11))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, inputs, generator=gen).to(device).requires_grad_()
    dy = torch.randn(steps, batch, hidden, generator=gen).to(device)
    failures, calls = [], {}
    for name, model in models(size, device).items():
        try:
            fns = _steps(model, x, dy)
            fns["forward+backward"]()  # one untimed call: errors surface here
            calls[name] = fns
        except Exception as e:  # noqa: BLE001 - report it, time the others
            harness.log(f"sequence {name} on {device}: FAILED ({type(e).__name__}: {e})")
            failures.append((f"sequence {name} {device}", f"{type(e).__name__}: {e}"))
    shape = f"batch {batch}, input {inputs}, hidden {hidden}, {steps} steps"
    rows = []
    for mode in MODES:
        harness.log(f"sequence BN-LSTM {mode} ({shape}, {device}): timing {reps} calls each, "
                    f"{', '.join(calls)} in turn")
        rounds = timed_rounds({name: fns[mode] for name, fns in calls.items()}, device, warmup, reps)
        ms = {name: statistics.median(t) * 1e3 for name, t in rounds.items()}
        row = {"benchmark": f"BN-LSTM {mode}", "device": harness.device_name(device), "shape": shape,
               "threads": torch.get_num_threads(), "torch_version": torch.__version__}
        for name in PROVIDERS:
            row[f"{name}_ms"] = f"{ms[name]:.4g}" if name in ms else ""
            row[f"{name}_iqr_ms"] = f"{iqr(rounds[name]) * 1e3:.3g}" if name in ms else ""
        products = product_ms(calls["torchnorm"][mode], device) if "torchnorm" in calls else None
        row["products_ms"] = f"{products:.4g}" if products is not None else ""
        row["products_vs_composition"] = (f"{products / ms['composition']:.4g}"
                                          if products is not None and "composition" in ms else "")
        for other, goal in (("composition", GOAL_VS_COMPOSITION), ("lstm", GOAL_VS_LSTM)):
            if "torchnorm" in ms and other in ms:
                ratio = ms["torchnorm"] / ms[other]
                # The calls of a round ran back to back: their ratio is free of
                # the machine's slower drifts, which move both medians.
                paired = statistics.median(a / b for a, b in zip(rounds["torchnorm"], rounds[other]))
                row[f"vs_{other}"], row[f"vs_{other}_per_round"] = f"{ratio:.4g}", f"{paired:.4g}"
                row[f"goal_vs_{other}"] = verdict(ratio, goal)
            else:
                row[f"vs_{other}"] = row[f"vs_{other}_per_round"] = row[f"goal_vs_{other}"] = ""
        harness.log("  " + ", ".join(f"{n} {row[f'{n}_ms']} ms" for n in calls)
                    + (f"; torchnorm / composition {row['vs_composition']}x, torchnorm / LSTM {row['vs_lstm']}x"
                       if "torchnorm" in ms else ""))
        rows.append(row)
    del calls, x, dy
    gc.collect()  # the suite's models and graphs go before whatever runs next
    if device == "cuda":
        torch.cuda.empty_cache()
    write(rows, out_md, quick)
    harness.log(f"sequence: wrote {out_md}")
    return rows, failures


COLUMNS = ["benchmark", "device", "shape", "threads", "torch_version",
           "torchnorm_ms", "torchnorm_iqr_ms", "products_ms", "products_vs_composition", "composition_ms", "composition_iqr_ms", "lstm_ms", "lstm_iqr_ms",
           "vs_composition", "vs_composition_per_round", "goal_vs_composition",
           "vs_lstm", "vs_lstm_per_round", "goal_vs_lstm"]


def write(rows: List[dict], out_md: str, quick: bool = False) -> None:
    """The report: a CSV of the rows (COLUMNS) and a markdown table beside it."""
    first = rows[0] if rows else {}
    lines = [report_title("BN-LSTM", rows, quick), "",
             f"One layer, float32, training mode, {first.get('shape', '')}. Median ms per call "
             "(interquartile range); ratios are torchnorm's time over the other's, in the same run "
             "(below 1.0x torchnorm is faster), from the medians and, in brackets, the median of the "
             f"per-round ratios. Goals: at most {GOAL_VS_COMPOSITION:.2f}x the composition's time "
             f"(at least {1 / GOAL_VS_COMPOSITION:.0f}x faster), at most {GOAL_VS_LSTM:.2f}x torch.nn.LSTM's. "
             "'Of which products' is the time torchnorm's call spent in matrix products (profiled, "
             "least of 3 calls) and, in brackets, that time over the composition's: the composition does "
             "the same products, so no normalization kernel can bring the ratio below it.",
             "", "| benchmark | torchnorm BNLSTM ms | of which products ms | composition ms | torch.nn.LSTM ms | torchnorm / composition "
             "| torchnorm / LSTM |", "|---|---|---|---|---|---|---|"]

    def ratio(r, other):
        if not r[f"vs_{other}"]:
            return "n/a"
        return f"{float(r[f'vs_{other}']):.2f}x ({float(r[f'vs_{other}_per_round']):.2f}x): {r[f'goal_vs_{other}']}"

    def products(r):
        if not r["products_ms"]:
            return "n/a"
        return r["products_ms"] + (f" ({float(r['products_vs_composition']):.2f}x)" if r["products_vs_composition"] else "")

    for r in rows:
        lines.append(f"| {r['benchmark']} | {median_cell(r, 'torchnorm')} | {products(r)} | {median_cell(r, 'composition')} "
                     f"| {median_cell(r, 'lstm')} | {ratio(r, 'composition')} | {ratio(r, 'lstm')} |")
    write_report(rows, COLUMNS, out_md, lines)


def main(argv=None) -> int:
    return ratio_suite_main("python -m benchmarks.sequence", __doc__, "sequence", run, argv)


if __name__ == "__main__":
    sys.exit(main())
