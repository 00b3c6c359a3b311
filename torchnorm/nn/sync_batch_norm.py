"""SyncBatchNorm: BatchNorm over the global batch of a torch.distributed job.

The design (collectives, numerics, what is kept for backward, limits) is in
docs/sync_batch_norm.md. In short, per training step and layer:

* forward: each rank computes its per-channel (count, mean, M2) with
  ``torchnorm::batch_norm_stats``; ONE ``all_gather`` of that (3, C) float64
  table (exact counts; means that keep their low digits); every rank merges
  the W partials with Chan's formula in rank order (``batch_norm_gather_stats``: identical bits
  on every rank, exact for uneven and empty batches), updates the running
  statistics with the global count, and normalizes with ``batch_norm_apply``
  (fused residual and activation);
* backward: the local sums ``sum(dz)`` and ``sum(dz * xhat)`` (dz: the
  gradient of the pre-activation) from ``batch_norm_backward``; ONE
  ``all_reduce`` of the two (C,) vectors; grad_input from the global means by
  ``batch_norm_backward_elemt``. Weight and bias get their LOCAL sums, as in
  torch.nn.SyncBatchNorm: DistributedDataParallel averages them over ranks.

The collectives are ``torch.distributed._functional_collectives``, which
dynamo traces: ``torch.compile(fullgraph=True)`` of a model with these layers
has no graph break.
"""
import itertools
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional as F
from . import batch_norm as _bn
from .batch_norm import _BatchNormCall

_OPS = torch.ops.torchnorm

# Environment switch of the debug check (see SyncBatchNorm's `debug`), and
# its timeout in seconds.
DEBUG_ENV = "TORCHNORM_SYNCBN_DEBUG"
DEBUG_TIMEOUT_ENV = "TORCHNORM_SYNCBN_DEBUG_TIMEOUT"
_DEFAULT_DEBUG_TIMEOUT = 60.0

# Layer ids for the debug check: construction order, the same on every rank
# that builds the same model.
_layer_ids = itertools.count()

# Attributes SyncBatchNorm adds to torch.nn.SyncBatchNorm's, with the values
# a converted module starts with (a _layer_id of None is assigned on first use).
EXTRA_ATTRIBUTES = {"activation": None, "negative_slope": 0.01, "debug": None, "_layer_id": None, "_debug_calls": 0}


def _functional_collectives():
    # Imported on first use: torch.distributed may lack them on some builds,
    # and torchnorm's import must not pay for them.
    import torch.distributed._functional_collectives as funcol
    return funcol


def _group_or_world(process_group):
    return process_group if process_group is not None else dist.group.WORLD


