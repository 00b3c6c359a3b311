"""Streaming Normalization (Liao, Kawaguchi and Poggio 2016, arXiv 1610.06160)
as modules: per-channel batch statistics streamed across batches, so that
batch size 1 and online learning work.

Algorithm (docs/streaming_norm.md has it in full). Per channel, s = (mean,
std) of the batch over N and the positions, std = sqrt(biased var + eps).
State, each a float32 buffer (float64 for a float64 module) in the state_dict:
``short_stats`` (2, C), the average of s over the batches since the last
weight update, and ``short_count``; ``long_stats`` (2, C), the long-term
statistics (start: mean 0, std 1), and ``long_count``, the weight updates
it has absorbed; ``grad_short``, ``grad_short_count``, ``grad_long``,
``grad_long_count``: the same for g = dL/ds_hat, the gradient with respect to
the statistics that normalized.

Training forward: push s into the short-term average, then normalize with
s_hat = alpha[0] long + alpha[1] short (before the first weight update the
short-term statistics stand in for the long-term ones). Backward: push this
batch's g into the short-term gradient history; the batch statistics s get,
instead of their derivative, g_hat = beta[0] grad_long + beta[1] grad_short +
beta[2] g (beta None: (alpha[0], alpha[1], 0), "mixed the same way"), which
reaches the input through d mean/dx and d std/dx. ``weight_update()``:
long <- k1 long + (1 - k1) short (the first time: long <- short), the same
for the gradients with k3 (None: k1), and the short-term histories cleared.
Eval normalizes with ``long_stats`` and updates nothing.

alpha = (0, 1) with beta = (0, 0, 1) (or weight_update() between batches) is
training-mode BatchNorm, statistics and gradients.

Where the authors' code (liaoq/StreamingNorm, which says it may differ from
the paper) differs, this follows the paper: std is sqrt(var + eps) of the
biased variance and x is divided by it once (the code divides by the
streamed unbiased std + eps, + eps again, which is not BatchNorm for alpha
= (0, 1)); the forward mixes long and short only (the code adds a "current"
alpha[2] term that the paper does not have); eval uses the long-term
statistics (the code mixes long and short in eval too); weight updates are
announced by weight_update(), not detected through a dummy parameter that
the optimizer moves.

Batch size 1: with one value per channel ((1, C) input) the batch's variance
is 0, its std sqrt(eps) and its mean the value itself; training still works
(no error, unlike BatchNorm), since s_hat mixes in the long-term statistics;
with alpha = (0, 1) the output is then bias (the input minus itself).

Kernels: training runs torchnorm::streaming_norm and its backward
streaming_norm_backward, BatchNorm's passes with the streaming step (push,
mix) per channel between the statistics and the element-wise pass, so a
step costs about what BatchNorm's does.

Hazards: the backward updates the gradient histories, so one forward's graph
may be backpropagated once (a second backward raises); the forward refuses
to run inside a backward pass (activation checkpointing's recomputation
would push its statistics twice).
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["StreamingNorm1d", "StreamingNorm2d", "streaming_norm_hook"]

_OPS = torch.ops.torchnorm
_STATE = ("short_stats", "short_count", "long_stats", "long_count",
          "grad_short", "grad_short_count", "grad_long", "grad_long_count")


class _EvalNormFn(torch.autograd.Function):
    """Evaluation: y = (x - mean) * rstd * weight + bias with the long-term
    statistics held fixed, by batch_norm_apply; backward by
    batch_norm_backward (training=False). (Training goes through
    torchnorm::streaming_norm, whose autograd is in C++.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, rstd):
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return _OPS.batch_norm_apply(x, mean, rstd, weight, bias, "none", 0.0, None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2], False]
        dx, dw, db, _ = _OPS.batch_norm_backward(grad_output.contiguous(), x, weight, bias, None, mean, rstd, False,
                                                 "none", 0.0, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None)


