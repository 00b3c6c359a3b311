"""float64 reference implementations: the ground truth the tests compare
torchnorm's kernels against (the benchmarks time torch.nn, not these).

They follow the source article's algorithms with its errors corrected (see
docs/design.md, Numerics): variance by two passes (mean first, then centred
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


# ---------------------------------------------------------------------------
# Per-sample norms (LayerNorm, RMSNorm, GroupNorm, InstanceNorm): the formulas
# in float64, statistics by two passes, no torch.nn.functional normalization.
# ---------------------------------------------------------------------------

__all__ += ["layer_norm", "rms_norm", "group_norm", "instance_norm"]


def _trailing_dims(x: Tensor, normalized_shape) -> list:
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if k == 0 or tuple(x.shape[x.dim() - k:]) != normalized_shape or x.dim() < k:
        raise ValueError(f"normalized_shape {normalized_shape} does not match the input's shape {tuple(x.shape)}")
    return list(range(x.dim() - k, x.dim()))


def layer_norm(
    input: Tensor,
    normalized_shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
):
    """float64 LayerNorm of ``s = input + residual`` over the trailing
    ``normalized_shape``: ``(s - mean) / sqrt(var + eps) * weight + bias`` with
    the biased variance. Same arguments as
    :func:`torchnorm.functional.layer_norm`; returns the output, or
    ``(output, s)`` when a residual is given."""
    s = input.double()
    if residual is not None:
        s = s + residual.double()
    dims = _trailing_dims(s, normalized_shape)
    mean = s.mean(dims, keepdim=True)
    var = ((s - mean) ** 2).mean(dims, keepdim=True)
    y = (s - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y if residual is None else (y, s)


def rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    residual: Optional[Tensor] = None,
):
    """float64 RMSNorm of ``s = input + residual``: ``s / sqrt(mean(s**2) + eps) * weight``
    over the trailing ``normalized_shape``. ``eps=None`` is what
    torch.nn.functional.rms_norm uses: the machine epsilon of its computation
    dtype, float32's for float16 / bfloat16 / float32 inputs and float64's for
    float64 (not finfo(input.dtype) as its docstring says: see torch's
    _fused_rms_norm decomposition). Returns the output, or ``(output, s)`` when
    a residual is given."""
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    s = input.double()
    if residual is not None:
        s = s + residual.double()
    dims = _trailing_dims(s, normalized_shape)
    y = s / torch.sqrt((s * s).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    return y if residual is None else (y, s)


def _spatial(x: Tensor) -> int:
    n = 1
    for size in x.shape[2:]:
        n *= size
    return n


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """float64 ``act(GroupNorm(input))``: input ``(N, C, *)``, each sample's C
    channels split into ``num_groups`` consecutive groups normalized together
    (biased variance), then the per-channel affine and the activation."""
    x = input.double()
    N, C = x.shape[0], x.shape[1]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"num_groups {num_groups} must be positive and divide the {C} channels")
    g = x.reshape(N, num_groups, (C // num_groups) * _spatial(x))  # (explicit sizes: N may be 0)
    mean = g.mean(2, keepdim=True)
    var = ((g - mean) ** 2).mean(2, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = [1, C] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return apply_activation(y, activation, negative_slope)


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
    """float64 InstanceNorm: each (n, c) of an ``(N, C, *)`` input normalized over
    its spatial positions. Same arguments as torch.nn.functional.instance_norm.
    With ``use_input_stats`` and running statistics given, they are updated in
    place with the batch average of the per-instance mean and unbiased variance
    (left alone for an empty batch); without ``use_input_stats`` the running
    statistics normalize."""
    x = input.double()
    N, C = x.shape[0], x.shape[1]
    dims = list(range(2, x.dim()))
    shape = [1, C] + [1] * (x.dim() - 2)
    if use_input_stats:
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)  # biased: what normalizes
        count = x[0, 0].numel() if N * C > 0 else 0
        if running_mean is not None and N > 0 and count > 1:
            with torch.no_grad():
                unbiased = var.reshape(N, C) * count / (count - 1)
                running_mean.copy_((1 - momentum) * running_mean.double() + momentum * mean.reshape(N, C).mean(0))
                running_var.copy_((1 - momentum) * running_var.double() + momentum * unbiased.mean(0))
    else:
        mean, var = running_mean.double().view(shape), running_var.double().view(shape)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y
