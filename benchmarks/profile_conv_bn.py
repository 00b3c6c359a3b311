"""Where the time of a ResNet-50 training step goes, fuse_conv_bn's model
against the plain one: per step, the wall time, the host time (until the
step's last launch returns, no sync), the device time summed over kernels,
the launch count, and the kernels whose time differs most between the two.

It answers what the step-time ratio of ``python -m benchmarks.conv_bn``
alone cannot: whether the fused model is slower because its kernels take
longer (device time) or because the host issues them more slowly (host time
near wall time). On the CPU the "kernels" are ATen and torchnorm operators
(self time), which is only a smoke test of this script.

    python -m benchmarks.profile_conv_bn --device cuda --out profile.md
"""
import argparse
import copy
import os
import re
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from . import harness
from .conv_bn import RESULTS, _sync, resnet50, training_step

MODES = ("batch statistics", "frozen BN")


def _set_mode(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    model.train()
    if mode == "frozen BN":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


def step_times(model: torch.nn.Module, x: torch.Tensor, device: str, steps: int) -> Tuple[float, float]:
    """Median (host, wall) seconds of a step: host until the step's Python
    call returns (on a GPU the kernels may still run), wall until the device
    is done."""
    host, wall = [], []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        training_step(model, x)
        issued = time.perf_counter()
        _sync(device)
        host.append(issued - start)
        wall.append(time.perf_counter() - start)
    return statistics.median(host), statistics.median(wall)


def _short(name: str, width: int = 110) -> str:
    """A kernel's name for the table: its first `width` characters, template
    arguments included (they name the functor of ATen's element-wise and
    reduction kernels), without a leading "void " or table separators."""
    name = re.sub(r"\s+", " ", re.sub(r"^void ", "", name)).replace("|", "/")
    return name if len(name) <= width else name[:width - 3] + "..."


def kernel_times(model: torch.nn.Module, x: torch.Tensor, device: str,
                 steps: int) -> Dict[str, Tuple[float, float]]:
    """Per kernel (name shortened): (calls per step, microseconds per step)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            training_step(model, x)
        _sync(device)
    totals: Dict[str, List[float]] = {}
    for e in prof.key_averages():
        if device == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
        else:
            if not e.key.startswith(("aten::", "torchnorm::")):
                continue
            us = e.self_cpu_time_total
        entry = totals.setdefault(_short(e.key), [0.0, 0.0])
        entry[0] += e.count
        entry[1] += us
    return {name: (calls / steps, us / steps) for name, (calls, us) in totals.items()}


def profile_mode(mode: str, x: torch.Tensor, device: str, steps: int) -> dict:
    import torchnorm.fx
    plain = _set_mode(resnet50().to(device), mode)
    fused = _set_mode(torchnorm.fx.fuse_conv_bn(copy.deepcopy(plain)), mode)
    result = {}
    for name, model in (("torch", plain), ("torchnorm", fused)):
        for _ in range(3):
            training_step(model, x)
        harness.log(f"profile_conv_bn {mode}, {name}: timing and profiling {steps} steps")
        host, wall = step_times(model, x, device, steps)
        kernels = kernel_times(model, x, device, steps)
        result[name] = {"host_ms": host * 1e3, "wall_ms": wall * 1e3, "kernels": kernels,
                        "device_ms": sum(us for _, us in kernels.values()) / 1e3,
                        "launches": sum(calls for calls, _ in kernels.values())}
    return result


def report(results: Dict[str, dict], device: str, shape: tuple, top: int) -> str:
    unit = "kernel" if device == "cuda" else "operator (self CPU time)"
    lines = [f"# Conv+BatchNorm training step profile ({harness.device_name(device)}, torch {torch.__version__})",
             "", f"ResNet-50, input {shape}; per step, medians of the timed steps.", ""]
    for mode, r in results.items():
        t, o = r["torch"], r["torchnorm"]
        lines += [f"## {mode}", "", "| | torch | torchnorm | ratio |", "|---|---|---|---|"]
        for key, label in (("wall_ms", "wall ms"), ("host_ms", "host ms (no sync)"),
                           ("device_ms", f"{unit} ms, summed"), ("launches", f"{unit} calls")):
            ratio = f"{o[key] / t[key]:.2f}x" if t[key] else "n/a"
            lines.append(f"| {label} | {t[key]:.2f} | {o[key]:.2f} | {ratio} |")
        names = set(t["kernels"]) | set(o["kernels"])
        diff = sorted(names, key=lambda n: -abs(o["kernels"].get(n, (0, 0))[1] - t["kernels"].get(n, (0, 0))[1]))
        lines += ["", f"The {top} {unit}s whose time differs most (calls per step, microseconds per step):", "",
                  "| name | torch calls | torch us | torchnorm calls | torchnorm us | difference us |",
                  "|---|---|---|---|---|---|"]
        for n in diff[:top]:
            tc, tu = t["kernels"].get(n, (0, 0.0))
            oc, ou = o["kernels"].get(n, (0, 0.0))
            lines.append(f"| `{n}` | {tc:g} | {tu:.0f} | {oc:g} | {ou:.0f} | {ou - tu:+.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_conv_bn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, help="default: 32 on a GPU, 8 on the CPU (the conv_bn suite's)")
    ap.add_argument("--size", type=int, help="image size; default: 224 on a GPU, 112 on the CPU")
    ap.add_argument("--steps", type=int, default=10, help="timed and profiled steps per model and mode")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per mode")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of: {', '.join(MODES)}")
    ap.add_argument("--out", help="markdown report (default: benchmarks/results/local/conv-bn-profile-<device>.md)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.steps < 1:
        ap.error(f"--modes: unknown {unknown}" if unknown else "--steps must be at least 1")
    gpu = args.device == "cuda"
    size = args.size or (224 if gpu else 112)
    shape = (args.batch or (32 if gpu else 8), 3, size, size)
    torch.manual_seed(0)
    x = torch.randn(shape, device=args.device)
    results = {mode: profile_mode(mode, x, args.device, args.steps) for mode in modes}
    text = report(results, args.device, shape, args.top)
    out = args.out or os.path.join(RESULTS, "local", f"conv-bn-profile-{harness.device_slug(args.device)}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(text)
    harness.log(f"profile_conv_bn: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
