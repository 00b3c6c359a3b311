"""Autograd for torchnorm's forward ops: each forward saves what its
``torchnorm::*_backward`` op needs, and the backward calls that op, so
autograd, torch.fx, torch.compile and torch.export all see plain ops."""
import torch
from torch._library.autograd import Info, make_autograd_impl

_ops = torch.ops.torchnorm
_lib = torch.library.Library("torchnorm", "IMPL")


def _input_grads(ctx, grad_output, training):
    """Gradients (input, weight, bias, residual) through one BatchNorm forward."""
    want_input, want_weight, want_bias, want_residual = ctx.grad_wanted
    input, weight, bias, residual, mean, rstd = ctx.saved_tensors
    # Without an activation the residual's gradient is grad_output itself:
    # hand it through instead of having the kernel copy it.
    copy_residual_grad = want_residual and ctx.activation != "none"
    mask = [want_input, want_weight, want_bias, copy_residual_grad]
    grads = [None, None, None, None]
    if any(mask):
        results = _ops.batch_norm_backward.default(
            grad_output, input, weight, bias, residual, mean, rstd, training, ctx.activation,
            ctx.negative_slope, mask)
        grads = [g if wanted else None for g, wanted in zip(results, mask)]
    if want_residual and not copy_residual_grad:
        grads[3] = grad_output
    return grads


# --- batch_norm_train --------------------------------------------------------
# (input, weight, bias, running_mean, running_var, momentum, eps, activation,
#  negative_slope, residual) -> (out, mean, rstd)

def _train_setup_context(ctx, inputs, output):
    input, weight, bias, _, _, _, _, activation, negative_slope, residual = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, bias, residual, mean, rstd)
    ctx.activation, ctx.negative_slope = activation, negative_slope
    needs = ctx.needs_input_grad
    ctx.grad_wanted = (needs[0], needs[1], needs[2], needs[9])
    ctx.mark_non_differentiable(mean, rstd)


def _train_backward(ctx, grad_output, _grad_mean, _grad_rstd):
    grad_input, grad_weight, grad_bias, grad_residual = _input_grads(ctx, grad_output, True)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, grad_residual


# batch_norm_train mutates the running statistics, and
# torch.library.register_autograd accepts only functional ops. The kernel it
# would build is right for this op too (the running statistics never need
# gradients), so build it the same way and register it directly.
_lib.impl(
    "batch_norm_train",
    make_autograd_impl(_ops.batch_norm_train.default, Info(_train_backward, _train_setup_context)),
    "Autograd",
    with_keyset=True,
)


def _train_bump_versions(keyset, *args):
    # What torch.library.custom_op does for a mutable op: mark the running
    # statistics as modified, so autograd notices if a graph saved them.
    for running in (args[3], args[4]):
        if running is not None:
            torch.autograd.graph.increment_version(running)
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return _ops.batch_norm_train.default.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)


_lib.impl("batch_norm_train", _train_bump_versions, "ADInplaceOrView", with_keyset=True)


# --- batch_norm_eval ---------------------------------------------------------
# (input, running_mean, running_var, weight, bias, eps, activation,
#  negative_slope, residual) -> out

def _eval_setup_context(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, eps, activation, negative_slope, residual = inputs
    stats_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    # Copies, never views: the running statistics may change before backward
    # (and an op below autograd may not return its input, which .to() would).
    mean = running_mean.to(stats_dtype, copy=True)
    rstd = running_var.to(stats_dtype, copy=True).add_(eps).rsqrt_()
    ctx.save_for_backward(input, weight, bias, residual, mean, rstd)
    ctx.activation, ctx.negative_slope = activation, negative_slope
    needs = ctx.needs_input_grad
    ctx.grad_wanted = (needs[0], needs[3], needs[4], needs[8])


def _eval_backward(ctx, grad_output):
    grad_input, grad_weight, grad_bias, grad_residual = _input_grads(ctx, grad_output, False)
    return grad_input, None, None, grad_weight, grad_bias, None, None, None, grad_residual


torch.library.register_autograd("torchnorm::batch_norm_eval", _eval_backward, setup_context=_eval_setup_context)