class _StreamingNorm(torch.nn.Module):
    """Shared by StreamingNorm1d and StreamingNorm2d: ``_dims`` are the input
    ranks the subclass accepts."""

    _dims: tuple = ()

    def __init__(self, num_features: int, alpha: Sequence[float] = (0.5, 0.5), k1: float = 0.7, eps: float = 1e-5,
                 affine: bool = True, beta: Optional[Sequence[float]] = None, k3: Optional[float] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        alpha = tuple(float(a) for a in alpha)
        if len(alpha) != 2:
            raise ValueError(f"alpha must be (long-term, short-term) weights, got {alpha}")
        beta = (alpha[0], alpha[1], 0.0) if beta is None else tuple(float(b) for b in beta)
        if len(beta) != 3:
            raise ValueError(f"beta must be (long-term, short-term, current) weights, got {beta}")
        k3 = k1 if k3 is None else k3
        for name, k in (("k1", k1), ("k3", k3)):
            if not 0.0 <= k <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {k}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.num_features, self.alpha, self.beta, self.k1, self.k3, self.eps = num_features, alpha, beta, k1, k3, eps
        self.affine = affine
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # The state stays float32 whatever the parameters' dtype (see _apply).
        for name in _STATE:
            shape = () if name.endswith("count") else (2, num_features)
            self.register_buffer(name, torch.zeros(shape, device=device, dtype=torch.float32))
        self.reset_state()

    def reset_state(self) -> None:
        """Empty histories; long-term statistics mean 0, std 1, not yet set by a weight update."""
        for name in _STATE:
            getattr(self, name).zero_()
        self.long_stats[1].fill_(1)

    def _apply(self, fn, recurse=True):
        # .half() / .to(bfloat16) would round the statistics away: the state
        # keeps its float32 (or float64) values and only follows a device move.
        before = {name: self._buffers[name] for name in _STATE}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype not in (torch.float32, torch.float64):
                self._buffers[name] = old.to(device=new.device)
        return self

    @torch.no_grad()
    def weight_update(self) -> None:
        """Call once per optimizer step (after it): long <- k1 long + (1 - k1)
        short (the first time: long <- short), the same for the gradient
        histories with k3, and the short-term histories cleared. A history
        with nothing pushed since the last call keeps its long-term value."""
        for short, count, long, long_count, k in (
                (self.short_stats, self.short_count, self.long_stats, self.long_count, self.k1),
                (self.grad_short, self.grad_short_count, self.grad_long, self.grad_long_count, self.k3)):
            pushed = count > 0
            mixed = torch.where(long_count > 0, k * long + (1 - k) * short, short)
            long.copy_(torch.where(pushed, mixed, long))
            long_count.add_(pushed.to(long_count.dtype))
            short.zero_()
            count.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in self._dims or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__} expects an input of {' or '.join(map(str, self._dims))} "
                             f"dimensions with {self.num_features} channels in dim 1, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__} needs at least one value per channel, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        if self.training:
            if torch._C._current_graph_task_id() != -1:
                raise RuntimeError(
                    f"{type(self).__name__}: forward ran inside a backward pass, as activation checkpointing's "
                    "recomputation does. Streaming Normalization pushes each batch's statistics into its history "
                    "in the forward (and their gradient in the backward), so a recomputed forward would push them "
                    "twice: keep this layer out of checkpointed regions")
            # One op: the batch statistics, their push into the short-term
            # history, the mix and the normalization in BatchNorm's passes;
            # its backward streams the statistics' gradient the same way.
            out, _, _, _, _ = _OPS.streaming_norm(
                x, self.weight, self.bias, self.short_stats, self.short_count, self.long_stats, self.long_count,
                self.grad_short, self.grad_short_count, self.grad_long, self.grad_long_count, *self.alpha,
                *self.beta, self.eps)
            return out
        stat = torch.float64 if x.dtype == torch.float64 else torch.float32
        s_hat = self.long_stats.to(stat)
        return _EvalNormFn.apply(x, self.weight, self.bias, s_hat[0].contiguous(), (1 / s_hat[1]).contiguous())

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha={self.alpha}, k1={self.k1}, eps={self.eps}, affine={self.affine}, "
                f"beta={self.beta}, k3={self.k3}")


class StreamingNorm1d(_StreamingNorm):
    """Streaming Normalization of ``(N, C)`` or ``(N, C, L)`` input (statistics
    per channel over N and L); see the module docstring for the algorithm,
    state and hazards. Call :meth:`weight_update` after each optimizer step,
    or install :func:`streaming_norm_hook`."""

    _dims = (2, 3)


class StreamingNorm2d(_StreamingNorm):
    """Streaming Normalization of ``(N, C, H, W)`` input (statistics per
    channel over N, H, W); as :class:`StreamingNorm1d`."""

    _dims = (4,)


def streaming_norm_hook(optimizer: torch.optim.Optimizer, model: torch.nn.Module):
    """Calls weight_update() on every StreamingNorm in ``model`` after each
    ``optimizer.step()`` (``register_step_post_hook``); returns the handle
    (``.remove()`` uninstalls it). Nothing is read from the optimizer."""
    layers = [m for m in model.modules() if isinstance(m, _StreamingNorm)]

    def hook(opt, args, kwargs):
        for m in layers:
            m.weight_update()

    return optimizer.register_step_post_hook(hook)
