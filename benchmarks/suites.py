"""Benchmark suites: which cases run, and how each provider computes a case.

A suite is a function ``(device, quick) -> list[Case]``, registered in
``SUITES`` (``all`` runs every suite, in the order of ``SUITES``). A case
names an op (a key of ``OPS``); the op object builds the parameters of a case
and, for each provider, the function that is timed: ``fn(x, residual) -> y``,
or ``-> (y, s)`` when the op also returns the residual sum (``op.outputs(case)
== 2``: LayerNorm / RMSNorm with a fused residual). Inputs (``x``, ``dy``,
``residual``, and ``ds`` for a second output) are made by the harness from the
case's shape, dtype and layout, so they are shared by all providers. The
backward of a two-output case takes both gradients, ``dy`` and ``ds``, in every
provider.

Providers:
- ``torch``: eager PyTorch, written the way a user writes it
  (``F.batch_norm`` then ``F.relu``; ``s = x + r`` then ``F.layer_norm(s)``;
  ``F.group_norm`` then ``F.silu``).
- ``torch_compile``: ``torch.compile`` of that same eager function, compiled
  once per case (the first call, outside the timing).
- ``torchnorm``: torchnorm's single fused op; imported lazily so that the
  other providers run before the extension is built.

Bytes moved (the GB/s column) are the minimal bytes an op must move through
memory, counted per op in its ``bytes_moved`` (see each docstring); the
numbers are a lower bound, so GB/s is an upper bound of a kernel's bandwidth.
"""
from __future__ import annotations

import dataclasses
import math
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
    # batch_norm: y = act(bn(x) + residual); layer_norm / rms_norm: s = x + residual
    # is normalized and (y, s) returned (a pre-norm block); other ops: unused.
    residual: bool = False

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

    title = "BatchNorm, training mode (batch statistics; running statistics updated), optionally then ReLU"
    momentum = 0.1
    eps = 1e-5

    def outputs(self, case: Case) -> int:
        """One output (a residual is added to it)."""
        return 1

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


