"""Convolutions whose input is a training BatchNorm's output that they do not
keep: backward rebuilds it from the BatchNorm's input and batch statistics.

``y = act(BN(pre_norm))`` is what a fused Conv+BN block without residual
returns (``batch_norm_train``). A convolution of ``y`` would keep ``y`` for
its weight gradient; these ops keep the block's *recipe* instead, the
pre-norm tensor (which the BatchNorm's own backward keeps anyway) and its
batch mean and rstd, and rebuild ``y`` in backward with ``batch_norm_apply``
(one element-wise pass, the same kernel and arithmetic as the forward, so the
rebuilt tensor is the one the forward used). The gradient still goes to
``y``, so it flows into the producing BatchNorm's backward as usual; the
recipe's tensors get none.

The saving is a property of the ops: autograd keeps the recipe through
ordinary ``save_for_backward``, so the user's saved-tensor hooks
(``save_on_cpu``, non-reentrant checkpointing) see and handle those tensors
like any other, and torch.compile traces the ops (fake kernels below; the
backward is made of registered ops). See docs/conv_bn.md.

- ``conv_rebuilt_input``: ``convolution(input, weight, bias)``, for a
  no-residual block whose input is such an output (then BatchNorm follows);
- ``conv_bn_train_rebuilt``: ``conv_bn_train`` (which keeps its conv input
  and its residual, and recomputes the conv in backward) keeping the recipe
  of its input and/or its residual instead, for the ResNet tail block (whose
  residual is a downsample block's output in a stage's first block).

They are Python custom ops (torch.library) composed of ATen's convolution and
torchnorm's BatchNorm ops: no new kernel, no new arithmetic.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = []

_OPS = torch.ops.torchnorm
_ANY_LAYOUT = (torch.Tag.flexible_layout,)


def _rebuild(pre_norm, mean, rstd, bn_weight, bn_bias, activation, negative_slope) -> Tensor:
    """The block output the recipe describes (what batch_norm_train wrote)."""
    return _OPS.batch_norm_apply.default(pre_norm, mean, rstd, bn_weight, bn_bias, activation, negative_slope, None)


def _output_padding(stride, output_padding) -> List[int]:
    """All zeros where the op was given none (a conv's), as conv_bn_train takes it."""
    return list(output_padding) if len(output_padding) else [0] * len(stride)


def _check_recipe(op: str, input: Tensor, pre_norm: Tensor, mean: Tensor, rstd: Tensor) -> None:
    """The recipe describes a tensor of the input's shape, one statistic per channel."""
    if pre_norm.shape != input.shape:
        raise ValueError(f"torchnorm.{op}: the recipe's pre-norm tensor must have the input's shape "
                         f"{tuple(input.shape)}, got {tuple(pre_norm.shape)}")
    channels = input.shape[1] if input.dim() > 1 else -1
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"torchnorm.{op}: the recipe's {name} must have one entry per input channel "
                             f"({channels}), got shape {tuple(t.shape)}")


# -- conv_rebuilt_input ---------------------------------------------------------

@torch.library.custom_op("torchnorm::conv_rebuilt_input", mutates_args=(), tags=_ANY_LAYOUT)
def conv_rebuilt_input(input: Tensor, pre_norm: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], activation: str, negative_slope: float, weight: Tensor,
                       bias: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                       groups: int, transposed: bool, output_padding: List[int]) -> Tensor:
    """``convolution(input, weight, bias)`` where ``input`` is
    ``act(BN(pre_norm))`` with batch statistics ``mean``/``rstd``; autograd
    keeps the recipe, not ``input``."""
    _check_recipe("conv_rebuilt_input", input, pre_norm, mean, rstd)
    return torch.convolution(input, weight, bias, stride, padding, dilation, transposed,
                             _output_padding(stride, output_padding), groups)


@conv_rebuilt_input.register_fake
def _(input, pre_norm, mean, rstd, bn_weight, bn_bias, activation, negative_slope, weight, bias, stride, padding,
      dilation, groups, transposed, output_padding):
    _check_recipe("conv_rebuilt_input", input, pre_norm, mean, rstd)
    return torch.convolution(input, weight, bias, stride, padding, dilation, transposed,
                             _output_padding(stride, output_padding), groups)


