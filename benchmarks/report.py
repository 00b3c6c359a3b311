"""Markdown table and PNG plot drawn from a benchmark CSV.

``python -m benchmarks.report PATH.csv [--run-id ID]`` redraws them; by
default only the rows of the CSV's latest run are used, so every ratio
compares times measured in the same run. Rows are grouped by device, then by
op (one table and one row of plot panels per op, in the order the ops ran).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from collections import OrderedDict

from .suites import MODES, OPS, PROVIDERS

BASELINE = "torch"


def read_rows(csv_path: str, run_id: str = None) -> list:
    """Rows of one run of the CSV (the latest run when ``run_id`` is None)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    run_id = run_id or rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == run_id]


def _case_key(r: dict) -> tuple:
    return (r["device"], r["op"], r["mode"], r["shape"], r["layout"], r["dtype"], r["activation"], r["residual"])


def _ops(rows: list) -> list:
    """The ops of ``rows`` in the order they first appear (the order they ran)."""
    return list(OrderedDict.fromkeys(r["op"] for r in rows))


def _fused(act: str, residual: str) -> str:
    """What is fused into the op: ``none``, ``relu``, ``residual``, ``relu+residual``..."""
    parts = ([] if act == "none" else [act]) + (["residual"] if residual == "1" else [])
    return "+".join(parts) or "none"


def _gbps(value: float) -> str:
    """GB/s with 3 significant digits, without an exponent above 1000 (GPU bandwidths)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _op_title(op: str) -> str:
    title = getattr(OPS.get(op), "title", None)
    return f"{op}: {title}" if title else op


def _providers(rows: list) -> list:
    present = {r["provider"] for r in rows}
    return [p for p in PROVIDERS if p in present] + sorted(present - set(PROVIDERS))


def _table(rows: list) -> "OrderedDict":
    """{case key: {provider: row}}, cases ordered by mode, then as they ran."""
    cases = OrderedDict()
    for r in rows:
        cases.setdefault(_case_key(r), {})[r["provider"]] = r
    order = {m: i for i, m in enumerate(MODES)}
    keys = sorted(cases, key=lambda k: (k[0], order.get(k[2], len(order))))  # stable: keeps run order
    return OrderedDict((k, cases[k]) for k in keys)


def _ratio(by: dict, num: str, den: str):
    """Speedup of provider ``den`` over ``num``: ms(num) / ms(den), or None."""
    if num in by and den in by:
        return float(by[num]["median_ms"]) / float(by[den]["median_ms"])
    return None


def _ratio_columns(providers: list) -> list:
    """(numerator, denominator) pairs shown as speedups: every provider vs torch eager, torchnorm vs torch_compile."""
    cols = [(BASELINE, p) for p in providers if p != BASELINE and BASELINE in providers]
    if "torchnorm" in providers and "torch_compile" in providers:
        cols.append(("torch_compile", "torchnorm"))
    return cols


def _geomean(values: list):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _op_speedups(orows: list, ratios: list) -> "OrderedDict":
    """{(mode, numerator, denominator): [speedup of each case, None where one is missing]} of one
    op's rows, cases in table order."""
    per_mode = OrderedDict()
    for (_, _, mode, *_), by in _table(orows).items():
        for n, d in ratios:
            per_mode.setdefault((mode, n, d), []).append(_ratio(by, n, d))
    return per_mode