def _numel(shape: tuple) -> int:
    return math.prod(shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _param_dtype(case: Case) -> torch.dtype:
    """Affine parameters: the input's dtype, float32 for float16 / bfloat16 inputs."""
    return torch.float32 if case.dtype in (torch.float16, torch.bfloat16) else case.dtype


def _affine(n: int, case: Case, device: str, bias: bool = True) -> dict:
    """``weight`` (around 1) and optionally ``bias`` (around 0) of length ``n``, requiring grad."""
    g = torch.Generator().manual_seed(1)
    dtype = _param_dtype(case)
    params = {"weight": (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype).requires_grad_()}
    if bias:
        params["bias"] = (0.1 * torch.randn(n, generator=g)).to(device, dtype).requires_grad_()
    return params


def _bytes(case: Case, mode: str, fwd_tensors: int, bwd_tensors: int, param_numel: int,
           fwd_params: int, bwd_params: int) -> int:
    """Bytes moved by ``fwd_tensors`` / ``bwd_tensors`` input-sized tensors and
    ``fwd_params`` / ``bwd_params`` parameter-sized vectors (``param_numel`` elements each)."""
    size = _numel(case.shape) * _itemsize(case.dtype)
    psize = param_numel * _itemsize(_param_dtype(case))
    fwd = size * fwd_tensors + psize * fwd_params
    bwd = size * bwd_tensors + psize * bwd_params
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _torchnorm_op(name: str) -> Callable:
    """``torchnorm.functional.<name>``, or ProviderUnavailable when this build has no such op."""
    check_provider("torchnorm")
    import torchnorm.functional as tnf

    fn = getattr(tnf, name, None)
    if fn is None:
        raise ProviderUnavailable(f"torchnorm.functional has no {name}: the installed torchnorm predates it; "
                                  "rebuild it, or leave the provider out: --providers torch,torch_compile")
    return fn


class LayerNorm:
    """LayerNorm over the last dimension, elementwise affine with bias.

    With a residual, the pre-norm block of a transformer: ``s = x + r``,
    ``y = layer_norm(s)``, returning ``(y, s)`` (``s`` feeds the next
    residual add); the backward takes gradients for both outputs.
    """

    title = "LayerNorm over the last dimension (weight and bias)"
    eps = 1e-5
    bias = True

    def outputs(self, case: Case) -> int:
        """2 with a residual (y and the sum s), else 1."""
        return 2 if case.residual else 1

    def params(self, case: Case, device: str) -> dict:
        """Weight (and bias) of the normalized (last) dimension, requiring grad."""
        return _affine(case.shape[-1], case, device, bias=self.bias)

    def grad_params(self, params: dict) -> list:
        """The parameters a training step computes gradients for."""
        return list(params.values())

    def _norm(self, s, shape, params):
        return F.layer_norm(s, shape, params["weight"], params.get("bias"), self.eps)

    def eager(self, case: Case, params: dict) -> Callable:
        """What a PyTorch user writes: ``s = x + r`` then F.layer_norm (F.rms_norm), returning (y, s)."""
        shape, norm = (case.shape[-1],), self._norm

        def norm_eager(x, residual=None):
            if residual is None:
                return norm(x, shape, params)
            s = x + residual
            return norm(s, shape, params), s

        norm_eager.__name__ = f"{type(self).__name__.lower()}_eager"
        return norm_eager

    def torchnorm(self, case: Case, params: dict) -> Callable:
        """torchnorm.functional.layer_norm(x, shape, w, b, eps, residual=r): y, or (y, s)."""
        op = _torchnorm_op("layer_norm")
        shape, w, b, eps = (case.shape[-1],), params["weight"], params.get("bias"), self.eps

        def layer_norm_torchnorm(x, residual=None):
            return op(x, shape, w, b, eps, residual=residual)

        return layer_norm_torchnorm

    def bytes_moved(self, case: Case, mode: str) -> int:
        """Minimal bytes a kernel must move.

        forward reads x (and r) and writes y (and s = x + r): 2 (4) tensors;
        backward reads the normalized input (x, or the saved s), dy (and ds)
        and writes dx: 3 (4) tensors (with a residual dx is also the
        residual's gradient, one tensor that autograd hands to both addends).
        Parameters: forward reads weight (and bias); backward reads weight and
        writes d weight (and d bias). The per-row mean / rstd (8 bytes a row)
        are not counted; full is forward + backward.
        """
        n_params = 1 + self.bias
        return _bytes(case, mode, 2 + 2 * case.residual, 3 + case.residual, case.shape[-1],
                      n_params, 1 + n_params)


class RMSNorm(LayerNorm):
    """RMSNorm over the last dimension, elementwise affine (weight only); residual as LayerNorm's."""

    title = "RMSNorm over the last dimension (weight)"
    eps = 1e-6
    bias = False

    def _norm(self, s, shape, params):
        return F.rms_norm(s, shape, params["weight"], self.eps)

    def torchnorm(self, case: Case, params: dict) -> Callable:
        """torchnorm.functional.rms_norm(x, shape, w, eps, residual=r): y, or (y, s)."""
        op = _torchnorm_op("rms_norm")
        shape, w, eps = (case.shape[-1],), params["weight"], self.eps

        def rms_norm_torchnorm(x, residual=None):
            return op(x, shape, w, eps, residual=residual)

        return rms_norm_torchnorm


class GroupNorm:
    """GroupNorm with 32 groups, affine, optionally followed by an activation (SiLU)."""

    title = "GroupNorm, 32 groups (weight and bias), optionally followed by SiLU"
    groups = 32
    eps = 1e-5

    def outputs(self, case: Case) -> int:
        """One output."""
        return 1

    def params(self, case: Case, device: str) -> dict:
        """Per-channel weight and bias, requiring grad."""
        return _affine(case.shape[1], case, device)

    def grad_params(self, params: dict) -> list:
        """The parameters a training step computes gradients for."""
        return [params["weight"], params["bias"]]

    def eager(self, case: Case, params: dict) -> Callable:
        """What a PyTorch user writes: F.group_norm, then the activation."""
        act = _ACTIVATIONS[case.activation]
        groups, w, b, eps = self.groups, params["weight"], params["bias"], self.eps

        def group_norm_eager(x, residual=None):
            return act(F.group_norm(x, groups, w, b, eps))

        return group_norm_eager

    def torchnorm(self, case: Case, params: dict) -> Callable:
        """torchnorm.functional.group_norm with the activation fused."""
        op = _torchnorm_op("group_norm")
        groups, w, b, eps = self.groups, params["weight"], params["bias"], self.eps
        activation = case.activation

        def group_norm_torchnorm(x, residual=None):
            return op(x, groups, w, b, eps, activation=activation)

        return group_norm_torchnorm

    def bytes_moved(self, case: Case, mode: str) -> int:
        """Minimal bytes a kernel must move.

        forward reads x and writes y; backward reads x and dy and writes dx
        (an activation's input is recomputed from x and the statistics, not
        stored). Per-channel parameters: forward reads weight and bias;
        backward reads weight (and bias, to recompute the activation's input)
        and writes d weight and d bias. The per-(sample, group) statistics are
        not counted; full is forward + backward.
        """
        bwd_params = 3 + (case.activation is not None)
        return _bytes(case, mode, 2, 3, case.shape[1], 2, bwd_params)


class InstanceNorm(GroupNorm):
    """InstanceNorm in training mode: per-(sample, channel) statistics, affine, no running statistics."""

    title = "InstanceNorm, training mode, affine, no running statistics"
    momentum = 0.1

    def eager(self, case: Case, params: dict) -> Callable:
        """F.instance_norm(x, None, None, w, b, use_input_stats=True)."""
        w, b, momentum, eps = params["weight"], params["bias"], self.momentum, self.eps

        def instance_norm_eager(x, residual=None):
            return F.instance_norm(x, None, None, w, b, use_input_stats=True, momentum=momentum, eps=eps)

        return instance_norm_eager

    def torchnorm(self, case: Case, params: dict) -> Callable:
        """torchnorm.functional.instance_norm, same arguments as F.instance_norm."""
        op = _torchnorm_op("instance_norm")
        w, b, momentum, eps = params["weight"], params["bias"], self.momentum, self.eps

        def instance_norm_torchnorm(x, residual=None):
            return op(x, None, None, w, b, use_input_stats=True, momentum=momentum, eps=eps)

        return instance_norm_torchnorm

    def bytes_moved(self, case: Case, mode: str) -> int:
        """Minimal bytes a kernel must move.

        forward reads x and writes y; backward reads x and dy and writes dx.
        Per-channel parameters: forward reads weight and bias, backward reads
        weight and writes d weight and d bias. The per-(sample, channel)
        statistics are not counted; full is forward + backward.
        """
        return _bytes(case, mode, 2, 3, case.shape[1], 2, 3)


OPS = {
    "batch_norm": BatchNorm(),
    "layer_norm": LayerNorm(),
    "rms_norm": RMSNorm(),
    "group_norm": GroupNorm(),
    "instance_norm": InstanceNorm(),
}


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


def _token_norm_suite(op: str, device: str, quick: bool) -> list:
    """(tokens, hidden) float32 shapes, each without and with the fused residual (pre-norm block)."""
    if quick:
        shapes = [(64, 256)]
    else:
        shapes = [(4096, 1024), (8192, 4096)] + ([(16384, 8192)] if device == "cuda" else [])
    return [Case(op, shape, torch.float32, residual=residual)
            for shape in shapes for residual in (False, True)]


def layer_norm_suite(device: str, quick: bool = False) -> list:
    """LayerNorm (weight and bias) over the last dimension of (4096, 1024), (8192, 4096) and, on CUDA,
    (16384, 8192), float32, each alone and with the fused residual ``s = x + r`` (returning y and s).

    ``quick`` uses one tiny shape (a smoke test, not a measurement).
    """
    return _token_norm_suite("layer_norm", device, quick)


def rms_norm_suite(device: str, quick: bool = False) -> list:
    """RMSNorm (weight), the shapes and residual cases of the layer_norm suite."""
    return _token_norm_suite("rms_norm", device, quick)


def group_norm_suite(device: str, quick: bool = False) -> list:
    """GroupNorm, 32 groups, float32, at (32, 64, 56, 56), (8, 512, 64, 64) and (8, 512, 8, 8)
    (a diffusion UNet's innermost resolution: small planes, where the per-channel work is a few
    vectors), NCHW and channels_last, with and without a fused SiLU. ``quick`` uses one tiny
    shape."""
    shapes = [(4, 64, 8, 8)] if quick else [(32, 64, 56, 56), (8, 512, 64, 64), (8, 512, 8, 8)]
    return [
        Case("group_norm", shape, torch.float32, layout, activation)
        for shape in shapes
        for layout in ("contiguous", "channels_last")
        for activation in (None, "silu")
    ]


def instance_norm_suite(device: str, quick: bool = False) -> list:
    """InstanceNorm2d training mode (affine, no running statistics), float32, (32, 64, 56, 56) NCHW.
    ``quick`` uses one tiny shape."""
    shapes = [(4, 16, 8, 8)] if quick else [(32, 64, 56, 56)]
    return [Case("instance_norm", shape, torch.float32) for shape in shapes]


# In the order ``--suite all`` (the default) runs them.
SUITES = {
    "batch_norm": batch_norm_suite,
    "layer_norm": layer_norm_suite,
    "rms_norm": rms_norm_suite,
    "group_norm": group_norm_suite,
    "instance_norm": instance_norm_suite,
}