def _conv_rebuilt_input_setup(ctx, inputs, output) -> None:
    (input, pre_norm, mean, rstd, bn_weight, bn_bias, activation, negative_slope, weight, bias, stride, padding,
     dilation, groups, transposed, output_padding) = inputs
    ctx.save_for_backward(pre_norm, mean, rstd, bn_weight, bn_bias, weight)
    ctx.act = (activation, negative_slope)
    ctx.conv = (stride, padding, dilation, transposed, _output_padding(stride, output_padding), groups)
    ctx.bias_shape = None if bias is None else list(bias.shape)


def _conv_rebuilt_input_backward(ctx, grad):
    pre_norm, mean, rstd, bn_weight, bn_bias, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[8], ctx.bias_shape is not None and needs[9]]
    grad_input = grad_weight = grad_bias = None
    if any(mask):
        input = _rebuild(pre_norm, mean, rstd, bn_weight, bn_bias, *ctx.act)
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward.default(
            grad, input, weight, ctx.bias_shape, *ctx.conv, mask)
    return (grad_input if mask[0] else None, None, None, None, None, None, None, None,
            grad_weight if mask[1] else None, grad_bias if mask[2] else None, None, None, None, None, None, None)


conv_rebuilt_input.register_autograd(_conv_rebuilt_input_backward, setup_context=_conv_rebuilt_input_setup)


# -- conv_bn_train_rebuilt -------------------------------------------------------

