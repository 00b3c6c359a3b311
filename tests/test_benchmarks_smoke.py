"""Smoke tests of the benchmark harness: `python -m benchmarks --quick` on the CPU.

The batch_norm suite runs with the torch provider only (no build needed); the
per-sample-norm suites (layer_norm, rms_norm, group_norm, instance_norm) run
with every provider (torch, torch_compile, torchnorm), so they need the built
extension (skipped when torchnorm._C is not built; a missing op fails).
The model-level suites (conv_bn, sequence, small_batch, cosine_norm) and the examples
The model-level suites (conv_bn, sequence, small_batch, weight_norm) and the examples
(sequence_norms.py, small_batch_norms.py) run at their --quick sizes; the
sequence suite's baseline, the per-step composition, is checked to compute
what torchnorm.nn.BNLSTM computes.
"""
import copy
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

# Each test runs the harness in a subprocess (a minute in all): slow.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EXPECTED_COLUMNS = {
    "run_id", "op", "provider", "mode", "shape", "dtype", "layout", "activation", "residual", "device",
    "device_name", "torch_version", "threads", "median_ms", "gb_per_s", "peak_mem_mb",
}
PROVIDERS = ["torch", "torch_compile", "torchnorm"]
MODES = {"forward", "backward", "full"}


def _run(tmp_path, *args, returncodes=(0,)):
    out = tmp_path / "bench.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode in returncodes, proc.stderr
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert EXPECTED_COLUMNS <= set(reader.fieldnames)
        rows = list(reader)
    md = (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return proc, rows, md


def _run_model_suite(tmp_path, suite, slug):
    """`python -m benchmarks --quick --suite <suite>` on the CPU, one thread:
    (the process, the rows of its report's CSV, its markdown)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--suite", suite,
         "--threads", "1", "--out", str(tmp_path / "bench.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / f"bench-{slug}-cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return proc, rows, (tmp_path / f"bench-{slug}-cpu.md").read_text()


def test_quick_cpu_torch(tmp_path):
    proc, rows, md = _run(tmp_path, "--suite", "batch_norm", "--providers", "torch")
    assert "[1/12] batch_norm forward" in proc.stderr  # progress lines
    assert "cpu: freed pages are reused" in proc.stderr  # restarted under WARM_PAGES_ENV
    assert len(rows) == 12  # 1 shape x 2 layouts x 2 activations x 3 modes
    assert {r["mode"] for r in rows} == MODES
    assert {r["layout"] for r in rows} == {"contiguous", "channels_last"}
    assert all(r["provider"] == "torch" and r["device"] == "cpu" for r in rows)
    assert all(float(r["median_ms"]) > 0 and float(r["gb_per_s"]) > 0 for r in rows)

    assert "#### batch_norm" in md
    assert "| mode | shape | layout | dtype | fused | torch ms |" in md
    assert md.count("| 4x16x8x8 |") == 12


# suite -> (quick shape, {(layout, activation, residual)} of its cases)
NORM_SUITES = {
    "layer_norm": ("64x256", {("contiguous", "none", "0"), ("contiguous", "none", "1")}),
    "rms_norm": ("64x256", {("contiguous", "none", "0"), ("contiguous", "none", "1")}),
    "group_norm": ("4x64x8x8", {(layout, act, "0") for layout in ("contiguous", "channels_last")
                                for act in ("none", "silu")}),
    "instance_norm": ("4x16x8x8", {("contiguous", "none", "0")}),
}


@pytest.fixture(scope="module")
def norm_run(tmp_path_factory):
    """One quick run of every per-sample-norm suite with every provider (one process: torch's import
    and the first compile are paid once). One thread: a smoke test, and robust on a busy machine."""
    try:
        import torchnorm._C  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torchnorm._C is not built ({type(e).__name__}: {e})")
    return _run(tmp_path_factory.mktemp("norms"), "--suite", ",".join(NORM_SUITES),
                "--providers", ",".join(PROVIDERS), "--threads", "1", returncodes=(0, 1))


@pytest.mark.parametrize("suite", list(NORM_SUITES))
def test_quick_cpu_all_providers(norm_run, suite):
    proc, all_rows, md = norm_run
    failed = [line for line in proc.stderr.splitlines() if f"] {suite} " in line and "FAILED" in line]
    assert not failed, "\n".join(failed)
    shape, cases = NORM_SUITES[suite]
    rows = [r for r in all_rows if r["op"] == suite]

    assert len(rows) == len(cases) * len(PROVIDERS) * len(MODES)
    assert {r["shape"] for r in rows} == {shape}
    assert {(r["layout"], r["activation"], r["residual"]) for r in rows} == cases
    assert all(r["dtype"] == "float32" and r["device"] == "cpu" for r in rows)
    assert all(float(r["median_ms"]) > 0 and float(r["gb_per_s"]) > 0 for r in rows)
    by_case = {}
    for r in rows:
        by_case.setdefault((r["mode"], r["layout"], r["activation"], r["residual"]), []).append(r["provider"])
    assert all(sorted(p) == sorted(PROVIDERS) for p in by_case.values())

    # The markdown has a section per op, with ratios to torch eager and to torch.compile.
    section = md.split(f"#### {suite}: ", 1)[1].split("####", 1)[0]
    assert ("| torch ms | torch_compile ms | torchnorm ms | torchnorm GB/s | torch_compile vs torch "
            "| torchnorm vs torch | torchnorm vs torch_compile |") in section
    assert section.count(f"| {shape} |") == len(rows) // len(PROVIDERS)
    assert "- full, torchnorm vs torch_compile: " in section


def test_suite_option():
    from benchmarks import __main__ as cli
    from benchmarks import suites

    every = list(suites.SUITES) + list(cli.MODEL_SUITES)
    default = [name for name in every if name != "models"]
    assert cli.OPT_IN_SUITES == ("models",)
    assert cli.parse_args([]).suites == default  # default: every suite but models, op suites first
    assert cli.parse_args(["--suite", "all"]).suites == every
    assert cli.parse_args(["--suite", "default,models"]).suites == every
    assert cli.parse_args(["--suite", "conv_bn"]).suites == ["conv_bn"]
    assert "small_batch" in every  # make bench runs it
    assert list(suites.SUITES)[0] == "batch_norm" and set(NORM_SUITES) <= set(suites.SUITES)
    assert cli.parse_args(["--suite", "rms_norm,layer_norm"]).suites == ["rms_norm", "layer_norm"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--suite", "nope"])


def test_bytes_moved():
    """GB/s counts the minimal traffic: tensors of the input's size, plus the parameters."""
    import torch
    from benchmarks import suites

    ln = suites.OPS["layer_norm"]
    x, p = 4096 * 1024 * 4, 1024 * 4
    case = suites.Case("layer_norm", (4096, 1024), torch.float32)
    assert ln.bytes_moved(case, "forward") == 2 * x + 2 * p  # x, y; w, b
    assert ln.bytes_moved(case, "backward") == 3 * x + 3 * p  # x, dy, dx; w, dw, db
    res = suites.Case("layer_norm", (4096, 1024), torch.float32, residual=True)
    assert ln.bytes_moved(res, "forward") == 4 * x + 2 * p  # x, r, y, s
    assert ln.bytes_moved(res, "backward") == 4 * x + 3 * p  # s, dy, ds, dx
    assert ln.bytes_moved(res, "full") == 8 * x + 5 * p
    assert suites.OPS["rms_norm"].bytes_moved(res, "forward") == 4 * x + p  # weight only
    gn = suites.Case("group_norm", (32, 64, 56, 56), torch.float32, activation="silu")
    assert suites.OPS["group_norm"].bytes_moved(gn, "backward") == 3 * 32 * 64 * 56 * 56 * 4 + 4 * 64 * 4


def test_quick_conv_bn(tmp_path):
    """The model-level suite: ResNet-50's and DCGAN's generator's saved bytes
    and step time, folding speed, error and coverage, into its own report."""
    pytest.importorskip("torchnorm._C")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--suite", "conv_bn",
         "--out", str(tmp_path / "bench.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "conv_bn train ResNet-50 (batch statistics): timing" in proc.stderr  # progress lines
    md = (tmp_path / "bench-conv-bn-cpu.md").read_text()
    for label in ("ResNet-50 training step, batch statistics", "ResNet-50 training step, frozen BN",
                  "DCGAN generator training step, batch statistics", "DCGAN generator training step, frozen BN",
                  "fold coverage: ConvTranspose2d + BatchNorm2d", "fold coverage: Linear + BatchNorm1d"):
        assert label in md
    with open(tmp_path / "bench-conv-bn-cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if " training step, " in r["benchmark"]]
    assert len(train) == 4
    # Fused blocks keep less for backward than torch.nn's Conv -> BN -> ReLU.
    for r in train:
        ratio = float(r["ratio"].split("saved bytes ")[1].split("x")[0])
        assert 0 < ratio < 1, r


def test_profile_conv_bn(tmp_path):
    """The step profile's report: wall, host and summed kernel (here:
    operator) time of both models, and the kernels that differ."""
    pytest.importorskip("torchnorm._C")
    out = tmp_path / "profile.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_conv_bn", "--device", "cpu", "--batch", "2", "--size", "32",
         "--steps", "1", "--top", "10", "--modes", "frozen BN", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    md = out.read_text()
    assert "## frozen BN" in md and "## batch statistics" not in md
    assert "| wall ms |" in md and "| host ms (no sync) |" in md
    # Only the fused model runs torchnorm's op.
    assert "| `torchnorm::conv_bn_frozen` | 0 | 0 | 53 |" in md
    bad = subprocess.run([sys.executable, "-m", "benchmarks.profile_conv_bn", "--device", "cpu", "--modes", "fast"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--modes: unknown ['fast']" in bad.stderr


def test_compiled_conv_bn():
    """The compiled-step comparison runs both modes through torch.compile
    (the aot_eager backend, to keep it short) and prints a ratio per mode;
    an unknown mode is refused."""
    pytest.importorskip("torchnorm._C")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compiled_conv_bn", "--device", "cpu", "--batch", "2", "--size", "32",
         "--rounds", "2", "--backend", "aot_eager"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    ratios = re.findall(r"^(batch statistics|frozen BN): compiled unfused [0-9.]+ ms, compiled fused [0-9.]+ ms, "
                        r"fused / unfused ([0-9.]+)x", proc.stdout, flags=re.M)
    assert [mode for mode, _ in ratios] == ["batch statistics", "frozen BN"], proc.stdout
    assert all(0 < float(r) < 100 for _, r in ratios), ratios
    bad = subprocess.run([sys.executable, "-m", "benchmarks.compiled_conv_bn", "--modes", "fast"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--modes: unknown ['fast']" in bad.stderr


def test_gemm_backends():
    """Both product paths on every shape, checked against each other, one row each."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gemm_backends", "--reps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    from benchmarks import gemm_backends

    for label, m, k, n, _ in gemm_backends.SHAPES:
        row = re.search(rf"^\| {re.escape(label)} \| {m} x {k} x {n} \| ([0-9.]+) .* \| ([0-9.]+)x \|$",
                        proc.stdout, flags=re.M)
        assert row and float(row.group(1)) > 0 and float(row.group(2)) > 0, proc.stdout


def test_warm_pages_env(monkeypatch):
    """A cpu run restarts under the glibc settings that reuse freed pages, unless told not to."""
    from benchmarks import __main__ as cli

    for key in list(cli.WARM_PAGES_ENV) + ["GLIBC_TUNABLES"]:
        monkeypatch.delenv(key, raising=False)
    env = cli.warm_pages_env(["--device", "cpu"])
    assert env is not None and all(env[k] == v for k, v in cli.WARM_PAGES_ENV.items())
    assert env["GLIBC_TUNABLES"] == ":".join(cli.WARM_PAGES_TUNABLES)
    assert env["PATH"] == os.environ["PATH"]  # the rest of the environment is kept
    assert cli.warm_pages_env(["--device", "cpu", "--fresh-pages"]) is None
    assert cli.warm_pages_env(["--device", "cuda"]) is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # the user's own tunables stay
    env = cli.warm_pages_env(["--device", "cpu"])
    assert env["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.arena_max=2", *cli.WARM_PAGES_TUNABLES]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.warm_pages_env(["--device", "cpu"]) is None  # already in place: no restart


def test_quick_sequence(tmp_path):
    """The BN-LSTM suite: forward and forward+backward rows with the times of all
    three models and both ratios, measured in the run, into its own report."""
    pytest.importorskip("torchnorm._C")
    proc, rows, md = _run_model_suite(tmp_path, "sequence", "sequence")
    assert "sequence BN-LSTM forward (batch 4, input 8, hidden 16, 5 steps, cpu): timing" in proc.stderr
    assert [r["benchmark"] for r in rows] == ["BN-LSTM forward", "BN-LSTM forward+backward"]
    for r in rows:
        times = {p: float(r[f"{p}_ms"]) for p in ("torchnorm", "composition", "lstm")}
        assert all(t > 0 for t in times.values()), r
        # The ratios are those of this run's medians, and each says whether its goal was met.
        assert float(r["vs_composition"]) == pytest.approx(times["torchnorm"] / times["composition"], rel=2e-3)
        assert float(r["vs_lstm"]) == pytest.approx(times["torchnorm"] / times["lstm"], rel=2e-3)
        assert r["goal_vs_composition"].startswith(("met", "NOT met"))
        assert r["goal_vs_lstm"].startswith(("met", "NOT met"))
        # The products floor: some product time was seen, and its ratio is of this run's composition.
        assert float(r["products_ms"]) > 0, r
        assert float(r["products_vs_composition"]) == pytest.approx(
            float(r["products_ms"]) / times["composition"], rel=2e-3)
    md = (tmp_path / "bench-sequence-cpu.md").read_text()
    assert "| BN-LSTM forward+backward |" in md and "torchnorm / composition" in md


@pytest.mark.parametrize("training", [True, False])
def test_sequence_composition_equals_bnlstm(training):
    """The benchmark's per-step composition computes what torchnorm.nn.BNLSTM
    computes (float64, same parameters): outputs, final state, running
    statistics of every step, and the gradients of the input and every
    parameter. Sequence longer than max_length, so its last-row rule is used."""
    import torch
    import torchnorm.nn
    from benchmarks.sequence import bn_lstm_composition
    from tolerances import tol

    torch.manual_seed(3)
    T, N, I, H, max_length = 6, 5, 3, 4, 4
    ours = torchnorm.nn.BNLSTM(I, H, max_length, momentum=0.2, eps=1e-4, dtype=torch.float64).train(training)
    with torch.no_grad():  # parameters and statistics away from their initial constants
        for name, t in list(ours.named_parameters()) + list(ours.named_buffers()):
            t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else 0.5 * torch.randn_like(t))
    theirs = copy.deepcopy(ours)
    x = torch.randn(T, N, I, dtype=torch.float64)
    h0, c0 = torch.randn(1, N, H, dtype=torch.float64), torch.randn(1, N, H, dtype=torch.float64)
    leaves = [[t.clone().requires_grad_() for t in (x, h0, c0)] for _ in range(2)]

    out, (hn, cn) = ours(leaves[0][0], (leaves[0][1], leaves[0][2]))
    out_c, (hn_c, cn_c) = bn_lstm_composition(leaves[1][0], theirs, (leaves[1][1][0], leaves[1][2][0]))
    close = tol(torch.float64)
    torch.testing.assert_close(out_c, out, **close)
    torch.testing.assert_close(hn_c, hn[0], **close)
    torch.testing.assert_close(cn_c, cn[0], **close)
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b, a, **tol(torch.float64, "stats"), msg=name)

    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves[0] + list(ours.parameters()), dy)
    grads_c = torch.autograd.grad(out_c, leaves[1] + list(theirs.parameters()), dy)
    names = ["x", "h0", "c0"] + [n for n, _ in ours.named_parameters()]
    for name, g, g_c in zip(names, grads, grads_c):
        torch.testing.assert_close(g_c, g, **tol(torch.float64, "grad"), msg=name)


def test_sequence_norms_example_quick(tmp_path):
    """examples/sequence_norms.py --quick: the three models train a few steps,
    and the plot and its JSON (curves and summary) are written."""
    pytest.importorskip("torchnorm._C")
    pytest.importorskip("matplotlib")
    out = tmp_path / "sequence_norms.png"
    proc = subprocess.run([sys.executable, "-m", "examples.sequence_norms", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    models = ["LSTM", "BN-LSTM", "BN-RNN (LSTM)"]
    for name in models:  # progress lines: model, step, loss, accuracy, elapsed
        assert any(line.startswith(name + " ") and "step     6/6" in line and "val acc" in line
                   for line in proc.stdout.splitlines()), proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "sequence_norms.json").read_text())
    assert list(results["curves"]) == models and list(results["summary"]) == models
    for name, curve in results["curves"].items():
        assert curve["step"] == [3, 6]
        assert all(0 < loss < 10 for loss in curve["train_loss"])
        assert all(0 <= acc <= 100 for acc in curve["val_acc"])
        # Batch-statistics accuracy exists for the BN models only.
        assert all((acc is None) == (name == "LSTM") for acc in curve["val_acc_batch_stats"])
        assert results["summary"][name]["final_val_acc"] == curve["val_acc"][-1]


def test_quick_small_batch(tmp_path):
    """The small-batch suite: forward and forward+backward rows of both shapes
    with OnlineNorm2d's (and StreamingNorm2d's, where torchnorm has it) time
    and ratio to BatchNorm2d's, measured in the run, into its own report."""
    pytest.importorskip("torchnorm._C")
    import torchnorm.nn
    from benchmarks import small_batch

    proc, rows, md = _run_model_suite(tmp_path, "small_batch", "small-batch")
    assert "small_batch forward (2x8x8x8 float32, cpu): timing" in proc.stderr  # progress lines
    assert [(r["shape"], r["mode"]) for r in rows] == [
        (s, m) for s in ("2x8x8x8", "8x8x4x4") for m in ("forward", "forward+backward")]
    streaming = hasattr(torchnorm.nn, "StreamingNorm2d")
    for r in rows:
        bn = float(r["batch_norm_ms"])
        assert bn > 0, r
        for name in ("online_norm", "online_norm_ls", "online_norm_no_affine", "streaming_norm"):
            if name == "streaming_norm" and not streaming:
                assert r["streaming_norm_ms"] == r["streaming_norm_goal"] == small_batch.NOT_AVAILABLE
                continue
            # The ratios are those of this run's medians, and each says whether its goal was met.
            assert float(r[f"{name}_vs_bn"]) == pytest.approx(float(r[f"{name}_ms"]) / bn, rel=2e-3)
            assert r[f"{name}_goal"].startswith(("met", "NOT met"))
    assert "| 8x8x4x4 | forward+backward |" in md and "OnlineNorm2d (ecm=None) / BatchNorm2d" in md
    assert ("not available" in md) != streaming


def test_small_batch_norms_example_quick(tmp_path):
    """examples/small_batch_norms.py --quick: every norm trains at batch sizes
    1, 4 and 32 on the same samples, and the plot and its JSON are written."""
    pytest.importorskip("torchnorm._C")
    pytest.importorskip("matplotlib")
    import torchnorm.nn

    out = tmp_path / "small_batch_norms.png"
    proc = subprocess.run([sys.executable, "-m", "examples.small_batch_norms", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    norms = ["BatchNorm2d", "OnlineNorm2d"] + (["StreamingNorm2d"] if hasattr(torchnorm.nn, "StreamingNorm2d")
                                               else [])
    for name in norms:  # progress lines: norm, batch, step, samples, loss, accuracy, elapsed
        for batch, steps in ((1, 64), (4, 16), (32, 2)):
            assert any(line.startswith(f"{name} ") and f"batch {batch:2d}  step {steps:6d}/{steps}" in line
                       and "test acc" in line for line in proc.stdout.splitlines()), proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "small_batch_norms.json").read_text())["results"]
    assert list(results) == norms
    for runs in results.values():
        assert list(runs) == ["1", "4", "32"]
        for batch, run in runs.items():
            assert run["steps"] == 64 // int(batch)
            assert run["curve"]["samples"][-1] == 64  # the same samples seen at every batch size
            assert all(0 <= acc <= 100 for acc in run["curve"]["test_acc"])
            assert run["final_test_acc"] == run["curve"]["test_acc"][-1]


def test_quick_cosine_norm(tmp_path):
    """The cosine_norm suite: forward and forward+backward rows of both
    layers, with the composition's, torchnorm's and the dot product's times
    and the speedup and ceiling from this run's medians, into its own report."""
    pytest.importorskip("torchnorm._C")
    proc, rows, md = _run_model_suite(tmp_path, "cosine_norm", "cosine-norm")
    log = proc.stderr
    assert "cosine_norm CosineConv2d forward (2x8x8x8 float32, cpu): timing" in log  # progress lines
    assert [(r["layer"], r["mode"]) for r in rows] == [
        (layer, mode) for layer in ("CosineConv2d", "CosineLinear") for mode in ("forward", "forward+backward")]
    for r in rows:
        comp, ours, dot = (float(r[f"{p}_ms"]) for p in ("composition", "torchnorm", "dot"))
        assert min(comp, ours, dot) > 0, r
        assert float(r["speedup"]) == pytest.approx(comp / ours, rel=2e-3)
        assert float(r["ceiling"]) == pytest.approx(comp / dot, rel=2e-3)
        assert r["goal"].startswith(("met", "NOT met"))
    assert "| CosineLinear | 16x32 | forward+backward |" in md and "| speedup | ceiling |" in md


def test_quick_weight_norm(tmp_path):
    """The weight_norm suite: forward, training step and weight-only rows of
    both layers, torchnorm.weight_norm's time and ratio to torch's
    parametrization, measured in the run, into its own report."""
    pytest.importorskip("torchnorm._C")
    from benchmarks import weight_norm

    proc, rows, md = _run_model_suite(tmp_path, "weight_norm", "weight-norm")
    assert "weight_norm forward+backward (Linear(64, 64) on 8x64 float32, cpu): timing" in proc.stderr
    assert [(r["layer"], r["mode"]) for r in rows] == [
        (label, m) for label, _, _ in weight_norm.QUICK_LAYERS.values() for m in weight_norm.MODES]
    for r in rows:
        assert float(r["torch_ms"]) > 0 and float(r["torchnorm_ms"]) > 0, r
        assert float(r["ratio"]) == pytest.approx(float(r["torchnorm_ms"]) / float(r["torch_ms"]), rel=2e-3)
        assert r["goal"].startswith(("met", "NOT met")) == (r["mode"] == "forward+backward")
    assert "| Linear(64, 64) | 8x64 | forward+backward |" in md and "torchnorm / torch" in md
