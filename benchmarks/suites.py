"""Benchmark suites: which cases run, and how each provider computes a case.

A suite is a function ``(device, quick) -> list[Case]``, registered in
``SUITES``. A case names an op (a key of ``OPS``); the op object builds the
parameters of a case and, for each provider, the function that is timed:
``fn(x, residual) -> y``. Inputs (``x``, ``dy``, ``residual``) are made by the
harness from the case's shape, dtype and layout, so they are shared by all
providers.

Providers:
- ``torch``: eager PyTorch, written the way a user writes it
  (``F.batch_norm`` then ``F.relu``).
- ``torch_compile``: ``torch.compile`` of that same eager function, compiled
  once per case (the first call, outside the timing).
- ``torchnorm``: torchnorm's single fused op; imported lazily so that the
  other providers run before the extension is built.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

PROVIDERS = ("torch", "torch_compile", "torchnorm")
MODES = ("forward", "backward", "full")

_ACTIVATIONS = {
    None: lambda y: y,
    "relu": F.relu,
    "silu": F.silu,
    "leaky_relu": lambda y: F.leaky_relu(y, 0.01),
}


class ProviderUnavailable(RuntimeError):
    """A provider cannot run here (e.g. torchnorm._C is not built)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked configuration of an op (all providers, all modes)."""

    op: str
    shape: tuple
    dtype: torch.dtype
    layout: str = "contiguous"  # "contiguous" or "channels_last" (channels_last_3d for 5-D)
    activation: Optional[str] = None  # None, "relu", "silu", "leaky_relu"
    residual: bool = False  # y = act(op(x) + residual)

    @property
    def shape_str(self) -> str:
        """Shape as ``32x64x56x56``."""
        return "x".join(str(s) for s in self.shape)

    @property
    def dtype_str(self) -> str:
        """dtype without the ``torch.`` prefix."""
        return str(self.dtype).replace("torch.", "")

    @property
    def activation_str(self) -> str:
        """Activation name, ``none`` when there is none."""
        return self.activation or "none"

    def describe(self) -> str:
        """One-line label used in progress lines."""
        tail = " +residual" if self.residual else ""
        return f"{self.op} {self.shape_str} {self.layout} {self.dtype_str} {self.activation_str}{tail}"


def memory_format(case: Case) -> torch.memory_format:
    """The torch memory format of a case's layout."""
    if case.layout == "contiguous":
        return torch.contiguous_format
    if case.layout == "channels_last":
        return {4: torch.channels_last, 5: torch.channels_last_3d}[len(case.shape)]
    raise ValueError(f"unknown layout {case.layout!r}")


def check_provider(provider: str) -> None:
    """Raise ProviderUnavailable with a clear message if ``provider`` cannot run."""
    if provider not in PROVIDERS:
        raise ProviderUnavailable(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    if provider == "torchnorm":
        try:
            import torchnorm  # noqa: F401
            import torchnorm._C  # noqa: F401
            import torchnorm.functional  # noqa: F401
        except Exception as e:  # ImportError, or an undefined symbol from a stale build
            raise ProviderUnavailable(
                "the torchnorm provider needs the compiled extension torchnorm._C, which could not be "
                f"imported ({type(e).__name__}: {e}). Build it first (`make build`, or "
                "`pip install --no-build-isolation -e .`), or leave it out: "
                "--providers torch,torch_compile"
            ) from e


class BatchNorm:
    """BatchNorm in training mode: batch statistics, running statistics updated in place."""

    momentum = 0.1
    eps = 1e-5

    def params(self, case: Case, device: str) -> dict:
        """Weight and bias (float32, requiring grad) and running statistics for a case."""
        c = case.shape[1]
        g = torch.Generator().manual_seed(1)
        return {
            "weight": (1 + 0.1 * torch.randn(c, generator=g)).to(device).requires_grad_(),
            "bias": (0.1 * torch.randn(c, generator=g)).to(device).requires_grad_(),
            "running_mean": torch.zeros(c, device=device),
            "running_var": torch.ones(c, device=device),
        }

    def grad_params(self, params: dict) -> list:
        """The parameters a training step computes gradients for."""
        return [params["weight"], params["bias"]]

    def eager(self, case: Case, params: dict) -> Callable:
        """What a PyTorch user writes: F.batch_norm, then + residual, then the activation."""
        act = _ACTIVATIONS[case.activation]
        rm, rv, w, b = params["running_mean"], params["running_var"], params["weight"], params["bias"]
        momentum, eps = self.momentum, self.eps

        def batch_norm_eager(x, residual=None):
            y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps)
            if residual is not None:
                y = y + residual
            return act(y)

        return batch_norm_eager

    def torchnorm(self, case: Case, params: dict) -> Callable:
        """torchnorm's fused op: normalization, residual and activation in one call."""
        check_provider("torchnorm")
        import torchnorm.functional as tnf

        rm, rv, w, b = params["running_mean"], params["running_var"], params["weight"], params["bias"]
        momentum, eps, activation = self.momentum, self.eps, case.activation

        def batch_norm_torchnorm(x, residual=None):
            return tnf.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps,
                                  activation=activation, residual=residual)

        return batch_norm_torchnorm

    def bytes_moved(self, case: Case, mode: str) -> int:
        """Minimal bytes a kernel must move (per-channel vectors ignored).

        forward reads x (and residual) and writes y; backward reads x and dy
        and writes dx (and d residual); full is the sum of the two.
        """
        numel = 1
        for s in case.shape:
            numel *= s
        size = numel * torch.empty((), dtype=case.dtype).element_size()
        fwd = size * (2 + case.residual)
        bwd = size * (3 + case.residual)
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


OPS = {"batch_norm": BatchNorm()}


def build(provider: str, case: Case, device: str):
    """Return ``(fn, params)`` for one provider on one case.

    ``fn(x, residual)`` is the function the harness times; ``params`` are the
    provider's own parameters and running statistics (fresh per provider).
    torch_compile returns the compiled function; it compiles on its first
    call, which the harness makes before timing.
    """
    op = OPS[case.op]
    params = op.params(case, device)
    if provider == "torch":
        return op.eager(case, params), params
    if provider == "torch_compile":
        # One compile per case: reset dynamo so earlier cases' cache entries do
        # not count toward its recompile limit (past it, dynamo would silently
        # fall back to eager). fullgraph: a graph break is an error, not a
        # silent partial compile.
        torch._dynamo.reset()
        # Compile in this process: inductor's pool of compile worker processes
        # would otherwise keep starting up in the background and steal cores
        # from the rows timed after the first compile (2 cores here).
        torch._inductor.config.compile_threads = 1
        return torch.compile(op.eager(case, params), dynamic=False, fullgraph=True), params
    if provider == "torchnorm":
        return op.torchnorm(case, params), params
    raise ProviderUnavailable(f"unknown provider {provider!r}")


def batch_norm_suite(device: str, quick: bool = False) -> list:
    """BatchNorm2d training mode: two ResNet shapes, NCHW and channels_last, with and without fused ReLU.

    float32 on CPU; float32, float16 and bfloat16 on CUDA. ``quick`` uses one
    tiny shape (a smoke test, not a measurement).
    """
    shapes = [(4, 16, 8, 8)] if quick else [(32, 64, 56, 56), (64, 256, 14, 14)]
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    return [
        Case("batch_norm", shape, dtype, layout, activation)
        for dtype in dtypes
        for shape in shapes
        for layout in ("contiguous", "channels_last")
        for activation in (None, "relu")
    ]


SUITES = {"batch_norm": batch_norm_suite}
