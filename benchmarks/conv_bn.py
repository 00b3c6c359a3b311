"""Conv+BatchNorm at model level: training memory and step time of
``torchnorm.fx.fuse_conv_bn`` (batch statistics and frozen BatchNorm), and
inference speed, error and coverage of ``torchnorm.fx.fold_conv_bn`` against
``torch.fx.experimental.optimization.fuse``.

``python -m benchmarks.conv_bn [--device cpu|cuda] [--quick] [--out results.md]``
(also run by ``python -m benchmarks`` as the suite ``conv_bn``). Writes a
markdown report (and a CSV of the same rows beside it).

Saved bytes are the unique storages autograd keeps for backward after one
forward (parameters excluded), counted with saved_tensors_hooks; for the fused
model, a rebuildable block output counts as the tensors its recipe keeps.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import harness

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------- models --

def resnet50(num_classes: int = 1000) -> torch.nn.Module:
    """torchvision's ResNet-50, or the same architecture defined here when
    torchvision is not installed."""
    try:
        import torchvision
        return torchvision.models.resnet50(num_classes=num_classes)
    except ImportError:
        return _ResNet50(num_classes)


class _Bottleneck(torch.nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != width * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(width * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class _ResNet50(torch.nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(_Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def dcgan_generator(latent: int = 100, width: int = 64) -> torch.nn.Module:
    """DCGAN's generator (Radford et al., 2015): a 1x1 latent vector up to a
    64x64 RGB image through ConvTranspose2d -> BatchNorm2d -> ReLU layers."""
    nn = torch.nn
    layers, cin = [], latent
    for i, cout in enumerate((width * 8, width * 4, width * 2, width)):
        first = i == 0  # 1x1 -> 4x4; the others double the size
        layers += [nn.ConvTranspose2d(cin, cout, 4, 1 if first else 2, 0 if first else 1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    layers += [nn.ConvTranspose2d(cin, 3, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def mobilenet_v2() -> Optional[torch.nn.Module]:
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision.models.mobilenet_v2()


def randomize_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Trained-like BatchNorm statistics (fresh ones are mean 0, var 1, which
    hide folding errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_((torch.rand(c, generator=gen) - 0.5) * 0.4)
    return model


# ------------------------------------------------------------ measuring --

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_rounds(fns: Dict[str, Callable[[], None]], device: str, warmup: int, reps: int) -> Dict[str, List[float]]:
    """Seconds of each call of each function, the functions called in turn (one call each per
    round), so a slow spell of a shared machine falls on all of them alike. Each round starts
    one function later, so none always runs in the cache and allocator state that the same
    other one leaves behind."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_seconds(fns: Dict[str, Callable[[], None]], device: str, warmup: int, reps: int) -> Dict[str, float]:
    """Median seconds per call of each function, timed by :func:`timed_rounds`."""
    return {name: statistics.median(t) for name, t in timed_rounds(fns, device, warmup, reps).items()}


def iqr(times: List[float]) -> float:
    """Interquartile range of a list of timings (0 for fewer than two)."""
    if len(times) < 2:
        return 0.0
    q = statistics.quantiles(times, n=4)
    return q[2] - q[0]


def verdict(value: float, goal: float) -> str:
    """A ratio against its goal (at most `goal`), for the reports."""
    return f"{'met' if value <= goal else 'NOT met'} (goal <= {goal:.2f}x)"


def checked_calls(suite: str, label: str, device: str, steps: Dict[str, Callable[[], Dict[str, Callable[[], None]]]],
                  failures: List[Tuple[str, str]]) -> Dict[str, Dict[str, Callable[[], None]]]:
    """The timed calls ``{mode: call}`` of each model of a ratio suite, from ``steps[model]()``,
    after one untimed call of its last mode (errors surface there, not in the timing). A model
    that fails is logged and added to ``failures``; the others are kept and timed."""
    calls = {}
    for name, make in steps.items():
        try:
            fns = make()
            list(fns.values())[-1]()
            calls[name] = fns
        except Exception as e:  # noqa: BLE001 - report it, time the others
            harness.log(f"{suite} {name} {label} on {device}: FAILED ({type(e).__name__}: {e})")
            failures.append((f"{suite} {name} {label} {device}", f"{type(e).__name__}: {e}"))
    return calls


