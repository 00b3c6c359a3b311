"""BatchNorm modules running torchnorm's kernels.

Each class subclasses its torch.nn counterpart, so constructor arguments,
parameters, buffers, state_dict keys, ``isinstance`` checks and repr are
torch.nn's; only ``forward`` runs torchnorm's fused operator.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import functional as F

# True while torch.fx.symbolic_trace runs (older torch: its broader check).
_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                            torch.fx._symbolic_trace.is_fx_tracing)


class _BatchNormCall:
    """What torch.nn's _BatchNorm.forward decides before normalizing: which
    statistics to use, which running buffers to pass, and the momentum."""

    def __init__(self, module) -> None:
        self.momentum = 0.0 if module.momentum is None else module.momentum
        self.update_stats = module.training and module.track_running_stats
        if self.update_stats and module.num_batches_tracked is not None and module.momentum is None:
            # Cumulative moving average: this batch is number num_batches_tracked + 1.
            self.momentum = 1.0 / float(module.num_batches_tracked + 1)
        self.use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
        # torch.nn's modules refuse these at forward (torch.nn.functional.batch_norm
        # does): a zero eps divides by a zero batch variance.
        if self.use_batch_stats and module.eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {module.eps}")
        if module.eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {module.eps}")
        keep_running = not module.training or module.track_running_stats
        self.running_mean = module.running_mean if keep_running else None
        self.running_var = module.running_var if keep_running else None
        self.module = module

    def count_batch(self) -> None:
        """Called once the op succeeded, so a rejected input changes nothing."""
        if self.update_stats and self.module.num_batches_tracked is not None:
            self.module.num_batches_tracked.add_(1)


def _batch_norm_forward(module, input: Tensor, activation: Optional[str], negative_slope: float,
                        residual: Optional[Tensor]) -> Tensor:
    """torch.nn's _BatchNorm.forward, with torchnorm's op and an epilogue."""
    if not _symbolic_tracing():
        # A shape check is control flow on a traced value; the operator
        # checks the rank again anyway.
        module._check_input_dim(input)
    call = _BatchNormCall(module)
    out = F.batch_norm(input, call.running_mean, call.running_var, module.weight, module.bias, call.use_batch_stats,
                       call.momentum, module.eps, activation, negative_slope, residual)
    call.count_batch()
    return out


class BatchNorm1d(torch.nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` (inputs ``(N, C)`` or ``(N, C, L)``)."""

    def forward(self, input: Tensor) -> Tensor:
        return _batch_norm_forward(self, input, None, 0.0, None)


class BatchNorm2d(torch.nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` (inputs ``(N, C, H, W)``)."""

    def forward(self, input: Tensor) -> Tensor:
        return _batch_norm_forward(self, input, None, 0.0, None)


class BatchNorm3d(torch.nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` (inputs ``(N, C, D, H, W)``)."""

    def forward(self, input: Tensor) -> Tensor:
        return _batch_norm_forward(self, input, None, 0.0, None)


class BatchNormAct2d(BatchNorm2d):
    """BatchNorm2d with a fused residual add and activation: ``act(BN(x) + residual)``.

    The tail of a ResNet block in one pass over memory. Its state_dict is a
    BatchNorm2d's, so it loads torch.nn.BatchNorm2d weights.

    Args:
        num_features: channels C.
        activation: ``"relu"``, ``"leaky_relu"``, ``"silu"`` or ``None``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs.
        Other arguments as :class:`torch.nn.BatchNorm2d`.
    """

    def __init__(self, num_features: int, activation: Optional[str] = "relu", negative_slope: float = 0.01,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        F._activation_name(activation)  # reject unknown names at construction
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return _batch_norm_forward(self, input, self.activation, self.negative_slope, residual)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + extra
