"""``python -m benchmarks``: run benchmark suites, append rows to a CSV, write its markdown table and plot.

Examples::

    python -m benchmarks                                   # every suite, default device
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
    ap.add_argument("--suite", default="all",
                    help=f"comma-separated, from {','.join(tuple(suites.SUITES) + MODEL_SUITES)}, or all "
                         "(default: all, in that order)")
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
    args.suites = _list(args.suite, tuple(suites.SUITES) + MODEL_SUITES + ("all",), "suite")
    if "all" in args.suites:
        args.suites = list(suites.SUITES) + list(MODEL_SUITES)
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


def warm_pages_in_place() -> bool:
    """Whether this process runs under WARM_PAGES_ENV."""
    return all(os.environ.get(k) == v for k, v in WARM_PAGES_ENV.items())


def warm_pages_env(argv: list) -> Optional[dict]:
    """The environment to re-run ``python -m benchmarks argv`` in for warm pages, or None when
    the run needs no restart (no cpu device, ``--fresh-pages``, or the settings are in place)."""
    args = parse_args(argv)
    if args.fresh_pages or "cpu" not in (["cpu", "cuda"] if args.device == "all" else [args.device]):
        return None
    if warm_pages_in_place():
        return None
    return {**os.environ, **WARM_PAGES_ENV}


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
    plan = {d: [case for name in op_suites for case in suites.SUITES[name](d, args.quick)]
            for d in devices}
    total = sum(len(c) for c in plan.values()) * len(args.providers) * len(args.modes)
    harness.log(f"suite {','.join(args.suites)}: {total} rows on {', '.join(devices)}; "
                f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
                f"providers {','.join(args.providers)}; modes {','.join(args.modes)}; run {run_id}")

    if "cpu" in devices:
        warm = warm_pages_in_place()
        harness.log("cpu: freed pages are reused (" + " ".join(f"{k}={v}" for k, v in WARM_PAGES_ENV.items())
                    + ")" if warm else "cpu: every large tensor is mapped afresh (glibc's default): "
                    "page faults are timed too")
        harness.warn_if_busy()
    failures, counter, start = [], [0], time.perf_counter()
    for path, path_devices in outs.items():
        if "conv_bn" in args.suites:
            for device in path_devices:
                conv_bn.run(device, args.quick, os.path.splitext(path)[0] + f"-conv-bn-{device}.md")
        if "sequence" in args.suites:
            for device in path_devices:
                failures += sequence.run(device, args.quick, os.path.splitext(path)[0] + f"-sequence-{device}.md")[1]
        if "small_batch" in args.suites:
            for device in path_devices:
                failures += small_batch.run(device, args.quick,
                                            os.path.splitext(path)[0] + f"-small-batch-{device}.md")[1]
        if "cosine_norm" in args.suites:
            for device in path_devices:
                failures += cosine_norm.run(device, args.quick,
                                            os.path.splitext(path)[0] + f"-cosine-norm-{device}.md")[1]
        if "weight_norm" in args.suites:
            for device in path_devices:
                failures += weight_norm.run(device, args.quick,
                                            os.path.splitext(path)[0] + f"-weight-norm-{device}.md")[1]
        if "models" in args.suites:
            for device in path_devices:
                failures += models.run(device, args.quick, os.path.splitext(path)[0] + f"-models-{device}.md")[1]
        if not op_suites:
            continue
        writer = harness.CsvWriter(path)
        for device in path_devices:
            harness.log(f"{device}: {harness.device_name(device)} -> {path}")
            settings = harness.Settings(device, args.quick, args.min_run_time)
            failures += harness.run_suite(plan[device], device, args.providers, args.modes, writer,
                                          run_id, settings, counter, total)
        text = report.write_report(path, run_id)
        stem = os.path.splitext(path)[0]
        print(text, end="", flush=True)
        harness.log(f"wrote {path} (appended), {stem}.md, {stem}.png")
    harness.log(f"done in {time.perf_counter() - start:.0f} s")
    if failures:
        harness.log(f"{len(failures)} failed:")
        for label, msg in failures:
            harness.log(f"  {label}: {msg}")
        return 1
    return 0


if __name__ == "__main__":
    env = warm_pages_env(sys.argv[1:])
    if env is not None:
        # glibc reads these when the process starts: run again under them.
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], env)
    sys.exit(main())
