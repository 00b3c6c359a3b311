"""Timing, input rotation, CSV rows and progress lines.

Timing method:
- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with the process's
  thread count (Timer defaults to one thread otherwise), after a warm-up that
  also pays first-touch page faults of fresh allocations; the median of the
  measured blocks is reported. ``python -m benchmarks`` runs under glibc
  settings that reuse freed pages (``WARM_PAGES_ENV`` in __main__.py), so a
  large output is not page-faulted in afresh on every call.
- Providers take turns: each row's time is spread over ``ROUNDS`` rounds,
  alternating between the providers of the same case and mode, and its
  median is over all rounds, so a slow spell of a shared machine does not
  land on one provider's row only. The backward mode, whose per-call forward must
  stay out of the timing, uses perf_counter around each call instead.
- CUDA: one pair of CUDA events around each call, many calls after a warm-up;
  the median is reported, and the peak memory one call allocates.
- Inputs are rotated: each call takes the next of several input sets, enough
  of them that together they are about twice the last-level cache (the CPU's
  L3, the GPU's L2), so a call does not find its input already cached.
"""
from __future__ import annotations

import collections
import csv
import gc
import logging
import math
import os
import re
import statistics
import sys
import time
from typing import Callable, Optional

# torch.utils.cpp_extension logs a warning about CUDA_HOME on machines without
# a GPU when torch.utils.benchmark imports it; it is noise here.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

import torch  # noqa: E402
import torch.utils.benchmark as torch_benchmark  # noqa: E402

from . import suites  # noqa: E402

COLUMNS = [
    "run_id", "op", "provider", "mode", "shape", "dtype", "layout", "activation", "residual",
    "device", "device_name", "torch_version", "threads", "median_ms", "iqr_ms", "runs",
    "gb_per_s", "peak_mem_mb",
]

MAX_ROTATION = 16
# Turns the providers of a row take (see run_suite).
ROUNDS = 4
ROTATION_BUDGET_BYTES = 2 << 30


def log(msg: str) -> None:
    """Print a progress line to stderr at once."""
    print(msg, file=sys.stderr, flush=True)


def _cpu_times() -> tuple:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def warn_if_busy(seconds: float = 1.0) -> None:
    """Warn when other processes use the CPU (sampled over ``seconds``): CPU timings are then noisy."""
    cores = os.cpu_count() or 1
    try:
        total0, idle0 = _cpu_times()
        time.sleep(seconds)
        total1, idle1 = _cpu_times()
        busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
        what = f"the CPU was {busy:.0%} busy"
    except (OSError, ValueError, IndexError):
        busy = os.getloadavg()[0] / cores
        what = f"load average {os.getloadavg()[0]:.1f}"
    if busy > 0.25:
        log(f"warning: {what} on {cores} cores before the run started: other processes are using it, "
            "so CPU timings will be noisy and slow; rerun on an idle machine")


def device_name(device: str) -> str:
    """The CPU model (from /proc/cpuinfo) or the CUDA card's name."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: str) -> str:
    """A file-name-safe name for the device, e.g. ``cpu-amd-epyc``, ``cuda-nvidia-h100-80gb-hbm3``."""
    name = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return f"{device}-{name}" if name else device


def last_level_cache_bytes(device: str) -> int:
    """Size of the CPU's largest cache level or the GPU's L2 (32 / 50 MiB if unknown)."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                           "L2_cache_size", 50 << 20) or (50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                best = max(best, int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])
    except OSError:
        pass
    return best or (32 << 20)


