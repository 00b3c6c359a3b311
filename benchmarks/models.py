"""Real models' training steps: the original against ``torchnorm.convert``,
against ``torchnorm.convert`` + fusion, and against ``torch.compile`` of the
original, in the same run; time and peak memory of a step.

``python -m benchmarks.models [--device cpu|cuda] [--quick] [--out results.md]
[--models llama,unet] [--no-compile]``
(also run by ``python -m benchmarks`` as the suite ``models``). Writes a
markdown report and a CSV of the same rows beside it. The client libraries
are optional: a model whose library is missing is reported as skipped.

Models (float32, training mode), the issue's configurations (``--quick``
shrinks each to a smoke test of a few seconds):

- ``bert``: transformers ``BertModel``, 2 layers, hidden 512, 8 heads,
  intermediate 2048; batch 8 x 256 tokens;
- ``llama``: transformers ``LlamaForCausalLM``, 4 layers, hidden 1024, 16
  heads, intermediate 2816 (8/3 of hidden, rounded up to 256, as Llama
  sizes it), vocabulary 1000; batch 4 x 512 tokens;
- ``unet``: diffusers ``UNet2DModel``, channels (128, 256, 512), a plain
  down/up block then two with attention, 2 layers per block, 32 groups;
  batch 8 at 32x32, 3 channels;
- ``convnext_tiny``, ``resnet50``: timm's, 1000 classes; batch 8 at
  128x128, 3 channels.

Variants, each its own copy of one initialization:

- ``original``: the model as the library builds it;
- ``convert``: ``torchnorm.convert(model)``;
- ``convert+fuse``: converted, then fused where the time is: BERT by
  ``torchnorm.fx.fuse_norms_in`` (its residual add + LayerNorm blocks trace),
  Llama by ``torchnorm.integrations.transformers.apply`` (residual add +
  post-attention RMSNorm), the UNet by ``torchnorm.integrations.diffusers.apply``
  (each ResNet block's first GroupNorm + SiLU); these layers do not trace.
  resnet50 by ``torchnorm.fx.fuse_conv_bn``: every Conv + BatchNorm (+
  residual) (+ ReLU) chain becomes one block that keeps about half the
  activations for backward and recomputes the rest. ``fx.fuse_norms``
  would fuse only the stem's and each Bottleneck's first BatchNorm + ReLU
  (the others have timm's DropBlock, an Identity module, between norm and
  activation), and in two probes of 1+5 and 1+10 rounds at this size (2
  threads, under a load of 2 to 6) it ran at 0.95x of the original's speed
  both times, while fuse_conv_bn ran at 0.90x and 1.04x (convert alone
  1.05x, 1.04x): fuse_conv_bn is the fusion meant for training a ResNet,
  and the memory columns show what it saves; its time is for a quiet run
  to settle. convnext_tiny has nothing to fuse: its norms
  take a depthwise conv's output (no residual add) and feed a Linear (no
  activation), so its convert+fuse is its convert (``fuse_norms_in`` finds
  nothing);
- ``without norms`` (only the models with a speed goal, Llama and the UNet):
  the original with every normalization module (those ``torchnorm.convert``
  would swap), and on the UNet every SiLU
  module too, replaced by ``torch.nn.Identity``. It computes something else
  and is timed only for its step time: original / without norms is the
  ceiling of any norm implementation and fusion of them (the reported
  "ceiling"), since even free norms and activations leave the rest of the
  step (on these models the matrix products and convolutions) as it is;
- ``compiled``: ``torch.compile(original)`` (inductor). Its first step
  compiles and is not timed; its seconds are logged and in the CSV
  (``compile_s``). Where compiling fails the row says ``compile failed:
  <reason>`` and the other variants are timed as usual. ``--quick`` does
  not compile (``not compiled (--quick)``): even dynamo's capture alone
  (the ``eager`` backend) took longer than the rest of the smoke test.

A step is forward, ``loss = (output * dy).mean()``, backward and an SGD
step (gradients set to None first). The variants are timed in turns
(:func:`benchmarks.conv_bn.timed_rounds`), so a slow spell of a shared
machine lands on all of them alike; the report gives median ms, the
interquartile range, and each variant's step speed relative to the original
(original ms / variant ms) from the medians and, in brackets, the median of
the per-round ratios, and convert+fuse's speed relative to the compiled
original. Goals (the issue's): convert+fuse at least 1.05x on Llama and the
UNet, convert and convert+fuse nowhere below 0.98x.

Peak memory of a step (:func:`benchmarks.harness.step_peak_mib`), measured
after the timing, one variant at a time: what one steady-state step adds at
its peak to what the process held before it (the model, its inputs and the
previous step's gradients); CUDA from ``torch.cuda.max_memory_allocated``,
CPU from the peak resident memory, reset before the step (Linux
``/proc/self/clear_refs``). On the CPU that counts pages, so allocator
fragmentation counts too; it is "n/a" where the kernel has no such reset.
"""
from __future__ import annotations

