"""Functional interface to torchnorm's operators."""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "leaky_relu", "silu")

__all__ = ["batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm", "ACTIVATIONS"]


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


def _shape_list(normalized_shape: Union[int, Sequence[int]]) -> List[int]:
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return list(normalized_shape)


def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Layer normalization over the trailing ``normalized_shape``, with an optional fused residual add.

    Without ``residual`` this is :func:`torch.nn.functional.layer_norm`. With it,
    computes ``s = input + residual`` and ``out = layer_norm(s)`` in one pass over
    memory and returns ``(out, s)``: the normalized input of a pre-norm
    transformer block and the residual stream it passes on.

    Args:
        input: any shape ending in ``normalized_shape``; float32, float64, float16
            or bfloat16 (any strides; non-contiguous inputs are copied).
        normalized_shape: trailing dimensions to normalize over.
        weight, bias: optional tensors of shape ``normalized_shape`` (float32
            allowed with float16/bfloat16 input).
        eps: added to the variance.
        residual: optional tensor of the input's shape and dtype.

    Returns:
        ``out``, or ``(out, s)`` when ``residual`` is given; contiguous.
    """
    out, total, _, _ = torch.ops.torchnorm.layer_norm.default(
        input, _shape_list(normalized_shape), weight, bias, eps, residual)
    return out if residual is None else (out, total)


def rms_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    residual: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """RMS normalization (Zhang and Sennrich, 2019), with an optional fused residual add.

    ``out = s / sqrt(mean(s**2) + eps) * weight`` over the trailing
    ``normalized_shape``, where ``s = input`` or ``input + residual``. Without
    ``residual`` this is :func:`torch.nn.functional.rms_norm`; with it, returns
    ``(out, s)`` from one pass over memory.

    Args:
        input, normalized_shape, weight, residual: as :func:`layer_norm`.
        eps: added to the mean square; ``None`` means the machine epsilon of
            the computation type (float32's for float32, float16 and bfloat16
            input, float64's for float64), as torch resolves it.
    """
    out, total, _ = torch.ops.torchnorm.rms_norm.default(input, _shape_list(normalized_shape), weight, eps, residual)
    return out if residual is None else (out, total)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """Group normalization with an optional fused activation.

    ``act(torch.nn.functional.group_norm(input, num_groups, weight, bias, eps))``
    in one pass over memory (the GroupNorm + SiLU of diffusion UNets).

    Args:
        input: ``(N, C, *)``; contiguous or channels-last (the output keeps it).
        num_groups: number of groups; must divide ``C``.
        weight, bias: optional ``(C,)`` affine parameters.
        eps: added to the variance.
        activation: ``None``, ``"relu"``, ``"leaky_relu"`` or ``"silu"``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs.
    """
    out, _, _ = torch.ops.torchnorm.group_norm.default(
        input, num_groups, weight, bias, eps, _activation_name(activation), negative_slope)
    return out


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance normalization, as :func:`torch.nn.functional.instance_norm`.

    Each ``(n, c)`` is normalized over its spatial positions. With
    ``use_input_stats`` (training), running statistics, when given, are
    updated in place with the batch average of the instances' mean and
    unbiased variance; otherwise the running statistics normalize (inference).

    Args:
        input: ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
        running_mean, running_var: optional ``(C,)`` running statistics.
        weight, bias: optional ``(C,)`` affine parameters.
        use_input_stats: normalize with each instance's own statistics.
        momentum: weight of the batch statistics in the running average.
        eps: added to the variance.
    """
    if use_input_stats:
        out, _, _ = torch.ops.torchnorm.instance_norm.default(
            input, weight, bias, running_mean, running_var, momentum, eps)
        return out
    if running_mean is None or running_var is None:
        raise ValueError("instance_norm: running_mean and running_var are required when use_input_stats=False")
    if isinstance(input, Tensor) and input.dim() < 3:  # (an fx Proxy's rank is unknown)
        raise ValueError(f"instance_norm: expected an input of shape (N, C, *spatial), got shape {tuple(input.shape)}")
    # With fixed statistics every instance is normalized alike: BatchNorm's
    # inference kernel.
    return torch.ops.torchnorm.batch_norm_eval.default(
        input, running_mean, running_var, weight, bias, eps, "none", 0.0, None)