def summary_lines(rows: list) -> list:
    """Headline lines of one run: per device and op, the geometric mean of torchnorm's speedup
    over torch eager and over torch.compile in each mode."""
    out = []
    for device in OrderedDict.fromkeys(r["device"] for r in rows):
        drows = [r for r in rows if r["device"] == device]
        providers = _providers(drows)
        if "torchnorm" not in providers:
            out.append(f"{device}: no torchnorm rows, so no speedups to sum up")
            continue
        baselines = [(p, name) for p, name in ((BASELINE, "torch eager"), ("torch_compile", "torch.compile"))
                     if p in providers]
        modes = [m for m in MODES if any(r["mode"] == m for r in drows)]
        first = drows[0]
        out.append(f"torchnorm's speedup on {device} ({first['device_name']}, {first['threads']} threads), "
                   "geometric mean over each op's cases (above 1.0x: torchnorm is faster):")
        heads = [f"vs {name}: " + " / ".join(modes) for _, name in baselines]
        width = max(len(op) for op in _ops(drows)) + 2
        out.append("  " + "op".ljust(width) + "   ".join(h.ljust(len(h)) for h in heads))
        for op in _ops(drows):
            per_mode = _op_speedups([r for r in drows if r["op"] == op], [(b, "torchnorm") for b, _ in baselines])
            cells = []
            for (base, _), head in zip(baselines, heads):
                means = [_geomean(per_mode.get((mode, base, "torchnorm"), [])) for mode in modes]
                cells.append(" / ".join(f"{g:.2f}x" if g else "-" for g in means).ljust(len(head)))
            out.append("  " + op.ljust(width) + "   ".join(cells).rstrip())
    return out


def markdown(rows: list) -> str:
    """Markdown: per device, then per op, a table of ms per provider and speedups, then geometric
    means per mode."""
    if not rows:
        return "No rows.\n"
    out = []
    for device in OrderedDict.fromkeys(r["device"] for r in rows):
        drows = [r for r in rows if r["device"] == device]
        providers = _providers(drows)
        ratios = _ratio_columns(providers)
        subject = "torchnorm" if "torchnorm" in providers else providers[-1]
        first = drows[0]
        out.append(f"### {first['device_name']} ({device}), torch {first['torch_version']}, "
                   f"{first['threads']} threads, run {first['run_id']}\n")
        out.append("Median ms per call. \"A vs B\" is A's speedup over B, ms(B) / ms(A), both "
                   "measured in this run: above 1.0x, A is faster. "
                   f"GB/s: minimal bytes moved (counted per op in benchmarks/suites.py) / {subject}'s "
                   "time. \"fused\": what the op computes besides the normalization (an activation "
                   "after it; a residual: added before the activation for batch_norm, summed into the "
                   "input and returned for layer_norm / rms_norm).\n")
        header = (["mode", "shape", "layout", "dtype", "fused"] + [f"{p} ms" for p in providers]
                  + [f"{subject} GB/s"] + [f"{d} vs {n}" for n, d in ratios])
        for op in _ops(drows):
            if len(out) > 2:
                out.append("")
            out.append(f"#### {_op_title(op)}\n")
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join(["---"] * 5 + ["---:"] * (len(header) - 5)) + "|")
            orows = [r for r in drows if r["op"] == op]
            for key, by in _table(orows).items():
                _, _, mode, shape, layout, dtype, act, residual = key
                cells = [mode, shape, layout, dtype, _fused(act, residual)]
                cells += [f"{float(by[p]['median_ms']):.4g}" if p in by else "-" for p in providers]
                cells.append(_gbps(float(by[subject]["gb_per_s"])) if subject in by else "-")
                cells += [f"{r:.2f}x" if r else "-" for r in (_ratio(by, n, d) for n, d in ratios)]
                out.append("| " + " | ".join(cells) + " |")
            lines = []
            for (mode, n, d), values in _op_speedups(orows, ratios).items():
                g = _geomean(values)
                if g:
                    lines.append(f"- {mode}, {d} vs {n}: {g:.2f}x (min {min(v for v in values if v):.2f}x)")
            if lines:
                out.append("")
                out.append(f"Geometric mean (min) of the {op} speedups per mode:\n")
                out += lines
        out.append("")
    return "\n".join(out) + "\n"


def _label(key: tuple, varying: set) -> str:
    """A bar's label: the shape, then the layout / dtype / fusion where they vary within the op."""
    _, _, _, shape, layout, dtype, act, residual = key
    parts = [shape]
    if "layout" in varying:
        parts.append("CL" if layout == "channels_last" else "NCHW" if layout == "contiguous" else layout)
    if "dtype" in varying:
        parts.append(dtype)
    if "fused" in varying:
        parts.append(_fused(act, residual))
    return " ".join(parts)


