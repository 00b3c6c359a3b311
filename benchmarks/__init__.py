"""torchnorm's benchmark harness: ``python -m benchmarks --help``.

- ``suites.py``: the cases of each suite and how each provider (torch eager,
  torch.compile, torchnorm) computes them.
- ``harness.py``: timing (torch.utils.benchmark on CPU, CUDA events on GPU),
  input rotation, CSV rows, progress lines.
- ``report.py``: the markdown table and PNG plot drawn from a CSV.
"""