def median_columns(row: dict, rounds: Dict[str, List[float]], names) -> Dict[str, float]:
    """Adds each model's median ms and interquartile range (``<name>_ms``, ``<name>_iqr_ms``;
    empty for a model that was not timed) to a report row; returns the medians in ms."""
    ms = {name: statistics.median(t) * 1e3 for name, t in rounds.items()}
    for name in names:
        row[f"{name}_ms"] = f"{ms[name]:.4g}" if name in ms else ""
        row[f"{name}_iqr_ms"] = f"{iqr(rounds[name]) * 1e3:.3g}" if name in ms else ""
    return ms


def per_round_ratio(rounds: Dict[str, List[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of one model's time over another's: the two calls of a round ran
    back to back, so their ratio is free of the machine's slower drifts, which move both medians."""
    return statistics.median(a / b for a, b in zip(rounds[numerator], rounds[denominator]))


def ratio_suite_main(prog: str, doc: str, slug: str, run: Callable, argv=None) -> int:
    """The command line of a model-level suite that writes a markdown report of
    ratios (sequence, small_batch): ``run(device, quick, out) -> (rows,
    failures)``; prints the report, exits 1 when a model failed."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--out", help=f"markdown report (default: benchmarks/results/local/{slug}-<device>.md)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(RESULTS, "local", f"{slug}-{harness.device_slug(args.device)}.md")
    rows, failures = run(args.device, args.quick, out)
    with open(out) as f:
        print(f.read(), end="")
    return 1 if failures else 0


def report_title(what: str, rows: List[dict], quick: bool) -> str:
    """A ratio suite report's first line: what it times, the device, torch's
    version and the threads of its rows (and that --quick is no measurement)."""
    first = rows[0] if rows else {}
    threads = first.get("threads", "")
    return (f"# {what} ({first.get('device', '')}, torch {torch.__version__}, {threads} "
            f"thread{'' if threads == 1 else 's'}" + (", --quick: not a measurement" if quick else "") + ")")


def median_cell(row: dict, name: str) -> str:
    """A report cell: `name`'s median ms (interquartile range), or "failed"."""
    return f"{row[name + '_ms']} ({row[name + '_iqr_ms']})" if row[name + "_ms"] else "failed"


def write_report(rows: List[dict], columns: List[str], out_md: str, lines: List[str]) -> None:
    """A suite's report: the rows as a CSV of `columns` beside out_md (same
    stem, .csv), and the markdown lines in out_md."""
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(os.path.splitext(out_md)[0] + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)
    with open(out_md, "w") as f:
        f.write("\n".join(lines) + "\n")


class SavedBytes:
    """Unique storages kept for backward, parameters excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: Dict[int, int] = {}

    def __call__(self, t: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.params:
                self.storages[ptr] = t.untyped_storage().nbytes()

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def training_step(model: torch.nn.Module, x: torch.Tensor, counter: Optional[SavedBytes] = None) -> None:
    """Forward, backward, drop the gradients (one SGD-free training step).
    ``counter`` sees every tensor saved for backward, through ordinary
    saved-tensor hooks (the fused blocks keep theirs through autograd too)."""
    context = contextlib.nullcontext()
    if counter is not None:
        def pack(t):
            counter(t)
            return t
        context = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with context:
        loss = model(x).float().square().mean()
    loss.backward()
    for p in model.parameters():
        p.grad = None


def train_rows(device: str, quick: bool) -> List[dict]:
    """Saved bytes and step time of fuse_conv_bn's model against the plain
    one: ResNet-50 (the issue's goals) and DCGAN's generator (ConvTranspose
    chains), with batch statistics and with frozen BatchNorm."""
    batch, size = (2, 64) if quick else ((32, 224) if device == "cuda" else (8, 112))
    gan_batch = 2 if quick else (128 if device == "cuda" else 32)
    rows = []
    for name, factory, shape in (("ResNet-50", resnet50, (batch, 3, size, size)),
                                 ("DCGAN generator", dcgan_generator, (gan_batch, 100, 1, 1))):
        rows += _train_rows_of(name, factory, torch.randn(shape, device=device), device, quick)
    return rows


def _train_rows_of(model_name: str, factory: Callable[[], torch.nn.Module], x: torch.Tensor, device: str,
                   quick: bool) -> List[dict]:
    import torchnorm.fx
    # On this shared 2-core CPU a step's time varies by 5-10% from one step to
    # the next, so the CPU rows take 15 steps each (in turn) for their medians.
    warmup, reps = (1, 2) if quick else ((3, 10) if device == "cuda" else (2, 15))
    rows = []
    for mode in ("batch statistics", "frozen BN"):
        plain = factory().to(device)
        fused = torchnorm.fx.fuse_conv_bn(copy.deepcopy(plain))
        for model in (plain, fused):
            model.train()
            if mode == "frozen BN":
                for m in model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.eval()
        result = {}
        for name, model in (("torch", plain), ("torchnorm", fused)):
            counter = SavedBytes(model)
            training_step(model, x, counter)
            peak = ""
            if device == "cuda":
                torch.cuda.synchronize()
                harness.reset_device_peak()
                training_step(model, x)
                peak = torch.cuda.max_memory_allocated() / 2**20
            result[name] = (counter.total, peak)
        harness.log(f"conv_bn train {model_name} ({mode}): timing {reps} steps each, torch and torchnorm in turn")
        rounds = timed_rounds({"torch": lambda: training_step(plain, x),
                               "torchnorm": lambda: training_step(fused, x)}, device, warmup, reps)
        (base_bytes, base_peak), base_s = result["torch"], statistics.median(rounds["torch"])
        (ours_bytes, ours_peak), ours_s = result["torchnorm"], statistics.median(rounds["torchnorm"])
        # The two steps of a round ran back to back: their ratio is free of
        # the machine's slower drifts, which move both medians.
        paired = statistics.median(o / b for o, b in zip(rounds["torchnorm"], rounds["torch"]))
        rows.append({
            "benchmark": f"{model_name} training step, {mode}", "device": harness.device_name(device),
            "shape": str(tuple(x.shape)),
            "torch": f"{base_bytes / 2**20:.1f} MiB saved, {base_s * 1e3:.0f} ms"
                     + (f", peak {base_peak:.0f} MiB" if peak != "" else ""),
            "torchnorm": f"{ours_bytes / 2**20:.1f} MiB saved, {ours_s * 1e3:.0f} ms"
                         + (f", peak {ours_peak:.0f} MiB" if peak != "" else ""),
            "ratio": f"saved bytes {ours_bytes / base_bytes:.2f}x, step time {ours_s / base_s:.2f}x "
                     f"(per round: {paired:.2f}x)"
                     + (f", peak {ours_peak / base_peak:.2f}x" if peak != "" else ""),
        })
    return rows


def _batch_norm_count(model: torch.nn.Module) -> int:
    """BatchNorms still computed: module calls and F.batch_norm calls of a
    GraphModule (torch's fuse traces through timm's BatchNormAct2d and keeps
    its F.batch_norm), or BatchNorm modules of a plain model."""
    if isinstance(model, torch.fx.GraphModule):
        modules = dict(model.named_modules())
        return sum(n.target is torch.nn.functional.batch_norm or (
            n.op == "call_module" and isinstance(modules[n.target], torch.nn.modules.batchnorm._BatchNorm))
            for n in model.graph.nodes)
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def inference_rows(device: str, quick: bool) -> List[dict]:
    import torchnorm.fx
    from torch.fx.experimental.optimization import fuse
    from torchnorm.fx.fold import _relative_error
    batch, size = (2, 64) if quick else ((32, 224) if device == "cuda" else (8, 224))
    warmup, reps = (1, 2) if quick else ((5, 20) if device == "cuda" else (2, 9))
    rows = []
    models = [("ResNet-50", resnet50()), ("MobileNetV2", mobilenet_v2())]
    for name, model in models:
        if model is None:
            continue
        model = randomize_batch_norms(model).eval().to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        ours = torchnorm.fx.fold_conv_bn(model, (x,))
        theirs = fuse(model)
        with torch.no_grad():
            harness.log(f"conv_bn inference {name}: timing {reps} runs each, unfused, torch fuse and torchnorm in turn")
            times = median_seconds({"unfused": lambda: model(x), "torch fuse": lambda: theirs(x),
                                    "torchnorm": lambda: ours(x)}, device, warmup, reps)
            # Error of each fold against the unfused model, all three run in
            # float64 so only the folded weights differ (the float32 run
            # mostly measures float32 convolution rounding, the same for all).
            x64 = x.double()
            truth = copy.deepcopy(model).double()(x64)
            err_ours = _relative_error(copy.deepcopy(ours).double()(x64), truth)
            err_theirs = _relative_error(copy.deepcopy(theirs).double()(x64), truth)
            err32_ours, err32_theirs = _relative_error(ours(x), truth), _relative_error(theirs(x), truth)
        rows.append({
            "benchmark": f"{name} inference (eval), folded", "device": harness.device_name(device),
            "shape": f"({batch}, 3, {size}, {size})",
            "torch": f"unfused {times['unfused'] * 1e3:.1f} ms; fuse {times['torch fuse'] * 1e3:.1f} ms "
                     f"({times['unfused'] / times['torch fuse']:.2f}x), weight error {err_theirs:.1e}, "
                     f"float32 output error {err32_theirs:.1e}",
            "torchnorm": f"{times['torchnorm'] * 1e3:.1f} ms ({times['unfused'] / times['torchnorm']:.2f}x), "
                         f"weight error {err_ours:.1e}, float32 output error {err32_ours:.1e}",
            "ratio": f"speed vs torch fuse {times['torch fuse'] / times['torchnorm']:.2f}x; "
                     f"BatchNorms left: ours {_batch_norm_count(ours)}, torch {_batch_norm_count(theirs)}",
        })
    rows.extend(coverage_rows(device))
    return rows


def coverage_rows(device: str) -> List[dict]:
    """Folds torch's fuse cannot do: ConvTranspose, Linear + BatchNorm1d, timm's BatchNormAct2d."""
    import torchnorm.fx
    from torch.fx.experimental.optimization import fuse
    from torchnorm.fx.fold import _relative_error
    nn = torch.nn
    cases = [
        ("ConvTranspose2d + BatchNorm2d", nn.Sequential(nn.ConvTranspose2d(16, 8, 3, 2, groups=2), nn.BatchNorm2d(8)),
         torch.randn(2, 16, 9, 9)),
        ("Linear + BatchNorm1d", nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16)), torch.randn(4, 32)),
    ]
    try:
        import timm
        cases.append(("timm efficientnet_b0 (BatchNormAct2d)", timm.create_model("efficientnet_b0", num_classes=10),
                      torch.randn(2, 3, 64, 64)))
    except ImportError:
        pass
    rows = []
    for name, model, x in cases:
        model = randomize_batch_norms(model).eval().to(device)
        x = x.to(device)
        ours = torchnorm.fx.fold_conv_bn(model, (x,))
        theirs = fuse(model)
        with torch.no_grad():
            err = _relative_error(ours(x), model(x))
        rows.append({
            "benchmark": f"fold coverage: {name}", "device": harness.device_name(device),
            "shape": str(tuple(x.shape)),
            "torch": f"BatchNorms left {_batch_norm_count(theirs)} of {_batch_norm_count(model)} by fuse",
            "torchnorm": f"BatchNorms left {_batch_norm_count(ours)}, output error {err:.1e}",
            "ratio": "",
        })
    return rows


COLUMNS = ["benchmark", "device", "shape", "torch", "torchnorm", "ratio"]


def write(rows: List[dict], out_md: str) -> None:
    lines = [f"# Conv+BatchNorm ({rows[0]['device'] if rows else ''}, torch {torch.__version__})", "",
             "| " + " | ".join(COLUMNS[:1] + COLUMNS[2:]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in COLUMNS if c != "device") + " |")
    write_report(rows, COLUMNS, out_md, lines)


def run(device: str, quick: bool, out_md: str) -> List[dict]:
    torch.manual_seed(0)
    rows = train_rows(device, quick) + inference_rows(device, quick)
    write(rows, out_md)
    harness.log(f"conv_bn: wrote {out_md}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conv_bn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny inputs: a smoke test")
    ap.add_argument("--out", help="markdown report (default: benchmarks/results/local/conv-bn-<device>.md)")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(RESULTS, "local", f"conv-bn-{harness.device_slug(args.device)}.md")
    for row in run(args.device, args.quick, out):
        print(" | ".join(str(row[c]) for c in COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
