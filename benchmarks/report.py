"""Markdown table and PNG plot drawn from a benchmark CSV.

``python -m benchmarks.report PATH.csv [--run-id ID]`` redraws them; by
default only the rows of the CSV's latest run are used, so every ratio
compares times measured in the same run.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from collections import OrderedDict

from .suites import MODES, PROVIDERS

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


def markdown(rows: list) -> str:
    """Markdown: per device, a table of ms per provider and speedups, then geometric means per mode."""
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
                   f"GB/s: minimal bytes moved / {subject}'s time.\n")
        header = (["mode", "shape", "layout", "dtype", "act"] + [f"{p} ms" for p in providers]
                  + [f"{subject} GB/s"] + [f"{d} vs {n}" for n, d in ratios])
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] * 5 + ["---:"] * (len(header) - 5)) + "|")
        per_mode = {}
        for key, by in _table(drows).items():
            _, _, mode, shape, layout, dtype, act, residual = key
            act = act + ("+res" if residual == "1" else "")
            cells = [mode, shape, layout, dtype, act]
            cells += [f"{float(by[p]['median_ms']):.4g}" if p in by else "-" for p in providers]
            cells.append(f"{float(by[subject]['gb_per_s']):.3g}" if subject in by else "-")
            for n, d in ratios:
                r = _ratio(by, n, d)
                per_mode.setdefault((mode, n, d), []).append(r)
                cells.append(f"{r:.2f}x" if r else "-")
            out.append("| " + " | ".join(cells) + " |")
        if per_mode:
            out.append("")
            out.append("Geometric mean (min) of the speedups per mode:\n")
            for (mode, n, d), values in per_mode.items():
                g = _geomean(values)
                if g:
                    out.append(f"- {mode}, {d} vs {n}: {g:.2f}x (min {min(v for v in values if v):.2f}x)")
        out.append("")
    return "\n".join(out) + "\n"


def plot(rows: list, png_path: str) -> bool:
    """Bar plot of every provider's speedup over torch eager, one panel per (device, mode).

    Returns False (and draws nothing) when there is no ratio to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = list(OrderedDict.fromkeys(r["device"] for r in rows))
    panels = []
    for device in devices:
        drows = [r for r in rows if r["device"] == device]
        providers = _providers(drows)
        others = [p for p in providers if p != BASELINE] if BASELINE in providers else []
        table = _table(drows)
        for mode in [m for m in MODES if any(k[2] == m for k in table)]:
            keys = [k for k in table if k[2] == mode]
            labels = [f"{k[3]} {'CL' if k[4] == 'channels_last' else 'NCHW'} {k[5]} {k[6]}" for k in keys]
            series = {p: [_ratio(table[k], BASELINE, p) or 0.0 for k in keys] for p in others}
            if any(any(v) for v in series.values()):
                panels.append((f"{drows[0]['device_name']} ({device}): {mode}", labels, series))
    if not panels:
        return False
    rows_n = len(panels)
    height = sum(0.6 + 0.35 * len(p[1]) * max(1, len(p[2])) for p in panels) + 0.5
    fig, axes = plt.subplots(rows_n, 1, figsize=(8, height), squeeze=False)
    for ax, (title, labels, series) in zip(axes[:, 0], panels):
        width = 0.8 / max(1, len(series))
        for j, (p, values) in enumerate(series.items()):
            pos = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
            bars = ax.barh(pos, values, height=width, label=f"{p} vs torch eager")
            ax.bar_label(bars, labels=[f"{v:.2f}x" if v else "" for v in values], fontsize=7, padding=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("speedup over torch eager (higher is better)", fontsize=8)
        ax.set_xlim(0, max([1.2] + [v * 1.25 for vs in series.values() for v in vs]))
    handles, labels = axes[0, 0].get_legend_handles_labels()
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