import copy
import csv
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import harness
from .conv_bn import iqr, ratio_suite_main, timed_rounds
from .harness import release_memory

VARIANTS = ("original", "convert", "convert+fuse", "compiled", "without norms")
TORCHNORM_VARIANTS = ("convert", "convert+fuse")  # the ones the goals are about
MEMORY_VARIANTS = ("original", "convert", "convert+fuse", "compiled")
GOAL_SPEEDUP = {"llama": 1.05, "unet": 1.05}  # at least this speed vs the original
FLOOR_SPEEDUP = 0.98  # and never below this
# The modules "without norms" replaces by Identity besides the norms: the
# activations convert+fuse fuses into them (only the UNet's fusion takes one).
STRIPPED_ACTIVATIONS = {"unet": (torch.nn.SiLU,)}
SKIPPED = "skipped"


def _bert(quick: bool):
    import transformers

    hidden, layers, heads, inter, batch, tokens = (32, 1, 4, 64, 2, 16) if quick else (512, 2, 8, 2048, 8, 256)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=inter)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    return model, (ids,), lambda out: out.last_hidden_state, f"{layers} layers, hidden {hidden}, {batch}x{tokens}"


def _llama(quick: bool):
    import transformers

    hidden, layers, heads, inter, batch, tokens = (32, 1, 4, 96, 2, 16) if quick else (1024, 4, 16, 2816, 4, 512)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=max(tokens, 32))
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    return model, (ids,), lambda out: out.logits, f"{layers} layers, hidden {hidden}, {heads} heads, {batch}x{tokens}"


def _unet(quick: bool):
    import diffusers

    channels, groups, batch, size = ((16, 32, 64), 8, 2, 8) if quick else ((128, 256, 512), 32, 8, 32)
    model = diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                                  norm_num_groups=groups,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return model, (x, t), lambda out: out.sample, f"channels {channels}, {batch} at {size}x{size}"


def _timm(name: str, tiny: dict):
    def build(quick: bool):
        import timm

        batch, size = (2, 32) if quick else (8, 128)
        model = timm.create_model(name, pretrained=False, **(tiny if quick else {}))
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        return model, (x,), lambda out: out, f"{batch} at {size}x{size}" + (" (tiny depths/widths)" if quick else "")

    return build


MODELS: Dict[str, Callable] = {
    "bert": _bert, "llama": _llama, "unet": _unet,
    "convnext_tiny": _timm("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))),
    "resnet50": _timm("resnet50", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)),
}