# Functional: a custom op with an autograd formula may not mutate its
# arguments, so this one returns the updated running statistics (empty where
# none were given) and the caller copies them into the buffers.
@torch.library.custom_op("torchnorm::conv_bn_train_rebuilt", mutates_args=(), tags=_ANY_LAYOUT)
def conv_bn_train_rebuilt(
        input: Tensor, in_pre_norm: Optional[Tensor], in_mean: Optional[Tensor], in_rstd: Optional[Tensor],
        in_bn_weight: Optional[Tensor], in_bn_bias: Optional[Tensor], in_activation: str, in_negative_slope: float,
        weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
        running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float, activation: str,
        negative_slope: float, residual: Optional[Tensor], res_pre_norm: Optional[Tensor], res_mean: Optional[Tensor],
        res_rstd: Optional[Tensor], res_bn_weight: Optional[Tensor], res_bn_bias: Optional[Tensor],
        res_activation: str, res_negative_slope: float, stride: List[int], padding: List[int], dilation: List[int],
        groups: int, transposed: bool, output_padding: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``conv_bn_train(input, ..., residual, ...)`` where ``input`` (the
    ``in_*`` arguments) and/or ``residual`` (the ``res_*`` arguments) are
    ``act(BN(pre_norm))`` with batch statistics ``mean``/``rstd``; autograd
    keeps those recipes instead of the tensors (a tensor whose pre-norm
    argument is None is kept as it is). Returns (output, batch mean, batch
    rstd) as conv_bn_train does, then the running mean and variance as
    conv_bn_train would leave them (empty where not given)."""
    return _conv_bn_train_of_copies(*_train_args(locals()))


def _train_args(a: dict) -> tuple:
    """conv_bn_train_rebuilt's arguments -> _conv_bn_train_of_copies's."""
    if a["in_pre_norm"] is not None:
        _check_recipe("conv_bn_train_rebuilt", a["input"], a["in_pre_norm"], a["in_mean"], a["in_rstd"])
    if a["res_pre_norm"] is not None and a["residual"] is not None:
        _check_recipe("conv_bn_train_rebuilt", a["residual"], a["res_pre_norm"], a["res_mean"], a["res_rstd"])
    return tuple(a[k] for k in ("input", "weight", "conv_bias", "bn_weight", "bn_bias", "running_mean", "running_var",
                                "momentum", "eps", "activation", "negative_slope", "residual", "stride", "padding",
                                "dilation", "groups", "transposed", "output_padding"))


def _conv_bn_train_of_copies(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                             activation, negative_slope, residual, stride, padding, dilation, groups, transposed,
                             output_padding):
    """conv_bn_train on copies of the running statistics (the op and its fake)."""
    new_mean = None if running_mean is None else running_mean.clone()
    new_var = None if running_var is None else running_var.clone()
    out, batch_mean, batch_rstd = _OPS.conv_bn_train.default(
        input, weight, conv_bias, bn_weight, bn_bias, new_mean, new_var, momentum, eps, activation,
        negative_slope, residual, stride, padding, dilation, groups, transposed, output_padding)
    return (out, batch_mean, batch_rstd, batch_mean.new_empty(0) if new_mean is None else new_mean,
            batch_mean.new_empty(0) if new_var is None else new_var)


_TRAIN_NAMES = ("input", "in_pre_norm", "in_mean", "in_rstd", "in_bn_weight", "in_bn_bias", "in_activation",
                "in_negative_slope", "weight", "conv_bias", "bn_weight", "bn_bias", "running_mean", "running_var",
                "momentum", "eps", "activation", "negative_slope", "residual", "res_pre_norm", "res_mean", "res_rstd",
                "res_bn_weight", "res_bn_bias", "res_activation", "res_negative_slope", "stride", "padding",
                "dilation", "groups", "transposed", "output_padding")
# The differentiable arguments, in conv_bn_train_backward's gradient order.
_TRAIN_GRADS = tuple(_TRAIN_NAMES.index(k) for k in ("input", "weight", "conv_bias", "bn_weight", "bn_bias",
                                                     "residual"))


@conv_bn_train_rebuilt.register_fake
def _(*args):
    return _conv_bn_train_of_copies(*_train_args(dict(zip(_TRAIN_NAMES, args))))


def _kept(a: dict, tensor: str, prefix: str) -> tuple:
    """What backward keeps of ``tensor``: itself, or its recipe."""
    if a[prefix + "pre_norm"] is None or a[tensor] is None:
        return (a[tensor], None, None, None, None)
    return tuple(a[prefix + k] for k in ("pre_norm", "mean", "rstd", "bn_weight", "bn_bias"))


def _restore(kept: tuple, act: tuple) -> Optional[Tensor]:
    """The tensor _kept kept, rebuilt from its recipe where that was kept."""
    tensor_or_pre_norm, mean, rstd, bn_weight, bn_bias = kept
    if mean is None:
        return tensor_or_pre_norm
    return _rebuild(tensor_or_pre_norm, mean, rstd, bn_weight, bn_bias, *act)


def _conv_bn_train_rebuilt_setup(ctx, inputs, output) -> None:
    a = dict(zip(_TRAIN_NAMES, inputs))
    _, batch_mean, batch_rstd, new_mean, new_var = output
    ctx.mark_non_differentiable(batch_mean, batch_rstd, new_mean, new_var)
    ctx.save_for_backward(*_kept(a, "input", "in_"), *_kept(a, "residual", "res_"), a["weight"], a["conv_bias"],
                          a["bn_weight"], a["bn_bias"], batch_mean, batch_rstd)
    ctx.in_act = (a["in_activation"], a["in_negative_slope"])
    ctx.res_act = (a["res_activation"], a["res_negative_slope"])
    ctx.act = (a["activation"], a["negative_slope"])
    ctx.conv = tuple(a[k] for k in ("stride", "padding", "dilation", "groups", "transposed", "output_padding"))


def _conv_bn_train_rebuilt_backward(ctx, grad, *_grad_stats):
    saved = ctx.saved_tensors
    weight, conv_bias, bn_weight, bn_bias, batch_mean, batch_rstd = saved[10:]
    mask = [ctx.needs_input_grad[i] for i in _TRAIN_GRADS]
    # Without an activation the residual's gradient is the output's (as the
    # C++ autograd of conv_bn_train hands it through).
    pass_residual = mask[5] and ctx.act[0] == "none"
    if pass_residual:
        mask[5] = False
    grads = [None] * 6
    if any(mask):
        input, residual = _restore(saved[0:5], ctx.in_act), _restore(saved[5:10], ctx.res_act)
        grads = list(_OPS.conv_bn_train_backward.default(
            grad, input, weight, conv_bias, bn_weight, bn_bias, residual, batch_mean, batch_rstd, *ctx.act,
            *ctx.conv, mask))
        grads = [g if wanted else None for g, wanted in zip(grads, mask)]
    if pass_residual:
        grads[5] = grad
    result = [None] * len(_TRAIN_NAMES)
    for position, g in zip(_TRAIN_GRADS, grads):
        result[position] = g
    return tuple(result)


conv_bn_train_rebuilt.register_autograd(_conv_bn_train_rebuilt_backward, setup_context=_conv_bn_train_rebuilt_setup)
