"""Functional interface to torchnorm's operators."""
from typing import Optional

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "leaky_relu", "silu")

__all__ = ["batch_norm", "ACTIVATIONS"]


def _activation_name(activation: Optional[str]) -> str:
    if activation is None or activation == "none":
        return "none"
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    return activation


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
    """Batch normalization with an optional fused residual add and activation.

    Computes ``act(BN(input) + residual)`` in one pass over memory, where BN is
    exactly :func:`torch.nn.functional.batch_norm` with the same arguments.

    Args:
        input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``;
            float32, float64, float16 or bfloat16; contiguous or channels-last.
        running_mean, running_var: ``(C,)`` running statistics, updated in place
            when ``training`` (may be ``None`` then: batch statistics only).
        weight, bias: optional ``(C,)`` affine parameters.
        training: normalize with batch statistics (and update the running ones).
        momentum: weight of the batch statistics in the running average.
        eps: added to the variance.
        activation: ``None``, ``"relu"``, ``"leaky_relu"`` or ``"silu"``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs.
        residual: optional tensor of the input's shape added before the activation.

    Returns:
        A tensor of the input's shape, dtype and memory layout.
    """
    name = _activation_name(activation)
    if training:
        out, _, _ = torch.ops.torchnorm.batch_norm_train.default(
            input, weight, bias, running_mean, running_var, momentum, eps, name, negative_slope, residual)
        return out
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: running_mean and running_var are required when training=False")
    return torch.ops.torchnorm.batch_norm_eval.default(
        input, running_mean, running_var, weight, bias, eps, name, negative_slope, residual)