def fuse(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The fused form of each model (after torchnorm.convert; in place where it can be)."""
    import torchnorm.integrations
    from torchnorm.fx import fuse_conv_bn, fuse_norms_in

    if name == "llama":
        torchnorm.integrations.transformers.apply(model)
    elif name == "unet":
        torchnorm.integrations.diffusers.apply(model)
    elif name == "resnet50":
        return fuse_conv_bn(model)  # a GraphModule sharing model's parameters
    else:
        fuse_norms_in(model)
    return model


def without_norms(model: torch.nn.Module, activations: tuple = ()) -> torch.nn.Module:
    """``model`` (in place) with every module ``torchnorm.convert`` would
    swap (its registry: torch.nn's norms and the libraries' known ones), and
    every module of the classes in ``activations``, replaced by
    ``torch.nn.Identity``: the step that free norms would leave, for the
    ceiling column."""
    from torchnorm.nn.convert import _conversion_for

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if _conversion_for(type(child)) is not None or isinstance(child, activations):
                setattr(parent, child_name, torch.nn.Identity())
    return model


def variants(name: str, model: torch.nn.Module, compile_backend: Optional[str]) -> Dict[str, torch.nn.Module]:
    """The variants of one model (deep copies of one initialization); no
    ``compiled`` when ``compile_backend`` is None; ``without norms`` only for
    the models with a speed goal."""
    import torchnorm

    out = {"original": copy.deepcopy(model), "convert": torchnorm.convert(copy.deepcopy(model)),
           "convert+fuse": fuse(name, torchnorm.convert(copy.deepcopy(model)))}
    if compile_backend is not None:
        out["compiled"] = torch.compile(copy.deepcopy(model), backend=compile_backend)
    if name in GOAL_SPEEDUP:
        out["without norms"] = without_norms(copy.deepcopy(model), STRIPPED_ACTIVATIONS.get(name, ()))
    return out


def _step(model: torch.nn.Module, inputs: tuple, output_of: Callable, device: str) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    dy: List[Optional[torch.Tensor]] = [None]

    def step():
        out = output_of(model(*inputs))
        if dy[0] is None:
            dy[0] = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        opt.zero_grad(set_to_none=True)
        (out * dy[0]).mean().backward()
        opt.step()

    return step


def _reason(e: Exception) -> str:
    """An exception in one line (torch.compile's messages run to pages)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}"


def _time_model(name: str, device: str, quick: bool, warmup: int, reps: int, compile_backend: Optional[str],
                failures: List[Tuple[str, str]]) -> dict:
    row = {"model": name, "device": harness.device_name(device), "threads": torch.get_num_threads(),
           "torch_version": torch.__version__}
    try:
        torch.manual_seed(0)
        model, inputs, output_of, config = MODELS[name](quick)
    except ImportError as e:
        harness.log(f"models {name}: skipped ({e})")
        return dict(row, config=SKIPPED)
    row["config"] = config
    row["compiled_status"] = "" if compile_backend else ("not compiled (--quick)" if quick else "not compiled")
    inputs = tuple(t.to(device) for t in inputs)
    calls = {}
    for variant, m in variants(name, model.to(device).train(), compile_backend).items():
        try:
            fn = _step(m, inputs, output_of, device)
            start = time.perf_counter()
            fn()  # one untimed step: errors surface here, torch.compile compiles here
            calls[variant] = fn
            if variant == "compiled":
                row["compile_s"] = f"{time.perf_counter() - start:.3g}"
                harness.log(f"models {name}: torch.compile (backend {compile_backend}), first step "
                            f"{row['compile_s']} s, compile included (not timed)")
        except Exception as e:  # noqa: BLE001 - report it, time the others
            if variant == "compiled":  # torch.compile's limits are a finding, not a failure of the suite
                row["compiled_status"] = f"compile failed: {_reason(e)}"
                harness.log(f"models {name}: {row['compiled_status']}")
                continue
            harness.log(f"models {name} {variant} on {device}: FAILED ({type(e).__name__}: {e})")
            failures.append((f"models {name} {variant} {device}", f"{type(e).__name__}: {e}"))
    harness.log(f"models {name} ({config}, {device}): timing {reps} training steps each, {', '.join(calls)} in turn")
    rounds = timed_rounds(calls, device, warmup, reps)
    ms = {v: statistics.median(t) * 1e3 for v, t in rounds.items()}
    # "without norms" is timed for the ceiling only: its memory says nothing.
    peaks = {v: harness.step_peak_mib(fn, device) for v, fn in calls.items() if v != "without norms"}
    for v in VARIANTS:
        row[f"{v}_ms"] = f"{ms[v]:.4g}" if v in ms else ""
        row[f"{v}_iqr_ms"] = f"{iqr(rounds[v]) * 1e3:.3g}" if v in ms else ""
        row[f"{v}_peak_mib"] = "" if peaks.get(v) is None else f"{peaks[v]:.4g}"
        if v != "original" and v in ms and "original" in ms:
            row[f"{v}_speedup"] = f"{ms['original'] / ms[v]:.4g}"
            row[f"{v}_speedup_per_round"] = f"{_per_round(rounds['original'], rounds[v]):.4g}"
            if v in TORCHNORM_VARIANTS:
                row[f"{v}_goal"] = goal_verdict(name, ms["original"] / ms[v], v)
            if peaks.get(v) and peaks.get("original"):
                row[f"{v}_peak_ratio"] = f"{peaks[v] / peaks['original']:.3g}"
    if "convert+fuse" in ms and "compiled" in ms:
        row["fuse_vs_compiled"] = f"{ms['compiled'] / ms['convert+fuse']:.4g}"
        row["fuse_vs_compiled_per_round"] = f"{_per_round(rounds['compiled'], rounds['convert+fuse']):.4g}"
    harness.log("  " + ", ".join(f"{v} {row[f'{v}_ms']} ms, peak {row[f'{v}_peak_mib'] or 'n/a'} MiB"
                                 for v in calls))
    return row


def _per_round(base: List[float], other: List[float]) -> float:
    """The median of the per-round ratios base / other."""
    return statistics.median(a / b for a, b in zip(base, other))


def goal_verdict(name: str, speedup: float, variant: str = "convert+fuse") -> str:
    """Whether a torchnorm variant's speedup meets the goals: convert+fuse
    >= GOAL_SPEEDUP[name] where there is one, and every variant >=
    FLOOR_SPEEDUP everywhere."""
    goal = GOAL_SPEEDUP.get(name, FLOOR_SPEEDUP) if variant == "convert+fuse" else FLOOR_SPEEDUP
    return f"{'met' if speedup >= goal else 'NOT met'} (goal >= {goal:.2f}x)"


def run(device: str, quick: bool, out_md: str, compile_backend: Optional[str] = "default",
        names: Optional[List[str]] = None) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """Time the models (``names``, default every one of MODELS) on ``device``,
    write the report; return ``(rows, failures)``. ``compile_backend``:
    torch.compile's backend for the ``compiled`` variant ("default": inductor,
    or none under ``quick``), None for no compiled variant."""
    if compile_backend == "default":
        compile_backend = None if quick else "inductor"
    # On the CPU a Llama or UNet step takes seconds: 7 rounds after one
    # warm-up keep the suite near half an hour.
    warmup, reps = (1, 2) if quick else ((3, 15) if device == "cuda" else (1, 7))
    failures, rows = [], []
    for name in names or MODELS:
        rows.append(_time_model(name, device, quick, warmup, reps, compile_backend, failures))
        release_memory(device, compiled=compile_backend is not None)
    write(rows, out_md, quick, device)
    harness.log(f"models: wrote {out_md}")
    return rows, failures


COLUMNS = (["model", "config", "device", "threads", "torch_version", "compiled_status", "compile_s"]
           + [f"{v}_{c}" for v in VARIANTS for c in ("ms", "iqr_ms", "peak_mib")]
           + [f"{v}_{c}" for v in VARIANTS[1:] for c in ("speedup", "speedup_per_round", "peak_ratio")]
           + [f"{v}_goal" for v in TORCHNORM_VARIANTS]
           + ["fuse_vs_compiled", "fuse_vs_compiled_per_round"])


def write(rows: List[dict], out_md: str, quick: bool = False, device: str = "cpu") -> None:
    """The report: a CSV of the rows (COLUMNS) and two markdown tables beside
    it, step time and peak memory (measured on ``device``)."""
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(os.path.splitext(out_md)[0] + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    first = rows[0] if rows else {}
    threads = first.get("threads", "")
    lines = [f"# Real models' training steps ({first.get('device', '')}, torch {torch.__version__}, {threads} "
             f"thread{'' if threads == 1 else 's'}" + (", --quick: not a measurement" if quick else "") + ")", "",
             "float32, training mode; a step is forward, a loss, backward and an SGD step. Median ms per step "
             "(interquartile range); speed is the original's time over the variant's, in the same run (the "
             "variants timed in turns), from the medians and, in brackets, the median of the per-round ratios. "
             "convert+fuse = torchnorm.convert, then fx.fuse_norms_in (bert; convnext_tiny, where it finds "
             "nothing), integrations.transformers.apply (llama), integrations.diffusers.apply (unet) or "
             "fx.fuse_conv_bn (resnet50); compiled = torch.compile(original), its compile not timed. Goals: "
             f"convert+fuse >= {GOAL_SPEEDUP['llama']:.2f}x on llama and unet, convert and convert+fuse "
             f">= {FLOOR_SPEEDUP:.2f}x everywhere. Ceiling (models with a speed goal): the original's time over "
             "its time without norms (every norm module, and on the UNet every SiLU, replaced by Identity): the "
             "most any norm implementation or fusion could give.", "",
             "| model | config | original ms | convert ms | convert+fuse ms | compiled ms | without norms ms "
             "| convert speed | convert+fuse speed | ceiling | convert+fuse vs compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, v):
        if r.get(v + "_ms"):
            return f"{r[v + '_ms']} ({r[v + '_iqr_ms']})"
        if v == "without norms":
            return "n/a" if r["model"] not in GOAL_SPEEDUP else "failed"
        return (r.get("compiled_status") or "failed") if v == "compiled" else "failed"

    def ceiling(r):
        if not r.get("without norms_speedup"):
            return "n/a"
        return f"{float(r['without norms_speedup']):.2f}x ({float(r['without norms_speedup_per_round']):.2f}x)"

    def speed(r, v):
        if not r.get(f"{v}_speedup"):
            return "n/a"
        return f"{float(r[f'{v}_speedup']):.2f}x ({float(r[f'{v}_speedup_per_round']):.2f}x): {r[f'{v}_goal']}"

    def vs_compiled(r):
        if not r.get("fuse_vs_compiled"):
            return "n/a"
        return f"{float(r['fuse_vs_compiled']):.2f}x ({float(r['fuse_vs_compiled_per_round']):.2f}x)"

    def peak(r, v):
        if not r.get(f"{v}_peak_mib"):
            return "n/a"
        ratio = r.get(f"{v}_peak_ratio")
        return r[f"{v}_peak_mib"] + (f" ({float(ratio):.2f}x)" if ratio else "")

    memory = ["", "Peak memory of one step, MiB beyond what the process held before it (in brackets: over "
              "the original's); " + ("torch.cuda.max_memory_allocated." if device == "cuda"
                                      else "peak resident memory (pages, fragmentation included)."), "",
              "| model | original | convert | convert+fuse | compiled |", "|---|---|---|---|---|"]
    for r in rows:
        if r["config"] == SKIPPED:
            lines.append(f"| {r['model']} | skipped: library not installed | | | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['config']} | " + " | ".join(cell(r, v) for v in VARIANTS) + " | "
                     + " | ".join(speed(r, v) for v in TORCHNORM_VARIANTS) + f" | {ceiling(r)} | {vs_compiled(r)} |")
        memory.append(f"| {r['model']} | " + " | ".join(peak(r, v) for v in MEMORY_VARIANTS) + " |")
    with open(out_md, "w") as f:
        f.write("\n".join(lines + memory) + "\n")


def main(argv=None) -> int:
    """The suite's command line, plus ``--models a,b`` (a subset of MODELS)
    and ``--no-compile`` (no compiled variant: compiling Llama and the UNet
    takes minutes here)."""
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--models", type=lambda s: s.split(","))
    ap.add_argument("--no-compile", action="store_true")
    own, rest = ap.parse_known_args(argv if argv is not None else sys.argv[1:])
    unknown = sorted(set(own.models or ()) - set(MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")

    def run_selected(device: str, quick: bool, out_md: str):
        return run(device, quick, out_md, None if own.no_compile else "default", own.models)

    return ratio_suite_main("python -m benchmarks.models", __doc__, "models", run_selected, rest)


if __name__ == "__main__":
    sys.exit(main())
