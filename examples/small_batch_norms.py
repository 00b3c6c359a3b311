"""Train the same small conv net with BatchNorm2d, OnlineNorm2d and
StreamingNorm2d at batch sizes 1, 4 and 32 on a digits task, and plot the
test accuracy of each.

    python -m examples.small_batch_norms            # about 4-5 minutes on one CPU thread
    python -m examples.small_batch_norms --quick    # a smoke run: seconds

(from the repository root, where ``make build`` leaves torchnorm built in
place; ``python examples/small_batch_norms.py`` where torchnorm is installed).

The question is the published claim of Online Normalization (Chiley et al.
2019): it matches BatchNorm at a large batch and holds up at batch size 1,
where BatchNorm fails (at batch 1 BatchNorm's training statistics are one
sample's, and its running estimates, used in eval mode, describe another
normalization than the one the net was trained with).

The task: digits drawn from matplotlib's fonts (``examples/digits.py``; no
download), randomly distorted, 12x12 pixels, 10 classes. The net: three 3x3
convolutions (16, 32, 32 channels; the last two of stride 2), each followed
by the norm and a ReLU, then a global average and a linear head. The norms
have their defaults: ``torchnorm.nn.BatchNorm2d`` (momentum 0.1),
``OnlineNorm2d`` (alpha_fwd 0.999, alpha_bkw 0.99, ecm="ls") and
``StreamingNorm2d`` (alpha (0.5, 0.5), k1 0.7; ``weight_update()`` of every
StreamingNorm module after each optimizer step), the last only where
torchnorm has it.

Every run sees the same number of training samples (``--samples``, 4 epochs
of 10000 by default) in the same order, so batch 1 takes 32 times the steps of
batch 32; the same optimizer (Adam, lr 1e-3) and the same initial weights for
all. Test accuracy on 2000 other digits is taken in eval mode (what
``model.eval()`` gives: BatchNorm with its running statistics, the online
norms with their state) ten times per run.

Writes the plot (``--out``, default ``docs/images/small_batch_norms.png``) and,
beside it, the same numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import torchnorm.nn

try:  # python -m examples.small_batch_norms, from the repository root
    from examples.digits import FONTS, digit_images, glyphs
except ImportError:  # python examples/small_batch_norms.py
    from digits import FONTS, digit_images, glyphs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "docs", "images", "small_batch_norms.png")
SIDE = 12
BATCHES = (1, 4, 32)
CHANNELS = (16, 32, 32)


def norms() -> dict:
    """Name -> constructor ``f(channels)`` of each norm this torchnorm has."""
    out = {"BatchNorm2d": torchnorm.nn.BatchNorm2d, "OnlineNorm2d": torchnorm.nn.OnlineNorm2d}
    if hasattr(torchnorm.nn, "StreamingNorm2d"):
        out["StreamingNorm2d"] = torchnorm.nn.StreamingNorm2d
    return out


class Net(torch.nn.Module):
    """conv 3x3 -> norm -> ReLU, three times (the last two of stride 2), global average, linear head."""

    def __init__(self, norm) -> None:
        super().__init__()
        layers, inputs = [], 1
        for i, channels in enumerate(CHANNELS):
            layers += [torch.nn.Conv2d(inputs, channels, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       norm(channels), torch.nn.ReLU()]
            inputs = channels
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(inputs, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Percent correct in eval mode, in batches of ``batch``."""
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return 100.0 * correct / len(x)


