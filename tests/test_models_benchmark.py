"""benchmarks/models.py (the ``models`` suite) at its --quick sizes: a row per
model with the three variants' times and speeds from the same run, and the
report; a missing library gives a skipped row, not a failure."""
import csv

import pytest

from benchmarks import __main__ as cli
from benchmarks import models


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
        assert [r["model"] for r in csv.DictReader(f)] == list(models.MODELS)
    md = out.read_text()
    for r in rows:
        if r["config"] == models.SKIPPED:
            assert f"| {r['model']} | skipped" in md
            continue
        base = float(r["original_ms"])
        for v in models.VARIANTS[1:]:
            assert float(r[f"{v}_speedup"]) == pytest.approx(base / float(r[f"{v}_ms"]), rel=2e-3)
            assert r[f"{v}_goal"].startswith(("met", "NOT met"))
        assert f"| {r['model']} | {r['config']} |" in md


def test_goal_verdict():
    assert models.goal_verdict("llama", 1.06).startswith("met")
    assert models.goal_verdict("llama", 1.01).startswith("NOT met")
    assert models.goal_verdict("bert", 0.99).startswith("met")
    assert models.goal_verdict("bert", 0.97).startswith("NOT met")