def _world_size(process_group) -> int:
    """Ranks to synchronize over; 1 when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(_group_or_world(process_group))


class _SyncBatchNormFunction(torch.autograd.Function):
    """act(BN(input) + residual) with the given global statistics; its backward
    all-reduces the two per-channel gradient sums. The statistics come from
    the input without autograd (sync_batch_norm): this backward accounts for
    the whole dependence of the output on the input through them."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, mean, rstd, count, activation, negative_slope, group):
        ctx.activation, ctx.negative_slope, ctx.group = activation, negative_slope, group
        ctx.save_for_backward(input, weight, bias, residual, mean, rstd, count)
        return _OPS.batch_norm_apply.default(input, mean, rstd, weight, bias, activation, negative_slope, residual)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, residual, mean, rstd, count = ctx.saved_tensors
        want_input, want_weight, want_bias, want_residual = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                                             ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        # The sums in the statistics' dtype (float32 for float16/bfloat16
        # input, whatever the parameters' dtype), so that the all-reduce and
        # grad_input see float32 sums: batch_norm_backward returns its sums
        # in the weight's dtype. A weight of ones stands in for none.
        weight_acc = weight.to(mean.dtype) if weight is not None else torch.ones_like(mean)
        bias_acc = bias.to(mean.dtype) if bias is not None else None
        _, sum_dz_xhat, sum_dz, _ = _OPS.batch_norm_backward.default(
            grad_output, input, weight_acc, bias_acc, residual, mean, rstd, False, ctx.activation,
            ctx.negative_slope, [False, True, True, False])
        grad_input = grad_residual = None
        if want_input or want_residual:
            means = torch.stack([sum_dz, sum_dz_xhat])
            if want_input:
                # The one collective of the backward (every rank's input
                # requires grad alike, so all ranks take this branch or none).
                means = _functional_collectives().all_reduce(means, "sum", ctx.group)
            means = means / count.clamp(min=1)
            grad_input, grad_residual = _OPS.batch_norm_backward_elemt.default(
                grad_output, input, weight_acc, bias_acc, residual, mean, rstd, means[0], means[1], ctx.activation,
                ctx.negative_slope, [want_input, want_residual])
            grad_input = grad_input if want_input else None
            grad_residual = grad_residual if want_residual else None
        grad_weight = sum_dz_xhat.to(weight.dtype) if want_weight else None
        grad_bias = sum_dz.to(bias.dtype) if want_bias else None
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, momentum: float = 0.1,
                    eps: float = 1e-5, activation: Optional[str] = None, negative_slope: float = 0.01,
                    residual: Optional[Tensor] = None, process_group=None) -> Tensor:
    """Training-mode BatchNorm over the batch of every rank of ``process_group``
    (default: the whole job), with optional fused residual and activation.

    Every rank of the group must call it (with any batch size, 0 included),
    in the same order relative to the group's other collectives. Running
    statistics, when given, are updated in place with the global batch's
    statistics (unbiased variance from the global count). Returns
    ``act(BN(input) + residual)`` for this rank's input, in its layout.
    """
    name = F._activation_name(activation)
    group = _group_or_world(process_group)
    funcol = _functional_collectives()
    with torch.no_grad():
        # Statistics without autograd: _SyncBatchNormFunction's backward
        # covers them. batch_norm_stats checks every argument, so a bad call
        # fails here, before any collective or update.
        local = _OPS.batch_norm_stats.default(input, weight, bias, running_mean, running_var, residual)
        # (W, 3, C): the ranks' tables in rank order. all_gather_single is
        # all_gather_tensor's newer name (torch 2.14), which deprecates the older.
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        table = gather(local.unsqueeze(0), 0, group)
        mean, rstd, count = _OPS.batch_norm_gather_stats.default(table, running_mean, running_var, momentum, eps)
        # The kernels' accumulation type: float32, or float64 for float64 input.
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        mean, rstd, count = mean.to(acc), rstd.to(acc), count.to(acc)
    return _SyncBatchNormFunction.apply(input, weight, bias, residual, mean, rstd, count, name, negative_slope, group)


