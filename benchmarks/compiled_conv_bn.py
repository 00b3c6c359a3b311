"""The compiled ResNet-50 training step: ``torch.compile(fuse_conv_bn(model),
fullgraph=True)`` against ``torch.compile(model, fullgraph=True)``, both
modes (batch statistics, frozen BatchNorm), the two timed in turns.

It measures the goal the ``conv_bn`` suite leaves out because compiling
ResNet-50 twice per mode takes minutes on a small CPU: the compiled fused
step at most 1.05x of the compiled unfused one (docs/conv_bn.md).

    python -m benchmarks.compiled_conv_bn --device cpu
"""
import argparse
import copy
import statistics
import sys
import time

import torch

from .conv_bn import _sync, resnet50, training_step
from .profile_conv_bn import MODES, _set_mode


def timed_steps(models: dict, x: torch.Tensor, device: str, rounds: int) -> dict:
    """Seconds of each model's step per round, the models in turns."""
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            _sync(device)
            start = time.perf_counter()
            training_step(model, x)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, help="default: 8 on cpu, 32 on cuda (the conv_bn suite's)")
    ap.add_argument("--size", type=int, help="default: 112 on cpu, 224 on cuda")
    ap.add_argument("--rounds", type=int, default=9, help="timed steps per model (default 9)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--backend", default="inductor", help="torch.compile's backend (default inductor)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        ap.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    cuda = args.device == "cuda"
    batch, size = args.batch or (32 if cuda else 8), args.size or (224 if cuda else 112)
    import torchnorm  # after argument parsing: --help needs no extension build

    print(f"compiled ResNet-50 training step, batch {batch} at {size}x{size}, {args.device}, "
          f"backend {args.backend}, {args.rounds} rounds, {torch.get_num_threads()} threads", flush=True)
    x = torch.randn(batch, 3, size, size, device=args.device)
    for mode in modes:
        torch.manual_seed(0)
        plain = _set_mode(resnet50().to(args.device), mode)
        fused = torchnorm.fx.fuse_conv_bn(copy.deepcopy(plain))
        models = {name: torch.compile(m, fullgraph=True, backend=args.backend)
                  for name, m in (("unfused", plain), ("fused", fused))}
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(3):  # compile, then settle
                training_step(model, x)
            print(f"{mode}: {name} compiled, first steps {time.perf_counter() - start:.0f} s", flush=True)
        times = timed_steps(models, x, args.device, args.rounds)
        unfused, fused_ms = (statistics.median(times[k]) * 1e3 for k in ("unfused", "fused"))
        per_round = statistics.median(f / u for f, u in zip(times["fused"], times["unfused"]))
        print(f"{mode}: compiled unfused {unfused:.4g} ms, compiled fused {fused_ms:.4g} ms, "
              f"fused / unfused {fused_ms / unfused:.3f}x (per round {per_round:.3f}x; goal <= 1.05x)", flush=True)
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