def rotation_count(case: suites.Case, device: str) -> int:
    """How many input sets to rotate through: about twice the cache in inputs, 2 to 16 of them."""
    numel = math.prod(case.shape)
    x_bytes = max(1, numel * torch.empty((), dtype=case.dtype).element_size())
    n = math.ceil(2 * last_level_cache_bytes(device) / x_bytes)
    outputs = suites.OPS[case.op].outputs(case)
    per_set = x_bytes * (1 + outputs + case.residual)  # x, dy (and ds, residual)
    return max(2, min(n, MAX_ROTATION, ROTATION_BUDGET_BYTES // per_set))


def make_samples(case: suites.Case, device: str, count: int) -> list:
    """``count`` input sets ``{x, dy, ds, residual}`` in the case's layout; x and residual require grad.

    ``ds``, the gradient of a second output (the residual sum s of LayerNorm /
    RMSNorm), is None when the op has one output; ``residual`` is None when
    the case has none.
    """
    g = torch.Generator(device=device).manual_seed(0)
    fmt = suites.memory_format(case)

    def tensor(requires_grad):
        t = torch.empty(case.shape, dtype=case.dtype, device=device, memory_format=fmt)
        return t.normal_(generator=g).requires_grad_(requires_grad)

    two = suites.OPS[case.op].outputs(case) == 2
    return [{"x": tensor(True), "dy": tensor(False), "ds": tensor(False) if two else None,
             "residual": tensor(True) if case.residual else None}
            for _ in range(count)]


def grad_targets(sample: dict, grad_params: list) -> list:
    """What a training step differentiates: x (and the residual) and the parameters."""
    return [sample["x"]] + ([sample["residual"]] if sample["residual"] is not None else []) + grad_params


def backward(out, sample: dict, targets: list, **kwargs) -> tuple:
    """``torch.autograd.grad`` of ``fn``'s output: ``y`` with ``dy``, or ``(y, s)`` with ``(dy, ds)``.

    A two-output case gets its gradient into both outputs, the same way for every provider.
    """
    if isinstance(out, (tuple, list)):
        return torch.autograd.grad(list(out), targets, [sample["dy"], sample["ds"]], **kwargs)
    return torch.autograd.grad(out, targets, sample["dy"], **kwargs)


def check_outputs(out, case: suites.Case) -> None:
    """Raise if ``out`` is not the one tensor or the pair of tensors the case's op returns."""
    got = len(out) if isinstance(out, (tuple, list)) else 1
    expected = suites.OPS[case.op].outputs(case)
    if got != expected or not all(isinstance(t, torch.Tensor) for t in (out if got > 1 else [out])):
        raise RuntimeError(f"{case.describe()}: the function returned {got} output(s), expected "
                           f"{expected} tensor(s)")


def make_step(mode: str, fn: Callable, samples: list, grad_params: list) -> tuple:
    """``(setup, timed)`` for ``mode``: ``timed()`` is what is timed, ``setup()`` (or None) runs
    untimed before each timed call. Each call takes the next input set.

    Every mode runs with x, weight and bias requiring grad, as in a training
    step, so forward builds the autograd graph a training forward builds (and
    torch.compile runs its training graph in every mode).

    backward times only the backward, and the very backward a training step
    runs: each ``setup()`` runs the forward of the next input set (untimed),
    each ``timed()`` runs ``torch.autograd.grad`` on the oldest pending graph,
    made ``len(samples) - 1`` forwards earlier, so its inputs are out of cache
    as they are after the rest of a network's forward. We do not time "full
    minus forward" (the difference of two noisy medians, which can even come
    out negative), nor repeated backwards of one graph with
    ``retain_graph=True`` (torch.compile's backward refuses retain_graph when
    it donates saved buffers, and keeping the graph is not what training does).
    Gradients are returned by autograd.grad, not accumulated into ``.grad``, so
    no accumulation kernel is timed.

    A function with two outputs (``(y, s)``: LayerNorm / RMSNorm with a fused
    residual) is differentiated with ``dy`` and ``ds`` together, so the
    gradient flows into both, as in a pre-norm block.

    What a timed call returns (the outputs, or the gradients) stays alive for
    the next ``len(samples)`` calls, as its inputs rotate: otherwise each call
    would write into the memory the previous call just freed, which is still
    in cache, and how often that happens depends on each provider's pattern of
    small allocations in glibc, not on its kernels. (Measured here at (4096,
    1024): torch's LayerNorm wrote into one block call after call, at 1.1 ms
    a call, ours into three to five in turn, at 1.4 ms; with every output
    kept alive like this, ours is 1.0-1.2x torch's speed.)
    """
    n = len(samples)
    targets = [grad_targets(s, grad_params) for s in samples]
    counter = [0]
    results = collections.deque(maxlen=n)

    def next_index():
        i = counter[0]
        counter[0] = (i + 1) % n
        return i

    if mode == "forward":
        def forward():
            s = samples[next_index()]
            results.append(fn(s["x"], s["residual"]))
        return None, forward
    if mode == "full":
        def full():
            i = next_index()
            s = samples[i]
            results.append(backward(fn(s["x"], s["residual"]), s, targets[i]))
        return None, full
    if mode == "backward":
        pending = collections.deque()

        def forward_next():
            i = next_index()
            pending.append((fn(samples[i]["x"], samples[i]["residual"]), i))

        for _ in range(max(1, n - 1)):
            forward_next()

        def backward_oldest():
            y, i = pending.popleft()
            results.append(backward(y, samples[i], targets[i]))
        return forward_next, backward_oldest
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(suites.MODES)}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def warm_up(setup: Optional[Callable], timed: Callable, device: str, seconds: float,
            min_calls: int = 3) -> None:
    """Call ``setup`` and ``timed`` at least ``min_calls`` times and for at least ``seconds``."""
    start = time.perf_counter()
    calls = 0
    while calls < min_calls or time.perf_counter() - start < seconds:
        if setup is not None:
            setup()
        timed()
        calls += 1
    _sync(device)


def _summary(times: list) -> tuple:
    if len(times) < 2:
        return times[0], 0.0, len(times)
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0], len(times)