def _debug_timeout() -> float:
    return float(os.environ.get(DEBUG_TIMEOUT_ENV, _DEFAULT_DEBUG_TIMEOUT))


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Drop-in for :class:`torch.nn.SyncBatchNorm` on torchnorm's kernels, CPU
    (gloo) and GPU (NCCL), with an optional fused residual add and activation:
    ``act(BN(x) + residual)`` where BN's statistics are those of the global
    batch (every rank's ``x`` together).

    Constructor, parameters, buffers (``num_batches_tracked`` included),
    state_dict keys, ``process_group`` and repr are torch.nn.SyncBatchNorm's.
    It derives from torch.nn's ``_BatchNorm`` as torch.nn.SyncBatchNorm does,
    but not from torch.nn.SyncBatchNorm itself: DistributedDataParallel
    refuses CPU models holding one of those. Ranks may have uneven or empty
    batches. In evaluation mode, or when torch.distributed is not
    initialized or the group has one rank, it is a plain (local) BatchNorm.

    Args:
        num_features, eps, momentum, affine, track_running_stats,
        process_group, device, dtype: as :class:`torch.nn.SyncBatchNorm`.
        activation: ``None``, ``"relu"``, ``"leaky_relu"`` or ``"silu"``,
            fused after the residual add.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs.
        debug: before each synchronization, check that every rank reached
            this same layer: a rank that skipped it (or is elsewhere) makes
            every rank raise an error naming it, after at most
            ``TORCHNORM_SYNCBN_DEBUG_TIMEOUT`` seconds (default 60), instead
            of hanging. Costs two extra small collectives per call; eager
            mode only (skipped under torch.compile). Default: the
            environment variable ``TORCHNORM_SYNCBN_DEBUG=1``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None,
                 activation: Optional[str] = None, negative_slope: float = 0.01,
                 debug: Optional[bool] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        F._activation_name(activation)  # reject unknown names at construction
        self.process_group = process_group
        self.activation = activation
        self.negative_slope = negative_slope
        self.debug = debug
        self._layer_id = next(_layer_ids)
        self._debug_calls = 0

    def _check_input_dim(self, input: Tensor) -> None:
        # torch.nn.SyncBatchNorm's check and message
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if not _bn._symbolic_tracing():
            self._check_input_dim(input)
        return self.normalize(input, residual, self.activation, self.negative_slope)

    def synchronizes(self) -> bool:
        """Whether a forward now exchanges statistics with the other ranks:
        training with batch statistics in a process group of several ranks."""
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return self.training and use_batch_stats and _world_size(self.process_group) > 1

    def normalize(self, input: Tensor, residual: Optional[Tensor], activation: Optional[str],
                  negative_slope: float) -> Tensor:
        """The forward with the given epilogue ``act(BN(input) + residual)``
        (torchnorm's fused Conv+BN blocks pass theirs)."""
        call = _BatchNormCall(self)
        if not self.synchronizes():
            out = F.batch_norm(input, call.running_mean, call.running_var, self.weight, self.bias,
                               call.use_batch_stats, call.momentum, self.eps, activation, negative_slope, residual)
        else:
            if not torch.compiler.is_compiling() and self._debug_enabled():
                self._check_ranks_in_step()
            out = sync_batch_norm(input, call.running_mean, call.running_var, self.weight, self.bias, call.momentum,
                                  self.eps, activation, negative_slope, residual, self.process_group)
        call.count_batch()
        return out

    def _debug_enabled(self) -> bool:
        if self.debug is not None:
            return self.debug
        return os.environ.get(DEBUG_ENV, "0") not in ("", "0")

    def _check_ranks_in_step(self) -> None:
        from ._sync_debug import check_ranks_in_step
        if self._layer_id is None:
            self._layer_id = next(_layer_ids)
        self._debug_calls += 1
        check_ranks_in_step(_group_or_world(self.process_group), self._layer_id, self._debug_calls,
                            _debug_timeout())

    def extra_repr(self) -> str:
        extra = ""
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                extra += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + extra

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replaces BatchNorm layers in ``module`` with :class:`SyncBatchNorm` (in place).

        Converted: torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm,
        torchnorm's BatchNorm1d/2d/3d and BatchNormAct2d, and timm's
        BatchNormAct2d when its activation is one torchnorm fuses (ReLU,
        LeakyReLU, SiLU, none) and its dropout an identity; the activation is
        kept, fused. The new layers share the old ones' Parameters and
        buffers (an optimizer built before still updates them), mode, device
        and dtype. Other subclasses of torch.nn's _BatchNorm (their forward
        may do more) are left alone.

        Returns:
            ``module``, or its replacement when ``module`` itself is converted.
        """
        from .convert import retyped

        def swap(bn, epilogue):
            new = retyped(bn, cls)
            new._modules.clear()  # timm's act and drop: the activation is fused now
            new.process_group = process_group
            new.activation = None if epilogue[0] == "none" else epilogue[0]
            new.negative_slope = epilogue[1]
            new.debug = None
            new._layer_id = next(_layer_ids)
            new._debug_calls = 0
            return new

        epilogue = _sync_epilogue(module)
        if epilogue is not None:
            return swap(module, epilogue)
        for parent in module.modules():
            for name, child in parent._modules.items():
                epilogue = _sync_epilogue(child) if child is not None else None
                if epilogue is not None:
                    parent._modules[name] = swap(child, epilogue)
        return module


def _sync_epilogue(module: torch.nn.Module):
    """(activation, negative_slope) a BatchNorm applies after normalizing, when
    convert_sync_batchnorm converts it, else None."""
    if type(module) is torch.nn.SyncBatchNorm:
        return "none", 0.01
    from ..fx._graph import batch_norm_epilogue  # imported here: torchnorm.fx imports this module
    return batch_norm_epilogue(module, training=True)
