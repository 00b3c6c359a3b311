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
import ctypes
import gc
import logging
import math
import os
import re
import resource
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


def _x_bytes(case: suites.Case) -> int:
    return max(1, math.prod(case.shape) * torch.empty((), dtype=case.dtype).element_size())


def set_bytes(case: suites.Case) -> int:
    """Bytes of one input set: x, dy (and ds, residual)."""
    return _x_bytes(case) * (1 + suites.OPS[case.op].outputs(case) + case.residual)


def rotation_count(case: suites.Case, device: str) -> int:
    """How many input sets to rotate through: about twice the cache in inputs, 2 to 16 of them."""
    n = math.ceil(2 * last_level_cache_bytes(device) / _x_bytes(case))
    return max(2, min(n, MAX_ROTATION, ROTATION_BUDGET_BYTES // set_bytes(case)))


def make_samples(case: suites.Case, device: str, count: int, gradients: bool = True) -> list:
    """``count`` input sets ``{x, dy, ds, residual}`` in the case's layout; x and residual require grad.

    ``ds``, the gradient of a second output (the residual sum s of LayerNorm /
    RMSNorm), is None when the op has one output; ``residual`` is None when
    the case has none. Without ``gradients`` (a forward-only run) ``dy`` and
    ``ds`` are None: no one reads them, and at (8192, 4096) they would hold
    half of the inputs' memory.
    """
    g = torch.Generator(device=device).manual_seed(0)
    fmt = suites.memory_format(case)

    def tensor(requires_grad):
        t = torch.empty(case.shape, dtype=case.dtype, device=device, memory_format=fmt)
        return t.normal_(generator=g).requires_grad_(requires_grad)

    two = suites.OPS[case.op].outputs(case) == 2
    return [{"x": tensor(True), "dy": tensor(False) if gradients else None,
             "ds": tensor(False) if two and gradients else None,
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


# Memory goes back to the system between rows (release_memory), so a row's
# first calls page-fault their blocks in again; the calls before timing go on
# until a pass of them faults at most this many pages a call (256 KiB, about
# what Python's own allocations touch), so the timed calls run on warm pages.
# Even without that release a provider's heap layout can shift now and then
# (a block lands at a fresh address), which is why the fill repeats.
SETTLED_FAULTS_PER_CALL = 64
MAX_FILL_PASSES = 4


def minor_faults() -> int:
    """Page faults of this process so far (all threads), that needed no disk."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Step:
    """One provider's timed call in one mode: ``timed()`` is what is timed, ``setup`` (a
    function, or None) runs untimed before each timed call. Each call takes the next input set.

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

    What a timed call returns (the outputs, or the gradients) stays alive
    until ``n = len(samples)`` calls later, as its inputs rotate: otherwise
    each call would write into the memory the previous call just freed, which
    is still in cache, and how often that happens depends on each provider's
    pattern of small allocations in glibc, not on its kernels. (Measured here
    at (4096, 1024): torch's LayerNorm wrote into one block call after call,
    at 1.1 ms a call, ours into three to five in turn, at 1.4 ms; with every
    output kept alive like this, ours is 1.0-1.2x torch's speed.) Each call
    drops the oldest of the ``n`` kept results just before it runs, so the
    block it gets back was written ``n`` calls ago (``n - 1`` input sets and
    outputs have gone through the cache since), and only ``n`` results exist
    at once, the new one included.

    That state (the kept outputs, and backward's pending graphs) is held only
    during the provider's turn: ``release()`` drops it when the turn ends and
    ``fill()`` rebuilds it, untimed, before the next, so the memory of a row is
    its inputs and one provider's state, not every provider's at once (at
    (8192, 4096) with a residual, torch's RMSNorm keeps three 128 MiB tensors
    a call: s, y and the normalized input it saves for backward). After
    ``fill()`` every kept output is as old as in an unbroken run, and what the
    other provider freed (some of it still in cache) has been written over by
    the untimed calls.
    """

    def __init__(self, mode: str, fn: Callable, samples: list, grad_params: list):
        if mode not in suites.MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(suites.MODES)}")
        self.mode, self.fn, self.samples = mode, fn, samples
        self.targets = [grad_targets(s, grad_params) for s in samples]
        self.n = len(samples)
        self.index = 0
        self.results = collections.deque(maxlen=self.n)
        self.pending = collections.deque()  # backward: (forward output, input index), oldest first
        self.setup = self._forward_next if mode == "backward" else None
        self.timed = {"forward": self._forward, "full": self._full, "backward": self._backward_oldest}[mode]

    def _next_index(self) -> int:
        i = self.index
        self.index = (i + 1) % self.n
        return i

    def _call(self, i: int):
        return self.fn(self.samples[i]["x"], self.samples[i]["residual"])

    def _drop_oldest(self) -> None:
        if len(self.results) == self.n:
            self.results.popleft()

    def _forward(self) -> None:
        self._drop_oldest()
        self.results.append(self._call(self._next_index()))

    def _full(self) -> None:
        i = self._next_index()
        self._drop_oldest()
        self.results.append(backward(self._call(i), self.samples[i], self.targets[i]))

    def _forward_next(self) -> None:
        i = self._next_index()
        self.pending.append((self._call(i), i))

    def _backward_oldest(self) -> None:
        y, i = self.pending.popleft()
        self._drop_oldest()
        self.results.append(backward(y, self.samples[i], self.targets[i]))

    def fill(self) -> None:
        """Bring the kept state to what an unbroken run has (untimed): ``n - 1`` pending
        forwards for backward, then passes of ``n`` calls, so ``n`` outputs are kept, until a
        pass no longer page-faults (see SETTLED_FAULTS_PER_CALL; at most MAX_FILL_PASSES)."""
        if self.mode == "backward":
            while len(self.pending) < max(1, self.n - 1):
                self._forward_next()
        for _ in range(MAX_FILL_PASSES):
            faults = minor_faults()
            for _ in range(self.n):
                if self.setup is not None:
                    self.setup()
                self.timed()
            if minor_faults() - faults <= SETTLED_FAULTS_PER_CALL * self.n:
                break

    def release(self) -> None:
        """Drop the kept outputs and pending graphs (between turns and rows, never while timing)."""
        self.results.clear()
        self.pending.clear()


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
    reset_device_peak()
    base = torch.cuda.memory_allocated()
    timed()
    torch.cuda.synchronize()
    return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"


# ------------------------------------------------------------------ memory --
# Between rows (never while timing) a run hands back what the row used: under
# WARM_PAGES_ENV glibc never trims its heap by itself, so without this the
# process grew with every row it ran (14.5 GB for `make bench`) instead of
# with its largest row.

# The run's peak of torch.cuda.max_memory_allocated, across the resets of the
# per-row measurements (see reset_device_peak).
_device_peak_bytes = 0


def _malloc_trim() -> None:
    """glibc's malloc_trim(0): give the free pages of every heap back to the system (no-op elsewhere)."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # raises (ValueError / OSError) where the C library is not glibc
        ctypes.CDLL(None).malloc_trim(0)
    except (ValueError, OSError, AttributeError):
        pass


def reset_device_peak() -> None:
    """Start a new peak of ``torch.cuda.max_memory_allocated``, keeping the old one in the run's peak."""
    global _device_peak_bytes
    if torch.cuda.is_initialized():
        _device_peak_bytes = max(_device_peak_bytes, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()


def device_peak_bytes() -> Optional[int]:
    """The most CUDA memory tensors held at once in this run so far, or None when CUDA was not used."""
    if not torch.cuda.is_initialized():
        return None
    return max(_device_peak_bytes, torch.cuda.max_memory_allocated())


def resident_peak_bytes() -> tuple:
    """Peak resident memory ``(this process, its largest waited-for child)`` (ru_maxrss, KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return tuple(resource.getrusage(who).ru_maxrss * scale
                 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def resident_bytes() -> int:
    """This process's resident memory now (/proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _reset_resident_peak() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its resident memory now
    (Linux >= 4.0: writing 5 to /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _resident_peak_bytes_now() -> Optional[int]:
    """VmHWM of /proc/self/status: peak resident memory since the last reset (None where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def step_peak_mib(step: Callable[[], None], device: str) -> Optional[float]:
    """MiB one call of ``step`` holds at its peak beyond what was held before it, or None
    where it cannot be measured. CUDA: torch.cuda.max_memory_allocated (tensors). CPU, which
    has no allocator statistics: the peak of resident memory, reset after collecting garbage
    and giving the free heap back (:func:`_malloc_trim`), so the pages the call touches at
    its peak count, fragmentation included; another thread's allocations in the meantime
    would count too, so call it while nothing else runs."""
    if device == "cuda":
        return float(peak_memory_mb(None, step, device))
    gc.collect()
    _malloc_trim()
    if not _reset_resident_peak():
        return None
    base = resident_bytes()
    step()
    peak = _resident_peak_bytes_now()
    if peak is None or not base:
        return None
    return max(peak - base, 0) / 2**20


def release_memory(device: str, compiled: bool = False) -> None:
    """Return what a finished row used: collect unreachable objects (autograd graphs in cycles),
    drop torch.compile's graphs when ``compiled``, give freed heap back to the system, and on
    CUDA empty the caching allocator and start a new device peak.

    The caller drops its own references (inputs, outputs, functions) first.
    """
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    _malloc_trim()
    if device == "cuda":
        reset_device_peak()
        torch.cuda.empty_cache()


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


# ------------------------------------------------------ time estimate --
# A cost model of the run's wall time: the estimate printed at the start,
# and (rescaled by how long the work done so far took against it) the time
# left in the progress lines. Its constants were fitted to runs on the 2-core
# AMD EPYC VM the committed results come from, while other jobs shared it
# (load average 4-5): `make bench`, 225 rows in 796 s (the model: 799 s), and
# --quick, 117 rows in 22 s (the model: 27 s). On another machine it is a
# rough guide only.
COST_GBPS = {"cpu": 3e9, "cuda": 1e12}  # an op's minimal bytes moved per second of a typical provider's call
COST_TURN_S = {"cpu": 0.17, "cuda": 0.05}  # per round of a row, besides its calls: Timer's estimate, the fill passes
COST_RANDN_BPS = 4e8  # bytes of inputs made per second (torch's normal_)
COST_CASE_S = 0.3  # per case, besides its inputs: building the providers, releasing memory
# torch.compile of one case, its forward and backward graphs (a cold compile;
# with inductor's on-disk cache warm, from the second run on, about 0.2 s).
COST_COMPILE_S = {"cpu": 5.0, "cuda": 15.0}


def call_cost_s(case: suites.Case, mode: str, device: str) -> float:
    """Modelled seconds of one call of a step in ``mode`` (backward: with its untimed forward)."""
    op = suites.OPS[case.op]
    seconds = op.bytes_moved(case, mode) / COST_GBPS[device]
    if mode == "backward":
        seconds += op.bytes_moved(case, "forward") / COST_GBPS[device]
    return seconds


def row_cost_s(case: suites.Case, mode: str, device: str, settings: "Settings") -> float:
    """Modelled seconds of one row: warm-up, then in each round the untimed fill, Timer's
    block-size estimate and the timed calls (at least one, however long it takes)."""
    c, n = call_cost_s(case, mode, device), rotation_count(case, device)
    turn = COST_TURN_S[device] + (n + 1.5) * c + max(settings.min_run_time / settings.rounds, c)
    return max(settings.warmup_s, (n + 1) * c) + settings.rounds * turn


def case_cost_s(case: suites.Case, device: str, providers: list) -> float:
    """Modelled seconds of a case besides its rows: inputs, building (compiling) the providers."""
    inputs = rotation_count(case, device) * set_bytes(case)
    return (COST_CASE_S + inputs / COST_RANDN_BPS
            + (COST_COMPILE_S[device] if "torch_compile" in providers else 0.0))


def suite_cost_s(cases: list, device: str, providers: list, modes: list, settings: "Settings") -> float:
    """Modelled seconds of ``run_suite`` on these arguments."""
    return sum(case_cost_s(case, device, providers)
               + len(providers) * sum(row_cost_s(case, mode, device, settings) for mode in modes)
               for case in cases)


def duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``1 h 05 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Rows done out of the run's total, the time elapsed and an estimate of the time left.

    Every piece of work is announced with its modelled cost (``done(cost)``); the
    time left is the model's cost of what remains times how long the work done
    took against its model, so the estimate adapts to the machine as the run goes.
    """

    def __init__(self, total_rows: int, estimate_s: float):
        self.total, self.rows = total_rows, 0
        self.estimate_s, self.done_s = estimate_s, 0.0
        self.start = time.perf_counter()

    def done(self, cost_s: float, rows: int = 0) -> None:
        """Count ``rows`` more rows and ``cost_s`` more modelled seconds as done."""
        self.rows += rows
        self.done_s += cost_s

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start

    def status(self) -> str:
        """``2 min 10 s elapsed, ~5 min 40 s left``."""
        elapsed = self.elapsed()
        scale = elapsed / self.done_s if self.done_s > 0 else 1.0
        left = max(0.0, self.estimate_s - self.done_s) * scale
        return f"{duration(elapsed)} elapsed, ~{duration(left)} left"


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


def _peak_memory(step: Step, device: str) -> str:
    """peak_memory_mb of one call of ``step`` in its steady state (CUDA), else "n/a"."""
    if device != "cuda":
        return "n/a"
    try:
        step.fill()
        return peak_memory_mb(step.setup, step.timed, device)
    finally:
        step.release()


def run_suite(cases: list, device: str, providers: list, modes: list, writer: CsvWriter,
              run_id: str, settings: Settings, progress: Progress) -> list:
    """Time every (case, provider, mode) on ``device``, appending a CSV row each.

    The providers of a (case, mode) are timed in turns: ``settings.rounds``
    rounds, each giving every provider a share of ``min_run_time``, and each
    row's median is over all its rounds. A slow spell of a shared machine then
    falls on every provider alike instead of on whichever ran during it. A
    provider's kept outputs live for its turn only (see Step).

    Between rows, never while timing, memory goes back (``release_memory``):
    after each mode its steps, after each case its inputs and functions
    (torch.compile's graphs too), so the process holds one row's memory at a
    time, not every row's it ran.

    ``progress`` counts the rows (shared across devices for the ``[k/total]``
    progress). Returns the failures as ``(label, message)``; a failing
    provider does not stop the others.
    """
    failures = []
    row = _RowWriter(device, run_id, settings, progress, writer, failures)
    for case in cases:
        samples = make_samples(case, device, rotation_count(case, device),
                               gradients=any(m != "forward" for m in modes))
        built = {}
        for provider in providers:
            try:
                t0 = time.perf_counter()
                built[provider] = _build(provider, case, device, samples, modes)
                if provider == "torch_compile":
                    log(f"      compiled {case.describe()} {provider} in {time.perf_counter() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001 - report and go on with the other providers
                for mode in modes:
                    row.failed(case, mode, provider, e)
        progress.done(case_cost_s(case, device, providers))
        for mode in modes:
            _time_mode(case, mode, built, samples, device, settings, row)
            release_memory(device)
        del built, samples
        release_memory(device, compiled="torch_compile" in providers)
    return failures


class _RowWriter:
    """Writes a row's CSV line and progress line, or its failure."""

    def __init__(self, device: str, run_id: str, settings: Settings, progress: Progress,
                 writer: CsvWriter, failures: list):
        self.device, self.run_id, self.settings, self.progress = device, run_id, settings, progress
        self.writer, self.failures = writer, failures
        self.name, self.threads = device_name(device), torch.get_num_threads()

    def failed(self, case: suites.Case, mode: str, provider: str, e: Exception) -> None:
        """Count the row as done and record its failure."""
        self.progress.done(row_cost_s(case, mode, self.device, self.settings), rows=1)
        log(f"{_prefix(self.progress.rows, self.progress.total, case, mode, provider)}: "
            f"FAILED ({type(e).__name__}: {e})")
        self.failures.append((f"{case.describe()} {provider} {mode}", f"{type(e).__name__}: {e}"))

    def write(self, case: suites.Case, mode: str, provider: str, times: list, peak: str) -> None:
        """Append the row of ``times`` (seconds per call) to the CSV and print its progress line."""
        self.progress.done(row_cost_s(case, mode, self.device, self.settings), rows=1)
        median, iqr, runs = _summary(times)
        gbps = suites.OPS[case.op].bytes_moved(case, mode) / median / 1e9
        self.writer.write({
            "run_id": self.run_id, "op": case.op, "provider": provider, "mode": mode,
            "shape": case.shape_str, "dtype": case.dtype_str, "layout": case.layout,
            "activation": case.activation_str, "residual": int(case.residual),
            "device": self.device, "device_name": self.name, "torch_version": torch.__version__,
            "threads": self.threads, "median_ms": f"{median * 1e3:.5g}", "iqr_ms": f"{iqr * 1e3:.3g}",
            "runs": runs, "gb_per_s": f"{gbps:.4g}", "peak_mem_mb": peak,
        })
        log(f"{_prefix(self.progress.rows, self.progress.total, case, mode, provider)}: {median * 1e3:.3g} ms "
            f"({gbps:.1f} GB/s, IQR {iqr * 1e3:.2g} ms, {runs} runs) | {self.progress.status()}")


def _time_mode(case: suites.Case, mode: str, built: dict, samples: list, device: str,
               settings: Settings, row: _RowWriter) -> None:
    """Time the providers ``built`` (``{provider: (fn, grad_params)}``) of one case in one mode,
    in turns, and write their rows. Returns holding nothing of the mode's steps."""
    timer = time_cuda if device == "cuda" else time_cpu
    steps, times = {}, {}
    for provider, (fn, grad_params) in built.items():
        try:
            steps[provider] = step = Step(mode, fn, samples, grad_params)
            warm_up(step.setup, step.timed, device, settings.warmup_s)
            step.fill()  # until its calls no longer page-fault
            step.release()
            times[provider] = []
        except Exception as e:  # noqa: BLE001
            row.failed(case, mode, provider, e)
            steps.pop(provider, None)
    for _ in range(settings.rounds):
        for provider in list(times):
            step = steps[provider]
            try:
                step.fill()
                times[provider] += timer(step.setup, step.timed, settings.min_run_time / settings.rounds)
            except Exception as e:  # noqa: BLE001
                row.failed(case, mode, provider, e)
                del times[provider]
            finally:
                step.release()
    for provider, provider_times in times.items():
        try:
            peak = _peak_memory(steps[provider], device)
        except Exception as e:  # noqa: BLE001
            row.failed(case, mode, provider, e)
            continue
        row.write(case, mode, provider, provider_times, peak)
