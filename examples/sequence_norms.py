"""Train an LSTM, a BN-LSTM and a BN-RNN on digits read pixel by pixel, and plot
their training curves.

    python -m examples.sequence_norms            # about 4.5 minutes on one CPU thread
    python -m examples.sequence_norms --quick    # a smoke run: seconds

(from the repository root, where ``make build`` leaves torchnorm built in
place; ``python examples/sequence_norms.py`` where torchnorm is installed).

The task is sequential digits, a small offline cousin of the sequential MNIST
of Cooijmans et al. (2016): images of the digits 0-9 drawn from the fonts that
matplotlib ships (no download), randomly rotated, scaled, sheared and shifted,
shrunk to 8x8, then fed to the network one pixel per step (64 steps); the
class is read from the last hidden state.

The three models have the same size and see the same batches in the same
order, with the same optimizer:

- ``torch.nn.LSTM``;
- ``torchnorm.nn.BNLSTM`` (recurrent BatchNorm, Cooijmans et al. 2016: BN of
  both gate terms and of the cell, statistics per time step);
- ``torchnorm.nn.BNRNN(mode="lstm")`` (Laurent et al. 2015: BN of the input
  term only, statistics over batch and time).

Writes the plot (``--out``, default ``docs/images/sequence_norms.png``) and,
beside it, the same numbers as JSON (curves, and a summary: steps to reach
training losses 1.0/0.5/0.25 and 50/80/90% validation accuracy, final
accuracies, seconds of training). Validation accuracy is measured in eval
mode (BatchNorm with its running statistics, what ``model.eval()`` gives) and,
for the BN models, also with the statistics of each validation batch of 500
(training-mode BatchNorm, running statistics left as they are): the gap
between the two is the part the running estimates lose.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import torchnorm

try:  # python -m examples.sequence_norms, from the repository root
    from examples.digits import FONTS, digit_images, glyphs
except ImportError:  # python examples/sequence_norms.py
    from digits import FONTS, digit_images, glyphs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "docs", "images", "sequence_norms.png")

SIDE = 8  # image side: sequences of SIDE * SIDE steps
THRESHOLDS = (50, 80, 90)  # validation accuracy (%) whose first step is reported
LOSS_THRESHOLDS = (1.0, 0.5, 0.25)  # training loss whose first step is reported


# ------------------------------------------------------------------- data --

def make_digits(templates: torch.Tensor, count: int, seed: int, noise: float = 0.0):
    """``count`` distorted digits (:func:`digits.digit_images`, 8x8) as
    ``(64, count, 1)`` pixel sequences, row by row, and their labels."""
    images, label = digit_images(templates, count, seed, noise, SIDE)
    return images.reshape(count, SIDE * SIDE).t().unsqueeze(2).contiguous(), label


# ----------------------------------------------------------------- models --

class Classifier(torch.nn.Module):
    """A recurrent layer and a linear read-out of its last hidden state."""

    def __init__(self, rnn: torch.nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn, self.head = rnn, torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(x)
        return self.head(output[-1])


def make_models(hidden: int, steps: int) -> dict:
    """The three models, each built from the same seed."""
    def seeded(build):
        torch.manual_seed(0)
        return Classifier(build(), hidden)

    return {
        "LSTM": seeded(lambda: torch.nn.LSTM(1, hidden)),
        "BN-LSTM": seeded(lambda: torchnorm.nn.BNLSTM(1, hidden, max_length=steps)),
        "BN-RNN (LSTM)": seeded(lambda: torchnorm.nn.BNRNN(1, hidden, mode="lstm")),
    }


# --------------------------------------------------------------- training --

@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_stats: bool = False,
             batch: int = 500) -> float:
    """Percent correct on ``x`` in batches of ``batch``: in eval mode
    (BatchNorm with its running statistics, what ``model.eval()`` gives), or
    with ``batch_stats`` in training mode, each batch normalized with its own
    statistics (momentum 0, so the running statistics stay as they are)."""
    model.train(batch_stats)
    momentum = model.rnn.momentum if batch_stats else None
    if batch_stats:
        model.rnn.momentum = 0.0
    correct = sum(int((model(x[:, i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, x.shape[1], batch))
    if batch_stats:
        model.rnn.momentum = momentum
    model.train()
    return 100.0 * correct / x.shape[1]


def train(name: str, model: torch.nn.Module, data: tuple, args: argparse.Namespace) -> dict:
    """Adam, gradient norm clipped at 1 (the same for all three); every
    ``eval_every`` steps: mean training loss of those steps and validation
    accuracy, in eval mode and (BN models) with batch statistics. Batches come
    in an order fixed by the seed, the same for every model."""
    (x_train, y_train), (x_val, y_val) = data
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(1)
    n, per_epoch = x_train.shape[1], x_train.shape[1] // args.batch
    has_bn = hasattr(model.rnn, "momentum")
    curve = {"step": [], "train_loss": [], "val_acc": [], "val_acc_batch_stats": [], "elapsed_s": []}
    losses, perm, start = [], None, time.perf_counter()
    for step in range(1, args.steps + 1):
        k = (step - 1) % per_epoch
        if k == 0:  # a new epoch: a new permutation (drop the last partial batch)
            perm = torch.randperm(n, generator=order)
        idx = perm[k * args.batch:(k + 1) * args.batch]
        loss = F.cross_entropy(model(x_train[:, idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - start  # training time, evaluation included
            acc = accuracy(model, x_val, y_val)
            acc_batch = accuracy(model, x_val, y_val, batch_stats=True) if has_bn else None
            curve["step"].append(step)
            curve["train_loss"].append(sum(losses) / len(losses))
            curve["val_acc"].append(acc)
            curve["val_acc_batch_stats"].append(acc_batch)
            curve["elapsed_s"].append(round(elapsed, 2))
            print(f"{name:14s} step {step:5d}/{args.steps} epoch {step / per_epoch:5.1f}  "
                  f"loss {curve['train_loss'][-1]:.3f}  val acc {acc:5.1f}%"
                  + (f" ({acc_batch:5.1f}% with batch statistics)" if has_bn else "")
                  + f"  {elapsed:6.1f} s", flush=True)
            losses = []
    return curve


def _first_step(curve: dict, key: str, reached) -> object:
    """The first evaluated step whose ``curve[key]`` value is ``reached``, or None."""
    return next((s for s, v in zip(curve["step"], curve[key]) if v is not None and reached(v)), None)


def summary(curve: dict) -> dict:
    """Steps to reach each loss and accuracy threshold (None if never), final
    and best accuracies, seconds of training."""
    out = {f"steps_to_loss_{t}": _first_step(curve, "train_loss", lambda v, t=t: v <= t) for t in LOSS_THRESHOLDS}
    for key in ("val_acc", "val_acc_batch_stats"):
        out.update({f"steps_to_{t}pct_{key}": _first_step(curve, key, lambda v, t=t: v >= t) for t in THRESHOLDS})
    batch_accs = [a for a in curve["val_acc_batch_stats"] if a is not None]
    return {**out, "final_train_loss": curve["train_loss"][-1], "final_val_acc": curve["val_acc"][-1],
            "best_val_acc": max(curve["val_acc"]), "final_val_acc_batch_stats": batch_accs[-1] if batch_accs else None,
            "seconds": curve["elapsed_s"][-1]}


def summary_table(summaries: dict) -> str:
    """The summary as a markdown table: first steps at each threshold ("-": never)."""
    heads = ([f"loss <= {t}" for t in LOSS_THRESHOLDS] + [f"acc >= {t}%" for t in THRESHOLDS]
             + [f"acc >= {t}%, batch stats" for t in THRESHOLDS]
             + ["final acc", "final acc, batch stats", "seconds"])
    lines = ["| model | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for name, s in summaries.items():
        cells = [s[f"steps_to_loss_{t}"] for t in LOSS_THRESHOLDS] + [
            s[f"steps_to_{t}pct_{k}"] for k in ("val_acc", "val_acc_batch_stats") for t in THRESHOLDS]
        cells = ["-" if v is None else str(v) for v in cells]
        batch = s["final_val_acc_batch_stats"]
        cells += [f"{s['final_val_acc']:.1f}%", "-" if batch is None else f"{batch:.1f}%", f"{s['seconds']:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, c), color in zip(curves.items(), ("C0", "C1", "C2")):
        ax_loss.plot(c["step"], c["train_loss"], color=color, label=name)
        ax_acc.plot(c["step"], c["val_acc"], color=color, label=f"{name}, eval mode")
        if any(a is not None for a in c["val_acc_batch_stats"]):
            ax_acc.plot(c["step"], c["val_acc_batch_stats"], color=color, linestyle=":",
                        label=f"{name}, batch statistics")
    ax_loss.set(xlabel="training step", ylabel="training loss (mean since last point)", yscale="log")
    ax_acc.set(xlabel="training step", ylabel="validation accuracy (%)", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right" if ax is ax_loss else "lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: a few steps on a little data (seconds)")
    ap.add_argument("--out", help=f"the plot (.png); the JSON goes beside it (default: {os.path.relpath(DEFAULT_OUT)}, "
                                  "with --quick a file in the temp directory)")
    ap.add_argument("--steps", type=int, help="training steps per model (default 3000; --quick 6)")
    ap.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to every pixel (default 0)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: at hidden 64 the matrices are small, and a second thread "
                         "costs more in synchronization than it gains, above all on a shared machine)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (6 if args.quick else 3000)
    args.eval_every = 3 if args.quick else 50
    out = args.out or (os.path.join(tempfile.gettempdir(), "sequence_norms_quick.png") if args.quick
                       else DEFAULT_OUT)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    templates = glyphs()
    train_count, val_count = (256, 200) if args.quick else (10000, 2000)
    data = (make_digits(templates, train_count, seed=10, noise=args.noise),
            make_digits(templates, val_count, seed=20, noise=args.noise))
    steps = SIDE * SIDE
    print(f"sequential digits: {train_count} training and {val_count} validation sequences of {steps} steps, "
          f"{len(FONTS)} fonts ({time.perf_counter() - t0:.1f} s); hidden {args.hidden}, batch {args.batch}, "
          f"Adam lr {args.lr}, {args.steps} steps per model, {torch.get_num_threads()} thread(s)", flush=True)

    curves = {name: train(name, model, data, args) for name, model in make_models(args.hidden, steps).items()}
    results = {
        "task": f"sequential digits, {SIDE}x{SIDE} pixels one per step ({steps} steps), 10 classes",
        "settings": {"train": train_count, "val": val_count, "noise": args.noise, "hidden": args.hidden, "batch": args.batch,
                     "lr": args.lr, "steps": args.steps, "eval_every": args.eval_every,
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick},
        "summary": {name: summary(c) for name, c in curves.items()},
        "curves": curves,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    json_path = os.path.splitext(out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    plot(curves, out, f"{results['task']}; hidden {args.hidden}, batch {args.batch}, Adam {args.lr}")
    print("\n" + summary_table(results["summary"]))
    print(f"wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
