"""Cosine Normalization (Luo et al. 2017, arXiv 1702.05870) as layers: a
linear layer or 2-d convolution whose every output is the cosine of the angle
between the output unit's weights and the input it sees, so it lies in
[-1, 1] whatever the scale of either; the activation comes after.

The norms are ours (torchnorm::cosine_linear, torchnorm::cosine_conv2d): for
the convolution, the norm of the input patch under each output position (the
output's group's channels, padding as zeros) from a windowed sum of squares,
and the division in one output pass; the dot product itself is ATen's. The
parameters are named and initialized as torch.nn.Linear's and
torch.nn.Conv2d's. docs/cosine_norm.md has the math, the backward and the
eps and bias conventions.
"""
from typing import Sequence, Union

import torch
from torch import Tensor

from .. import functional as F

__all__ = ["CosineLinear", "CosineConv2d"]

_IntPair = Union[int, Sequence[int]]


def _add_parameters(module: torch.nn.Module, weight_shape: tuple, bias: bool, device, dtype) -> None:
    """``weight`` of weight_shape and ``bias`` (weight_shape[0],) or None, then torch's initialization."""
    module.weight = torch.nn.Parameter(torch.empty(weight_shape, device=device, dtype=dtype))
    if bias:
        module.bias = torch.nn.Parameter(torch.empty(weight_shape[0], device=device, dtype=dtype))
    else:
        module.register_parameter("bias", None)
    module.reset_parameters()


class CosineLinear(torch.nn.Module):
    """``out = (x . w_o + b_o) / (|x| |w_o|)`` for each output feature o, on
    input ``(*, in_features)``, output ``(*, out_features)``, each in [-1, 1].

    ``|x| = sqrt(sum x^2 + [bias] + eps)``, ``|w_o| = sqrt(sum w_o^2 + b_o^2
    + eps)``: a bias is the weight of a constant input 1, entering the dot
    product and both norms; eps keeps an all-zero input row (or weight row)
    from 0 / 0: its output is 0. ``weight`` ``(out_features, in_features)``
    and ``bias`` ``(out_features,)`` (``bias=False``: none, the paper's
    default) as torch.nn.Linear's, initialized the same way.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, eps: float = 1e-8, device=None,
                 dtype=None) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.in_features, self.out_features, self.eps = in_features, out_features, eps
        _add_parameters(self, (out_features, in_features), bias, device, dtype)

    def reset_parameters(self) -> None:
        """torch.nn.Linear's initialization."""
        torch.nn.Linear.reset_parameters(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"CosineLinear expects an input (*, {self.in_features}), got shape {tuple(x.shape)}")
        return F.cosine_linear(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, eps={self.eps}"


def _pair_of(value: _IntPair, name: str) -> tuple:
    if isinstance(value, str):
        raise ValueError(f"CosineConv2d: {name} must be an int or a pair of ints (zero padding), got {value!r}")
    return tuple(F._pair(value, name))


class CosineConv2d(torch.nn.Module):
    """A 2-d convolution (zero padding) whose output at each position and
    channel o is ``(w_o . x + b_o) / (|w_o| |x|)``, x the input patch under
    that position over the channels of o's group (padding counts as zeros),
    so each output is in [-1, 1]. Input ``(N, C, H, W)`` or ``(C, H, W)``.

    Norms, eps and bias as :class:`CosineLinear`; the bias's constant input
    is once per patch (one bias per output channel). ``weight`` ``(out_channels,
    in_channels / groups, kh, kw)`` and ``bias`` as torch.nn.Conv2d's,
    initialized the same way. Not a torch.nn.Conv2d subclass: BatchNorm
    folding and fusion must not mistake it for one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntPair, stride: _IntPair = 1,
                 padding: _IntPair = 0, dilation: _IntPair = 1, groups: int = 1, bias: bool = False,
                 eps: float = 1e-8, device=None, dtype=None) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.in_channels, self.out_channels, self.groups, self.eps = in_channels, out_channels, groups, eps
        self.kernel_size = _pair_of(kernel_size, "kernel_size")
        self.stride, self.padding = _pair_of(stride, "stride"), _pair_of(padding, "padding")
        self.dilation = _pair_of(dilation, "dilation")
        _add_parameters(self, (out_channels, in_channels // groups, *self.kernel_size), bias, device, dtype)

    def reset_parameters(self) -> None:
        """torch.nn.Conv2d's initialization."""
        torch.nn.modules.conv._ConvNd.reset_parameters(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"CosineConv2d expects an input (N, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got shape {tuple(x.shape)}")
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        out = F.cosine_conv2d(batched, self.weight, self.bias, self.stride, self.padding, self.dilation,
                              self.groups, self.eps)
        return out if x.dim() == 4 else out.squeeze(0)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, eps={self.eps}")
