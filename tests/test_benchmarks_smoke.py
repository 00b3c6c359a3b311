"""Smoke test of the benchmark harness: `python -m benchmarks --quick` on the CPU, torch provider only."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED_COLUMNS = {
    "run_id", "op", "provider", "mode", "shape", "dtype", "layout", "activation", "device",
    "device_name", "torch_version", "threads", "median_ms", "gb_per_s", "peak_mem_mb",
}


def test_quick_cpu_torch(tmp_path):
    out = tmp_path / "bench.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--providers", "torch",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1/12] batch_norm forward" in proc.stderr  # progress lines

    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert EXPECTED_COLUMNS <= set(reader.fieldnames)
        rows = list(reader)
    assert len(rows) == 12  # 1 shape x 2 layouts x 2 activations x 3 modes
    assert {r["mode"] for r in rows} == {"forward", "backward", "full"}
    assert {r["layout"] for r in rows} == {"contiguous", "channels_last"}
    assert all(r["provider"] == "torch" and r["device"] == "cpu" for r in rows)
    assert all(float(r["median_ms"]) > 0 and float(r["gb_per_s"]) > 0 for r in rows)

    md = (tmp_path / "bench.md").read_text()
    assert "| mode | shape | layout | dtype | act | torch ms |" in md
    assert md.count("| 4x16x8x8 |") == 12
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