def plot(rows: list, png_path: str) -> bool:
    """Bar plots of every provider's speedup over torch eager: one row of panels per (device, op),
    one column per mode.

    Returns False (and draws nothing) when there is no ratio to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = list(OrderedDict.fromkeys(r["device"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    grid = []  # (title, {mode: (labels, series)})
    for device in devices:
        drows = [r for r in rows if r["device"] == device]
        providers = _providers(drows)
        others = [p for p in providers if p != BASELINE] if BASELINE in providers else []
        for op in _ops(drows):
            orows = [r for r in drows if r["op"] == op]
            table = _table(orows)
            varying = {name for name, values in (
                ("layout", {r["layout"] for r in orows}), ("dtype", {r["dtype"] for r in orows}),
                ("fused", {_fused(r["activation"], r["residual"]) for r in orows})) if len(values) > 1}
            constant = [v for name, v in (("layout", orows[0]["layout"]), ("dtype", orows[0]["dtype"]),
                                          ("fused", _fused(orows[0]["activation"], orows[0]["residual"])))
                        if name not in varying and v not in ("contiguous", "none")]
            panels = {}
            for mode in modes:
                keys = [k for k in table if k[2] == mode]
                series = {p: [_ratio(table[k], BASELINE, p) or 0.0 for k in keys] for p in others}
                if any(any(v) for v in series.values()):
                    panels[mode] = ([_label(k, varying) for k in keys], series)
            if panels:
                title = f"{op}{' (' + ', '.join(constant) + ')' if constant else ''}, " \
                        f"{drows[0]['device_name']} ({device})"
                grid.append((title, panels))
    if not grid:
        return False
    heights = [0.9 + 0.28 * max(len(labels) * max(1, len(series)) for labels, series in panels.values())
               for _, panels in grid]
    height = sum(heights) + 0.5
    fig, axes = plt.subplots(len(grid), len(modes), figsize=(5.5 * len(modes), height), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for row, (title, panels) in zip(axes, grid):
        for ax, mode in zip(row, modes):
            if mode not in panels:
                ax.axis("off")
                continue
            labels, series = panels[mode]
            width = 0.8 / max(1, len(series))
            for j, (p, values) in enumerate(series.items()):
                pos = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
                bars = ax.barh(pos, values, height=width, label=f"{p} vs torch eager")
                ax.bar_label(bars, labels=[f"{v:.2f}x" if v else "" for v in values], fontsize=7, padding=2)
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{title}: {mode}", fontsize=9)
            ax.set_xlabel("speedup over torch eager (higher is better)", fontsize=8)
            ax.set_xlim(0, max([1.2] + [v * 1.25 for vs in series.values() for v in vs]))
    handles, labels = next(ax for ax in axes.flat if ax.axison).get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def write_report(csv_path: str, run_id: str = None) -> str:
    """Write ``<name>.md`` and ``<name>.png`` next to ``csv_path`` from one run; return the markdown."""
    rows = read_rows(csv_path, run_id)
    stem = os.path.splitext(csv_path)[0]
    text = markdown(rows)
    with open(stem + ".md", "w") as f:
        f.write(text)
    if not plot(rows, stem + ".png"):
        # Keep the files a run promises even without a baseline to compare with.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no speedup to plot: run the torch provider too", ha="center", va="center")
        fig.savefig(stem + ".png", dpi=80)
        plt.close(fig)
    return text


def main(argv=None) -> None:
    """CLI: redraw the markdown table and the plot of a CSV."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    ap.add_argument("csv", help="a CSV written by python -m benchmarks")
    ap.add_argument("--run-id", help="which run (default: the latest in the file)")
    args = ap.parse_args(argv)
    print(write_report(args.csv, args.run_id), end="")


if __name__ == "__main__":
    main()