def train(name: str, norm, batch: int, data: tuple, args: argparse.Namespace) -> dict:
    """One run: ``args.samples`` training samples in batches of ``batch``, Adam;
    test accuracy (eval mode) at ``args.evals`` evenly spaced points."""
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(0)  # the same initial weights for every norm and batch size
    model = Net(norm)
    streaming = [m for m in model.modules() if hasattr(m, "weight_update")]
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(1)  # the same sample order for every run
    n, steps = len(x_train), args.samples // batch
    per_epoch = n // batch
    every = max(1, steps // args.evals)
    curve = {"samples": [], "train_loss": [], "test_acc": [], "elapsed_s": []}
    losses, perm, start = [], None, time.perf_counter()
    for step in range(1, steps + 1):
        k = (step - 1) % per_epoch
        if k == 0:  # a new epoch: a new permutation (drop the last partial batch)
            perm = torch.randperm(n, generator=order)
        idx = perm[k * batch:(k + 1) * batch]
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for m in streaming:
            m.weight_update()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            if curve["samples"] and curve["samples"][-1] == step * batch:
                continue
            acc = accuracy(model, x_test, y_test)
            elapsed = time.perf_counter() - start  # training time, evaluation included
            curve["samples"].append(step * batch)
            curve["train_loss"].append(sum(losses) / len(losses))
            curve["test_acc"].append(acc)
            curve["elapsed_s"].append(round(elapsed, 2))
            print(f"{name:15s} batch {batch:2d}  step {step:6d}/{steps}  samples {step * batch:6d}  "
                  f"loss {curve['train_loss'][-1]:.3f}  test acc {acc:5.1f}%  {elapsed:6.1f} s", flush=True)
            losses = []
    return curve


def summary_table(results: dict) -> str:
    """Final and best test accuracy (eval mode) per norm and batch size, as a markdown table."""
    lines = ["| norm | " + " | ".join(f"batch {b}: final (best) test acc" for b in BATCHES) + " | seconds |",
             "|---" * (len(BATCHES) + 2) + "|"]
    for name, runs in results.items():
        cells = [f"{runs[str(b)]['final_test_acc']:.1f}% ({runs[str(b)]['best_test_acc']:.1f}%)" for b in BATCHES]
        seconds = sum(runs[str(b)]["seconds"] for b in BATCHES)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(BATCHES), figsize=(12, 3.8), sharey=True)
    for ax, batch in zip(axes, BATCHES):
        for (name, runs), color in zip(results.items(), ("C0", "C1", "C2")):
            c = runs[str(batch)]["curve"]
            ax.plot(c["samples"], c["test_acc"], color=color, marker=".", label=name)
        ax.set(title=f"batch size {batch}", xlabel="training samples seen (thousands)", ylim=(0, 100))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy, eval mode (%)")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: a few samples of a little data (seconds)")
    ap.add_argument("--out", help=f"the plot (.png); the JSON goes beside it (default: {os.path.relpath(DEFAULT_OUT)}, "
                                  "with --quick a file in the temp directory)")
    ap.add_argument("--samples", type=int, help="training samples per run (default 40000: 4 epochs; --quick 64)")
    ap.add_argument("--evals", type=int, help="test evaluations per run (default 10; --quick 2)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the net is small, and batch 1 gains nothing from a second one)")
    args = ap.parse_args(argv)
    args.samples = args.samples or (64 if args.quick else 40000)
    args.evals = args.evals or (2 if args.quick else 10)
    out = args.out or (os.path.join(tempfile.gettempdir(), "small_batch_norms_quick.png") if args.quick
                       else DEFAULT_OUT)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    templates = glyphs()
    train_count, test_count = (256, 200) if args.quick else (10000, 2000)
    data = (digit_images(templates, train_count, seed=30, side=SIDE),
            digit_images(templates, test_count, seed=40, side=SIDE))
    available = norms()
    if "StreamingNorm2d" not in available:
        print("note: torchnorm.nn has no StreamingNorm2d: it is left out of this run", flush=True)
    print(f"digits: {train_count} training and {test_count} test images of {SIDE}x{SIDE}, {len(FONTS)} fonts "
          f"({time.perf_counter() - t0:.1f} s); {', '.join(available)} at batch sizes "
          f"{', '.join(map(str, BATCHES))}; {args.samples} training samples per run, Adam lr {args.lr}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    results = {}
    for name, norm in available.items():
        results[name] = {}
        for batch in BATCHES:
            curve = train(name, norm, batch, data, args)
            results[name][str(batch)] = {
                "steps": args.samples // batch, "final_test_acc": curve["test_acc"][-1],
                "best_test_acc": max(curve["test_acc"]), "final_train_loss": curve["train_loss"][-1],
                "seconds": curve["elapsed_s"][-1], "curve": curve}
    task = f"digits from {len(FONTS)} fonts, {SIDE}x{SIDE}, 10 classes"
    out_json = {
        "task": task,
        "net": f"3 x (conv 3x3 -> norm -> ReLU), channels {list(CHANNELS)}, strides [1, 2, 2]; mean; linear",
        "settings": {"train": train_count, "test": test_count, "samples_per_run": args.samples,
                     "batches": list(BATCHES), "lr": args.lr, "optimizer": "Adam", "evals": args.evals,
                     "norms": {name: repr(norm(8)) for name, norm in available.items()},
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick},
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    json_path = os.path.splitext(out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(out_json, f, indent=1)
    plot(results, out, f"{task}; same net, {args.samples} samples per run, Adam {args.lr}; eval mode")
    print("\n" + summary_table(results))
    print(f"wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