def time_cpu(setup: Optional[Callable], timed: Callable, min_run_time: float,
             min_runs: int = 5) -> list:
    """Seconds per call of ``timed`` on the CPU, one value per measured block or call.

    Without a setup: torch.utils.benchmark's ``blocked_autorange`` with this
    process's thread count (Timer would use one thread otherwise); each block's
    mean per call is one value. With a setup that must stay out of the timing
    (Timer has no per-call setup): perf_counter around each call, at least
    ``min_runs`` calls.
    """
    if setup is None:
        timer = torch_benchmark.Timer(stmt="timed()", globals={"timed": timed},
                                      num_threads=torch.get_num_threads())
        return list(timer.blocked_autorange(min_run_time=min_run_time).times)
    times = []
    while len(times) < min_runs or sum(times) < min_run_time:
        setup()
        t0 = time.perf_counter()
        timed()
        times.append(time.perf_counter() - t0)
    return times


def time_cuda(setup: Optional[Callable], timed: Callable, min_run_time: float, min_runs: int = 10,
              max_runs: int = 1000) -> list:
    """Seconds per call of ``timed``, one CUDA event pair per call.

    ``setup`` (if any) is queued before each start event, so the events time ``timed`` alone.
    """
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        if setup is not None:
            setup()
        timed()
    torch.cuda.synchronize()
    estimate = (time.perf_counter() - t0) / 3
    runs = int(min(max(min_run_time / max(estimate, 1e-7), min_runs), max_runs))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(runs)]
    for start, end in events:
        if setup is not None:
            setup()
        start.record()
        timed()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e-3 for start, end in events]


def peak_memory_mb(setup: Optional[Callable], timed: Callable, device: str) -> str:
    """Memory one timed call allocates at its peak beyond what was allocated before (CUDA), else "n/a"."""
    if device != "cuda":
        return "n/a"
    if setup is not None:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    timed()
    torch.cuda.synchronize()
    return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"


