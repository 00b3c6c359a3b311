"""float64 reference implementations: the ground truth of tests and benchmarks.

They follow the source article's algorithms with its errors corrected (see
DESIGN.md, Numerics): variance by two passes (mean first, then centred
squares), eps inside the square root in inference, running statistics exactly
as torch.nn keeps them (unbiased running variance). Plain PyTorch, readable
rather than fast; differentiable through autograd.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["apply_activation", "batch_norm"]


def apply_activation(z: Tensor, name: Optional[str], negative_slope: float = 0.01) -> Tensor:
    """The activations torchnorm fuses, by name (None or "none": identity)."""
    if name is None or name == "none":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if name == "silu":
        return z * torch.sigmoid(z)
    raise ValueError(f"unknown activation {name!r}")


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    negative_slope: float = 0.01,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """float64 ``act(BN(input) + residual)``; same arguments as
    :func:`torchnorm.functional.batch_norm`. Updates the running statistics in
    place when training."""
    x = input.double()
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    if training:
        mean = x.mean(dims)
        var = ((x - mean.view(shape)) ** 2).mean(dims)  # biased: what normalizes
        count = x.numel() // x.shape[1]
        if running_mean is not None and count > 0:
            with torch.no_grad():
                unbiased = var * count / (count - 1)
                running_mean.copy_((1 - momentum) * running_mean.double() + momentum * mean)
                running_var.copy_((1 - momentum) * running_var.double() + momentum * unbiased)
    else:
        mean, var = running_mean.double(), running_var.double()
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    if residual is not None:
        y = y + residual.double()
    return apply_activation(y, activation, negative_slope)
