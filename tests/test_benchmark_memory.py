"""The benchmark harness hands memory back between rows.

``python -m benchmarks`` runs under glibc settings that never give freed heap
back to the system (warm pages, see benchmarks/__main__.py), so unless the
harness releases each row's memory itself the process grows with every row it
runs (14.5 GB for ``make bench``) instead of with its largest row. Here two
rows of a large shape run through the harness's own row-running code
(``run_suite``), in a fresh process under those settings, and the resident
memory is read (/proc/self/statm) before and after each.
"""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")

# Two forward rows of LayerNorm, the torch provider only (no build needed):
# (2048, 4096) float32 (32 MiB a tensor), then (4096, 4096) with the residual
# (64 MiB tensors, its own inputs and two outputs a call), whose blocks do not
# fit in the first row's. A tiny row runs first so that code and caches
# touched on first use are in the baseline.
FIRST, SECOND = (2048, 4096), (4096, 4096)
SCRIPT = f"FIRST, SECOND = {FIRST}, {SECOND}\n" + r"""
import json, sys, torch
from benchmarks import harness, suites

class Rows:
    def write(self, row):
        pass

settings = harness.Settings("cpu", quick=True)
def run(case):
    progress = harness.Progress(1, 1.0)
    failures = harness.run_suite([case], "cpu", ["torch"], ["forward"], Rows(), "test", settings, progress)
    assert not failures, failures
    return harness.resident_bytes()

run(suites.Case("layer_norm", (64, 256), torch.float32, residual=True))
rss = [harness.resident_bytes()]
rss.append(run(suites.Case("layer_norm", FIRST, torch.float32)))
rss.append(run(suites.Case("layer_norm", SECOND, torch.float32, residual=True)))
print(json.dumps(rss))
"""


def _working_set(shape: tuple, residual: bool) -> int:
    """Bytes a forward row of LayerNorm at ``shape`` holds: its input sets and kept outputs."""
    import torch
    from benchmarks import harness, suites

    case = suites.Case("layer_norm", shape, torch.float32, residual=residual)
    per_set = 1 + residual  # x (and the residual); no gradients in a forward-only run
    outputs = suites.OPS["layer_norm"].outputs(case)
    return harness.rotation_count(case, "cpu") * (per_set + outputs) * math.prod(shape) * 4


def test_rows_give_memory_back():
    from benchmarks import __main__ as cli

    env = {**cli.warm_pages_environ(os.environ), "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    before, after_first, after_second = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = _working_set(FIRST, False), _working_set(SECOND, True)
    mib = {"before": before >> 20, "after the first row": after_first >> 20,
           "after the second row": after_second >> 20, "first row's working set": first >> 20,
           "second row's working set": second >> 20}
    # After the second row memory is not above that after the first by more
    # than one row's working set...
    assert after_second - after_first <= second, mib
    # ...and neither row left much of its working set behind: without the
    # release each leaves all of it (the heap keeps every freed block).
    assert after_first - before < first / 4, mib
    assert after_second - before < second / 4, mib
