"""GroupNorm and InstanceNorm modules running torchnorm's kernels.

InstanceNorm lives here because it is GroupNorm with one group per channel:
both run the same kernels (csrc/cpu/group_norm.cpp, csrc/cuda/group_norm.cu).
Each class subclasses its torch.nn counterpart, so constructor arguments,
parameters, buffers, state_dict keys, ``isinstance`` checks and repr are
torch.nn's; only the forward runs torchnorm's operator. GroupNorm takes an
optional fused activation.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import functional as F
from .batch_norm import _symbolic_tracing


class GroupNorm(torch.nn.GroupNorm):
    """Drop-in for :class:`torch.nn.GroupNorm`, with an optional fused activation.

    Args:
        activation: (keyword) ``None`` (torch.nn's GroupNorm), ``"relu"``,
            ``"leaky_relu"`` or ``"silu"`` applied in the same pass.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs.
        Other arguments as :class:`torch.nn.GroupNorm`.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, activation: Optional[str] = None, negative_slope: float = 0.01, **kwargs) -> None:
        # kwargs: torch.nn.GroupNorm's keyword-only arguments (e.g. bias, in torch >= 2.12).
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, **kwargs)
        F._activation_name(activation)  # reject unknown names at construction
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                            self.negative_slope)

    def extra_repr(self) -> str:
        extra = "" if self.activation is None else f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + extra


class _InstanceNormMixin:
    def forward(self, input: Tensor) -> Tensor:
        if _symbolic_tracing():
            # torch.nn's checks branch on the input's shape, which a traced
            # value cannot do; the operator checks the rank again anyway.
            return self._apply_instance_norm(input)
        return super().forward(input)

    # torch.nn's _InstanceNorm.forward checks the input and handles unbatched
    # inputs, then calls this; only the operator changes.
    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    """Drop-in for :class:`torch.nn.InstanceNorm1d` (inputs ``(N, C, L)`` or ``(C, L)``)."""


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    """Drop-in for :class:`torch.nn.InstanceNorm2d` (inputs ``(N, C, H, W)`` or ``(C, H, W)``)."""


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    """Drop-in for :class:`torch.nn.InstanceNorm3d` (inputs ``(N, C, D, H, W)`` or ``(C, D, H, W)``)."""