class CsvWriter:
    """Appends rows to a CSV, writing the header when the file is new."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != COLUMNS:
                raise SystemExit(f"{path} has other columns than this harness writes; "
                                 "move it away or pass another --out")
        else:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def write(self, row: dict) -> None:
        """Append one row (a dict keyed by COLUMNS) and flush it to disk."""
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(row)


class Settings:
    """Timing budget per row: ``min_run_time`` seconds of timed calls, split into ``rounds``."""

    def __init__(self, device: str, quick: bool, min_run_time: Optional[float] = None):
        if quick:
            self.min_run_time, self.warmup_s, self.rounds = 0.01, 0.0, 1
        else:
            self.min_run_time = 1.0 if device == "cpu" else 0.3
            self.warmup_s = 0.3 if device == "cpu" else 0.1
            self.rounds = ROUNDS
        if min_run_time is not None:
            self.min_run_time = min_run_time


def _prefix(k: int, total: int, case: suites.Case, mode: str, provider: str) -> str:
    tail = " +residual" if case.residual else ""
    return (f"[{k}/{total}] {case.op} {mode} {case.shape_str} {case.layout} {case.dtype_str} "
            f"{case.activation_str}{tail} {provider}")


def _build(provider: str, case: suites.Case, device: str, samples: list, modes: list) -> tuple:
    """``(fn, grad_params)`` of ``provider``, after one untimed call (and backward): torch.compile
    compiles its forward and backward graphs here, and errors surface early."""
    fn, params = suites.build(provider, case, device)
    grad_params = suites.OPS[case.op].grad_params(params)
    s = samples[0]
    y = fn(s["x"], s["residual"])
    check_outputs(y, case)
    if any(m != "forward" for m in modes):
        backward(y, s, grad_targets(s, grad_params), allow_unused=True)
    del y
    _sync(device)
    return fn, grad_params


def run_suite(cases: list, device: str, providers: list, modes: list, writer: CsvWriter,
              run_id: str, settings: Settings, counter: list, total: int) -> list:
    """Time every (case, provider, mode) on ``device``, appending a CSV row each.

    The providers of a (case, mode) are timed in turns: ``settings.rounds``
    rounds, each giving every provider a share of ``min_run_time``, and each
    row's median is over all its rounds. A slow spell of a shared machine then
    falls on every provider alike instead of on whichever ran during it.

    ``counter`` is a one-element list holding how many rows ran so far (shared
    across devices for the ``[k/total]`` progress). Returns the failures as
    ``(label, message)``; a failing provider does not stop the others.
    """
    failures = []
    name = device_name(device)
    threads = torch.get_num_threads()
    timer = time_cuda if device == "cuda" else time_cpu

    def fail(label: str, prefix: str, e: Exception) -> None:
        log(f"{prefix}: FAILED ({type(e).__name__}: {e})")
        failures.append((label, f"{type(e).__name__}: {e}"))

    for case in cases:
        samples = make_samples(case, device, rotation_count(case, device))
        built = {}
        for provider in providers:
            label = f"{case.describe()} {provider}"
            try:
                t0 = time.perf_counter()
                built[provider] = _build(provider, case, device, samples, modes)
                if provider == "torch_compile":
                    log(f"      compiled {label} in {time.perf_counter() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001 - report and go on with the other providers
                for mode in modes:
                    counter[0] += 1
                    fail(label, _prefix(counter[0], total, case, mode, provider), e)
        for mode in modes:
            steps, times = {}, {}
            for provider, (fn, grad_params) in built.items():
                try:
                    steps[provider] = make_step(mode, fn, samples, grad_params)
                    warm_up(*steps[provider], device, settings.warmup_s)
                    times[provider] = []
                except Exception as e:  # noqa: BLE001
                    counter[0] += 1
                    fail(f"{case.describe()} {provider} {mode}", _prefix(counter[0], total, case, mode, provider), e)
                    steps.pop(provider, None)
            for _ in range(settings.rounds):
                for provider in list(times):
                    try:
                        times[provider] += timer(*steps[provider], settings.min_run_time / settings.rounds)
                    except Exception as e:  # noqa: BLE001
                        counter[0] += 1
                        fail(f"{case.describe()} {provider} {mode}",
                             _prefix(counter[0], total, case, mode, provider), e)
                        del times[provider]
            for provider, provider_times in times.items():
                counter[0] += 1
                prefix = _prefix(counter[0], total, case, mode, provider)
                median, iqr, runs = _summary(provider_times)
                try:
                    peak = peak_memory_mb(*steps[provider], device)
                except Exception as e:  # noqa: BLE001
                    fail(f"{case.describe()} {provider} {mode}", prefix, e)
                    continue
                gbps = suites.OPS[case.op].bytes_moved(case, mode) / median / 1e9
                writer.write({
                    "run_id": run_id, "op": case.op, "provider": provider, "mode": mode,
                    "shape": case.shape_str, "dtype": case.dtype_str, "layout": case.layout,
                    "activation": case.activation_str, "residual": int(case.residual),
                    "device": device, "device_name": name, "torch_version": torch.__version__,
                    "threads": threads, "median_ms": f"{median * 1e3:.5g}", "iqr_ms": f"{iqr * 1e3:.3g}",
                    "runs": runs, "gb_per_s": f"{gbps:.4g}", "peak_mem_mb": peak,
                })
                log(f"{prefix}: {median * 1e3:.3g} ms ({gbps:.1f} GB/s, IQR {iqr * 1e3:.2g} ms, {runs} runs)")
            del steps
        del built, samples
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return failures
