"""benchmarks/models.py (the ``models`` suite) at its --quick sizes: a row per
model with the four variants' times, speeds and peak memory from the same
run, and the report; a missing library gives a skipped row, not a failure;
a compile that fails gives a reason, not a failure."""
import csv
import sys

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import harness, models


def test_models_is_a_suite():
    assert "models" in cli.MODEL_SUITES
    assert cli.parse_args(["--suite", "models"]).suites == ["models"]


@pytest.mark.slow
def test_quick_models(tmp_path):
    pytest.importorskip("torchnorm._C")
    out = tmp_path / "models.md"
    rows, failures = models.run("cpu", True, str(out))
    assert not failures
    assert [r["model"] for r in rows] == list(models.MODELS)
    with open(tmp_path / "models.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["model"] for r in csv_rows] == list(models.MODELS)
    assert set(csv_rows[0]) == set(models.COLUMNS)
    md = out.read_text()
    assert "Peak memory of one step" in md
    for r in rows:
        if r["config"] == models.SKIPPED:
            assert f"| {r['model']} | skipped" in md
            continue
        base = float(r["original_ms"])
        assert r["compiled_status"] == "not compiled (--quick)" and not r["compiled_ms"]
        assert r["compiled_status"] in md
        timed = [v for v in models.VARIANTS if r[f"{v}_ms"]]
        for v in timed[1:]:
            assert float(r[f"{v}_speedup"]) == pytest.approx(base / float(r[f"{v}_ms"]), rel=2e-3)
        for v in models.TORCHNORM_VARIANTS:
            assert r[f"{v}_goal"].startswith(("met", "NOT met"))
        # The ceiling variant is timed for the models with a speed goal, and only timed.
        assert bool(r["without norms_ms"]) == (r["model"] in models.GOAL_SPEEDUP)
        assert not r["without norms_peak_mib"]
        if sys.platform.startswith("linux"):  # peak resident memory is measured there
            measured = [v for v in timed if v in models.MEMORY_VARIANTS]
            for v in measured:
                assert float(r[f"{v}_peak_mib"]) > 0, (r["model"], v)
            for v in measured[1:]:
                assert float(r[f"{v}_peak_ratio"]) == pytest.approx(
                    float(r[f"{v}_peak_mib"]) / float(r["original_peak_mib"]), rel=2e-2)
        assert f"| {r['model']} | {r['config']} |" in md


@pytest.mark.slow
def test_compiled_variant(tmp_path, monkeypatch):
    """torch.compile of the original (dynamo's capture, the eager backend: inductor takes minutes
    here) is timed beside the others, or says why not."""
    pytest.importorskip("torchnorm._C")
    pytest.importorskip("transformers")
    monkeypatch.setattr(models, "MODELS", {"llama": models.MODELS["llama"]})
    rows, failures = models.run("cpu", True, str(tmp_path / "m.md"), compile_backend="eager")
    assert not failures
    (r,) = rows
    if r["compiled_status"]:  # a torch that cannot compile it: the reason, not a failure
        assert r["compiled_status"].startswith("compile failed: ") and not r["compiled_ms"]
        return
    assert float(r["compile_s"]) > 0 and float(r["compiled_ms"]) > 0
    assert float(r["compiled_speedup"]) == pytest.approx(float(r["original_ms"]) / float(r["compiled_ms"]), rel=2e-3)
    assert float(r["fuse_vs_compiled"]) == pytest.approx(float(r["compiled_ms"]) / float(r["convert+fuse_ms"]),
                                                         rel=2e-3)
    if sys.platform.startswith("linux"):
        assert float(r["compiled_peak_mib"]) > 0
    assert f"{float(r['fuse_vs_compiled']):.2f}x" in (tmp_path / "m.md").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident memory is reset on Linux only")
def test_step_peak_mib_counts_what_a_step_holds():
    held = []

    def step():  # touches 64 MiB of fresh pages, keeps them past the call
        held.append(torch.ones(16 * 2**20))

    def nothing():
        pass

    assert harness.step_peak_mib(step, "cpu") >= 63
    held.clear()
    assert harness.step_peak_mib(nothing, "cpu") < 8


@pytest.mark.slow
def test_compile_failure_is_a_reason(tmp_path, monkeypatch):
    """A model torch.compile cannot run is reported with the reason; the other variants are timed."""
    pytest.importorskip("torchnorm._C")
    pytest.importorskip("timm")

    class Refused(torch.nn.Module):  # what a compile that fails at its first call looks like
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            raise RuntimeError("no backend here\nmore lines")

    def refuse(model, backend=None):
        return Refused(model)

    monkeypatch.setattr(models, "MODELS", {"convnext_tiny": models.MODELS["convnext_tiny"]})
    monkeypatch.setattr(torch, "compile", refuse)
    rows, failures = models.run("cpu", True, str(tmp_path / "m.md"), compile_backend="eager")
    assert not failures
    (r,) = rows
    assert r["compiled_status"] == "compile failed: RuntimeError: no backend here"
    assert not r["compiled_ms"] and float(r["convert+fuse_ms"]) > 0
    assert "compile failed: RuntimeError: no backend here" in (tmp_path / "m.md").read_text()


def test_without_norms_replaces_norms_and_the_named_activations():
    pytest.importorskip("torchnorm._C")
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(),
                                torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU()))

    class LlamaRMSNorm(torch.nn.Module):  # a library's norm, known to torchnorm.convert by its name only
        def forward(self, x):
            return x * 2

    LlamaRMSNorm.__module__ = "transformers.models.llama.modeling_llama"
    block.append(LlamaRMSNorm())
    stripped = models.without_norms(block, (torch.nn.SiLU,))
    kinds = [type(m).__name__ for m in stripped.modules()]
    assert "GroupNorm" not in kinds and "BatchNorm2d" not in kinds and "LlamaRMSNorm" not in kinds
    assert "SiLU" not in kinds and "ReLU" in kinds and "Conv2d" in kinds  # other activations stay
    x = torch.randn(1, 3, 2, 2)
    assert torch.equal(stripped(x), torch.relu(stripped[0](x)))


def test_goal_verdict():
    assert models.goal_verdict("llama", 1.06).startswith("met")
    assert models.goal_verdict("llama", 1.01).startswith("NOT met")
    assert models.goal_verdict("llama", 1.01, "convert").startswith("met")  # only the floor for a plain convert
    assert models.goal_verdict("llama", 0.97, "convert").startswith("NOT met")
    assert models.goal_verdict("bert", 0.99).startswith("met")
    assert models.goal_verdict("bert", 0.97).startswith("NOT met")
