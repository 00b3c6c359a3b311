"""``python -m benchmarks``: run benchmark suites, append rows to a CSV, write its markdown table and plot.

Examples::

    python -m benchmarks                                   # every suite but models, default device
    python -m benchmarks --suite layer_norm,rms_norm       # some suites (or: all)
    python -m benchmarks --providers torch,torch_compile   # without torchnorm
    python -m benchmarks --device cpu --quick --out benchmarks/results/local/quick.csv   # smoke test
    python -m benchmarks --suite conv_bn                   # model-level Conv+BN only
    python -m benchmarks --suite sequence                  # BN-LSTM against its composition and torch.nn.LSTM
    python -m benchmarks --suite small_batch               # OnlineNorm2d, StreamingNorm2d against BatchNorm2d
    python -m benchmarks --suite cosine_norm               # CosineConv2d, CosineLinear against their torch composition
    python -m benchmarks --suite weight_norm               # torchnorm.weight_norm against torch's parametrization
    python -m benchmarks --suite models                    # real models' training steps, converted and fused
    python -m benchmarks.report benchmarks/results/local/cpu-amd-epyc.csv   # redraw the table
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import OrderedDict
from typing import Optional

from . import conv_bn, cosine_norm, harness, models, report, sequence, small_batch, suites, weight_norm

# Model-level suites, with their own report (a .md and .csv beside the op CSV).
MODEL_SUITES = ("conv_bn", "sequence", "small_batch", "cosine_norm", "weight_norm", "models")
# Run only when named (or with --suite all): the real models' training steps at
# the sizes people train take about as long as every other suite together.
OPT_IN_SUITES = ("models",)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _list(text: str, allowed: tuple, what: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    import torch

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="default",
                    help=f"comma-separated, from {','.join(tuple(suites.SUITES) + MODEL_SUITES)}; default: "
                         f"every one but {','.join(OPT_IN_SUITES)} (in that order); all: every one")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"],
                    default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda when available, else cpu; all: cpu then cuda")
    ap.add_argument("--providers", default=",".join(suites.PROVIDERS),
                    help=f"comma-separated, from {','.join(suites.PROVIDERS)} (default: all)")
    ap.add_argument("--modes", default=",".join(suites.MODES),
                    help=f"comma-separated, from {','.join(suites.MODES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and short timing: a smoke test")
    ap.add_argument("--out", help="CSV to append rows to; the .md and .png go next to it "
                                  f"(default: {os.path.relpath(RESULTS)}/local/<device>.csv)")
    ap.add_argument("--min-run-time", type=float,
                    help="seconds of timed calls per row (default: 1.0 on cpu, 0.3 on cuda)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--fresh-pages", action="store_true",
                    help="cpu: keep glibc's default of mapping each large tensor afresh (see warm_pages_env); "
                         "then page faults of fresh outputs are timed too")
    args = ap.parse_args(argv)
    args.suites = _list(args.suite, tuple(suites.SUITES) + MODEL_SUITES + ("all", "default"), "suite")
    if "all" in args.suites:
        args.suites = list(suites.SUITES) + list(MODEL_SUITES)
    elif "default" in args.suites:
        i = args.suites.index("default")
        default = [n for n in tuple(suites.SUITES) + MODEL_SUITES if n not in OPT_IN_SUITES]
        args.suites[i:i + 1] = default
    args.suites = list(OrderedDict.fromkeys(args.suites))
    args.providers = _list(args.providers, suites.PROVIDERS, "provider")
    args.modes = _list(args.modes, suites.MODES, "mode")
    return args


# glibc settings under which a freed large tensor's memory is reused by the
# next allocation. By default glibc maps every block over 32 MiB afresh and
# unmaps it when freed, so each call's output is page-faulted in again: on
# this kind of shared VM that costs 5-30 ms per 64 MiB, varying run to run,
# and drowns the kernels being compared (every provider allocates the same
# outputs). A training loop that reuses its buffers (or a caching allocator)
# runs on warm pages, which is what these settings measure.
WARM_PAGES_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
# With every block in one heap, small blocks freed into glibc's per-thread
# cache (tcache) and fastbins are never merged with their free neighbours, so
# one of them left inside a freed 128 MiB block splits it and the next 128 MiB
# tensor goes to fresh memory at the top of the heap: torch's RMSNorm backward
# at (8192, 4096) grew the heap to 4.1-4.8 GiB for 2.5 GiB of tensors, and
# `make bench` peaked at 5 GiB. Without them: 2.8-3.4 GiB. They cost about
# 0.3 us per small op (measured here: 17.7 -> 19.1 us of CPU time for four
# small ops with autograd), below the noise of rows of a millisecond and more.
WARM_PAGES_TUNABLES = ("glibc.malloc.tcache_count=0", "glibc.malloc.mxfast=0")


def _tunables(environ) -> list:
    return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def warm_pages_in_place() -> bool:
    """Whether this process runs under WARM_PAGES_ENV and WARM_PAGES_TUNABLES."""
    return (all(os.environ.get(k) == v for k, v in WARM_PAGES_ENV.items())
            and set(WARM_PAGES_TUNABLES) <= set(_tunables(os.environ)))


def warm_pages_environ(environ) -> dict:
    """``environ`` with WARM_PAGES_ENV set and WARM_PAGES_TUNABLES added to its GLIBC_TUNABLES."""
    have = _tunables(environ)
    tunables = have + [t for t in WARM_PAGES_TUNABLES if t not in have]
    return {**environ, **WARM_PAGES_ENV, "GLIBC_TUNABLES": ":".join(tunables)}


def warm_pages_env(argv: list) -> Optional[dict]:
    """The environment to re-run ``python -m benchmarks argv`` in for warm pages, or None when
    the run needs no restart (no cpu device, ``--fresh-pages``, or the settings are in place)."""
    args = parse_args(argv)
    if args.fresh_pages or "cpu" not in (["cpu", "cuda"] if args.device == "all" else [args.device]):
        return None
    if warm_pages_in_place():
        return None
    return warm_pages_environ(os.environ)


# Modelled seconds of each model-level suite on the CPU, (full, --quick), for
# the time estimate (see harness.Progress): measured on the 2-core VM of the
# committed results while other jobs shared it (load average 4-5). A GPU
# takes them as they are. "models" is an estimate, not a run: 60 training steps
# per model (4 variants x (1 untimed + 2 warm-up + 11 timed + 1 for peak
# memory)) at the step times measured there under a load of 5 (Llama 17 s,
# the UNet 16 s, BERT, convnext_tiny and resnet50 3.5 s) plus torch.compile's
# first steps (resnet50's took 106 s; about 700 s for the five); its --quick
# took 54 s under a load of 6.
MODEL_SUITE_COST_S = {"conv_bn": (430.0, 7.0), "sequence": (220.0, 0.5), "small_batch": (12.0, 0.5),
                      "cosine_norm": (120.0, 2.0), "weight_norm": (60.0, 1.0), "models": (2100.0, 30.0)}


def _model_suite_paths(path: str, device: str) -> dict:
    """The report each model-level suite writes for the op CSV ``path`` on ``device``."""
    stem = os.path.splitext(path)[0]
    return {name: f"{stem}-{name.replace('_', '-')}-{device}.md" for name in MODEL_SUITES}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def summary(op_runs: list, conv_bn_rows: dict, reports: list, run_id: str) -> str:
    """The headline block printed last: torchnorm's geometric-mean speedups per op and mode,
    the Conv+BN ratios, the run's peak memory and where the full results are.

    ``op_runs``: ``(csv path, rows of this run)`` per op CSV; ``conv_bn_rows``: the conv_bn
    suite's rows per device; ``reports``: ``(what, path)`` of every other file written.
    """
    lines = [f"==== summary of run {run_id} ===="]
    for _, rows in op_runs:
        lines += report.summary_lines(rows)
    for device, rows in conv_bn_rows.items():
        lines.append(f"Conv+BN on {device}, torchnorm.fx.fuse_conv_bn against torch.nn (below 1.0x: less):")
        lines += [f"  {r['benchmark']}: {r['ratio']}" for r in rows if " training step, " in r["benchmark"]]
    own, children = harness.resident_peak_bytes()
    memory = f"peak memory: {_gib(own)} resident"
    if children:
        memory += f" (children: up to {_gib(children)})"
    device_peak = harness.device_peak_bytes()
    if device_peak is not None:
        memory += f"; CUDA: {_gib(device_peak)} allocated at most"
    lines.append(memory)
    for path, _ in op_runs:
        stem = os.path.splitext(path)[0]
        lines += [f"full table: {stem}.md", f"CSV: {path}", f"plot: {stem}.png"]
    lines += [f"{what}: {path}" for what, path in reports]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run the benchmark; return the process exit status (0 ok, 1 some rows failed, 2 cannot run)."""
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            harness.log("--device cuda: no CUDA device is available")
            return 2
        harness.log("no CUDA device: running the cpu part of --device all only")
        devices.remove("cuda")
    try:
        for p in args.providers:
            suites.check_provider(p)
    except suites.ProviderUnavailable as e:
        harness.log(f"error: {e}")
        return 2

    run_id = time.strftime("%Y%m%dT%H%M%S")
    outs = OrderedDict()  # CSV path -> devices written to it
    for device in devices:
        path = args.out or os.path.join(RESULTS, "local", harness.device_slug(device) + ".csv")
        outs.setdefault(path, []).append(device)
    op_suites = [name for name in args.suites if name in suites.SUITES]
    model_suites = [name for name in MODEL_SUITES if name in args.suites]
    plan = {d: [case for name in op_suites for case in suites.SUITES[name](d, args.quick)]
            for d in devices}
    settings = {d: harness.Settings(d, args.quick, args.min_run_time) for d in devices}
    total = sum(len(c) for c in plan.values()) * len(args.providers) * len(args.modes)
    model_cost = {name: MODEL_SUITE_COST_S[name][args.quick] for name in model_suites}
    estimate = sum(harness.suite_cost_s(plan[d], d, args.providers, args.modes, settings[d]) for d in devices) \
        + len(devices) * sum(model_cost.values())
    progress = harness.Progress(total, estimate)
    harness.log(f"suite {','.join(args.suites)}: {total} rows of op suites"
                + (f" and the model-level {', '.join(model_suites)}" if model_suites else "")
                + f" on {', '.join(devices)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
                f"providers {','.join(args.providers)}; modes {','.join(args.modes)}; run {run_id}")
    harness.log(f"estimated time: about {harness.duration(estimate)} on a 2-core VM like the one the "
                "committed results come from (an estimate from a cost model measured there; the "
                "progress lines correct it as the run goes)")

    if "cpu" in devices:
        warm = warm_pages_in_place()
        harness.log("cpu: freed pages are reused (" + " ".join(f"{k}={v}" for k, v in WARM_PAGES_ENV.items())
                    + f" GLIBC_TUNABLES={':'.join(WARM_PAGES_TUNABLES)}); memory goes back between rows" if warm else "cpu: every large tensor is mapped "
                    "afresh (glibc's default): page faults are timed too")
        harness.warn_if_busy()
    runners = {"conv_bn": lambda d, out: (conv_bn.run(d, args.quick, out), []),
               "sequence": lambda d, out: sequence.run(d, args.quick, out),
               "small_batch": lambda d, out: small_batch.run(d, args.quick, out),
               "cosine_norm": lambda d, out: cosine_norm.run(d, args.quick, out),
               "weight_norm": lambda d, out: weight_norm.run(d, args.quick, out),
               "models": lambda d, out: models.run(d, args.quick, out)}
    failures, conv_bn_rows, reports, op_runs = [], {}, [], []
    for path, path_devices in outs.items():
        for name in model_suites:
            for device in path_devices:
                out = _model_suite_paths(path, device)[name]
                rows, suite_failures = runners[name](device, out)
                failures += suite_failures
                if name == "conv_bn":
                    conv_bn_rows[device] = rows
                reports.append((f"{name} report ({device})", out))
                harness.release_memory(device)
                progress.done(model_cost[name])
                harness.log(f"{name} on {device} done | {progress.status()}")
        if not op_suites:
            continue
        writer = harness.CsvWriter(path)
        for device in path_devices:
            harness.log(f"{device}: {harness.device_name(device)} -> {path}")
            failures += harness.run_suite(plan[device], device, args.providers, args.modes, writer,
                                          run_id, settings[device], progress)
        text = report.write_report(path, run_id)
        stem = os.path.splitext(path)[0]
        print(text, end="", flush=True)
        harness.log(f"wrote {path} (appended), {stem}.md, {stem}.png")
        op_runs.append((path, report.read_rows(path, run_id)))
    harness.log(f"done in {harness.duration(progress.elapsed())}")
    if failures:
        harness.log(f"{len(failures)} failed:")
        for label, msg in failures:
            harness.log(f"  {label}: {msg}")
    print("\n" + summary(op_runs, conv_bn_rows, reports, run_id), end="", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    env = warm_pages_env(sys.argv[1:])
    if env is not None:
        # glibc reads these when the process starts: run again under them.
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], env)
    sys.exit(main())
