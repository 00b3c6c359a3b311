"""Functional interface to torchnorm's operators."""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "leaky_relu", "silu")

__all__ = [
    "batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm", "ACTIVATIONS",
    "recurrent_batch_norm_step", "sequence_batch_norm", "bn_lstm", "valid_steps", "online_norm",
]


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
        eps: added to the variance; must be >= 0 (a negative eps is refused with a
            RuntimeError). Unlike torch.nn.functional.batch_norm, eps = 0 is allowed in
            training; the BatchNorm modules refuse it with torch.nn's ValueError.
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
        eps: added to the variance; must be >= 0 (a negative eps is refused with a
            RuntimeError, where torch computes with it and may take the square root of
            a negative number).
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
            input, float64's for float64), as torch resolves it. A negative eps
            is refused with a RuntimeError, where torch computes with it.
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
        eps: added to the variance; must be >= 0 (a negative eps is refused with a
            RuntimeError, where torch computes with it and may take the square root of
            a negative number).
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
        eps: added to the variance; must be >= 0 (a negative eps is refused with a
            RuntimeError, where torch computes with it and may take the square root of
            a negative number).
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


# ---------------------------------------------------------------------------
# Sequence norms: recurrent BatchNorm and BN-LSTM (Cooijmans et al. 2016),
# sequence-wise BatchNorm of BN-RNNs (Laurent et al. 2015). The float64
# references with the same signatures are in torchnorm.reference.
# ---------------------------------------------------------------------------


def recurrent_batch_norm_step(
    x: Tensor,
    t: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Recurrent BatchNorm of an ``(N, C)`` input at time step ``t``: BatchNorm
    with statistics of its own for every step.

    ``running_mean`` / ``running_var`` are ``(max_length, C)``; step ``t`` uses
    row ``min(t, max_length - 1)``, so a step at or beyond ``max_length`` uses
    (and, in training, updates) the last row. Training normalizes with the
    batch statistics (biased variance) of the rows where the bool ``(N,)``
    ``mask`` is True (None: all) and updates that row of the running
    statistics in place with the unbiased variance, as torch.nn does.
    Rows where ``mask`` is False output 0 and get gradient 0.

    One valid row normalizes with variance 0: its normalized value is exactly
    0, so its output is ``bias`` whatever the input, and its input gradient 0;
    the running variance is then updated with 0. See
    :func:`torchnorm.reference.recurrent_batch_norm_step`, which this matches.
    """
    if t < 0:
        raise ValueError(f"time step t must be >= 0, got {t}")
    out, _, _ = torch.ops.torchnorm.masked_batch_norm.default(
        x, mask, weight, bias, running_mean, running_var, t, training, momentum, eps)
    return out


def valid_steps(lengths: Optional[Tensor], steps: int, batch: int, device=None,
                batch_first: bool = False) -> Optional[Tensor]:
    """The bool ``(steps, batch)`` of the positions ``t < lengths[n]``
    (``(batch, steps)`` with ``batch_first``), or None without ``lengths``.
    Raises ValueError for lengths of the wrong shape or outside ``[0, steps]``."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be integers, got {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), one per sequence, got {tuple(lengths.shape)}")
    if batch > 0 and not torch.compiler.is_compiling():
        shortest, longest = int(lengths.min()), int(lengths.max())
        if shortest < 0 or longest > steps:
            raise ValueError(f"lengths must lie in [0, {steps}] (the input has {steps} steps), "
                             f"got lengths from {shortest} to {longest}")
    lengths = lengths.to(device=device, dtype=torch.long)
    valid = torch.arange(steps, device=device).unsqueeze(1) < lengths.unsqueeze(0)
    return valid.t() if batch_first else valid


def sequence_batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    lengths: Optional[Tensor] = None,
    batch_first: bool = False,
) -> Tensor:
    """Sequence-wise BatchNorm of BN-RNNs: statistics over batch and time
    together of a ``(T, N, C)`` input (``(N, T, C)`` with ``batch_first``).

    Positions ``t >= lengths[n]`` (padding) take no part in the statistics and
    output 0 (gradient 0). Without ``lengths`` it equals
    :func:`torch.nn.functional.batch_norm` of the ``(T*N, C)`` reshape, running
    statistics ``(C,)`` included (updated in place when training; they may be
    None then). One valid position normalizes with variance 0 (output
    ``bias``) and updates the running variance with 0, where torch.nn raises.
    """
    if x.dim() != 3:
        raise ValueError(f"sequence_batch_norm expects a 3-d {'(N, T, C)' if batch_first else '(T, N, C)'} input, "
                         f"got shape {tuple(x.shape)}")
    steps, batch = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    valid = valid_steps(lengths, steps, batch, x.device, batch_first)
    rows = x.reshape(-1, x.shape[2])
    out, _, _ = torch.ops.torchnorm.masked_batch_norm.default(
        rows, None if valid is None else valid.reshape(-1), weight, bias, running_mean, running_var, 0, training,
        momentum, eps)
    return out.view(x.shape)


def bn_lstm(
    x: Tensor,
    h0: Optional[Tensor],
    c0: Optional[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Optional[Tensor],
    bn_ih_weight: Tensor,
    bn_hh_weight: Tensor,
    bn_c_weight: Tensor,
    bn_c_bias: Tensor,
    running_stats: dict,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    lengths: Optional[Tensor] = None,
    first_step: int = 0,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One layer of BN-LSTM (Cooijmans et al. 2016) over a ``(T, N, I)`` input::

        gates = BN_hh(W_hh h_{t-1}) + BN_ih(W_ih x_t) + bias     (BN shifts fixed at 0)
        i, f, g, o = gates.chunk(4)                               (torch.nn.LSTM's order)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(BN_c(c_t))

    with BatchNorm statistics of their own for every step. The input
    projection of all steps is one matrix product; then each step is one
    matrix product and one fused kernel (``torchnorm::bn_lstm_layer``).

    ``running_stats`` maps "ih", "hh" and "c" to ``(running_mean,
    running_var)`` of shape ``(max_length, 4H)``, ``(max_length, 4H)`` and
    ``(max_length, H)``, updated in place when training (step ``first_step +
    t`` uses row ``min(first_step + t, max_length - 1)``). ``lengths`` ``(N,)``
    in any order: a sequence that has ended is masked out of every later step
    (output 0, no part in the statistics, state kept). A step with one
    sequence left normalizes it with variance 0: its gate BNs give 0 and its
    cell BN ``bn_c_bias``, so ``h_t = sigmoid(o) * tanh(bn_c_bias)``.

    Returns ``(output, (h_n, c_n))``: output ``(T, N, H)``; ``h_n`` and
    ``c_n`` ``(N, H)``, each sequence's state at its last valid step. Same
    signature as :func:`torchnorm.reference.bn_lstm` (plus ``first_step``).
    """
    if x.dim() != 3:
        raise ValueError(f"bn_lstm expects a (T, N, input_size) input, got shape {tuple(x.shape)}")
    if x.shape[2] != weight_ih.shape[1]:
        raise ValueError(f"bn_lstm: expected input_size {weight_ih.shape[1]} (weight_ih's columns), "
                         f"got an input with {x.shape[2]} features")
    steps, batch, hidden = x.shape[0], x.shape[1], weight_hh.shape[1]
    if lengths is not None:
        valid_steps(lengths, steps, batch)  # checks them with a clear message
        lengths = torch.as_tensor(lengths).to(device=x.device, dtype=torch.long)
    h0 = x.new_zeros(batch, hidden) if h0 is None else h0
    c0 = x.new_zeros(batch, hidden) if c0 is None else c0
    gates = torch.matmul(x, weight_ih.t())  # the input projection of every step at once
    output, h_n, c_n, _, _, _ = torch.ops.torchnorm.bn_lstm_layer.default(
        gates, h0, c0, weight_hh, bias, bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias,
        *running_stats["ih"], *running_stats["hh"], *running_stats["c"], lengths, first_step, training, momentum,
        eps)
    return output, (h_n, c_n)


# ---------------------------------------------------------------------------
# Online Normalization (Chiley et al. 2019). The float64 reference with the
# same signature is torchnorm.reference.online_norm.
# ---------------------------------------------------------------------------


def online_norm(
    x: Tensor,
    mu: Tensor,
    var: Tensor,
    u: Tensor,
    v: Tensor,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    eps: float = 1e-5,
    training: bool = True,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    layer_scale: bool = False,
) -> Tensor:
    """Online Normalization of an ``(N, C, *)`` input, samples in order, with
    state carried across batches (``torchnorm::online_norm``), then the affine
    map ``y * weight + bias`` in the same pass when given, and with
    ``layer_scale`` the paper's layer scaling ``out / sqrt(mean over each
    sample's (C, *) of out^2 + eps)`` (in the same pass too, in training).

    Training normalizes each sample with the running ``mu``, ``var`` ``(C,)``
    from before it and then updates them with the sample's own mean and
    variance (in place); the backward is the paper's control process, which
    updates ``u``, ``v`` ``(C,)`` in place, so a batch of N gives exactly what
    N batches of one give. The backward of one forward may run once only.
    Evaluation normalizes with ``mu``, ``var`` and updates nothing. The state
    is float32 (or float64) whatever the input's dtype. See
    :func:`torchnorm.reference.online_norm` for the equations.
    """
    if not training:
        out = batch_norm(x, mu, var, weight, bias, training=False, eps=eps)
        return rms_norm(out, list(out.shape[1:]), None, eps) if layer_scale else out
    out, _, _, _ = torch.ops.torchnorm.online_norm.default(x, weight, bias, mu, var, u, v, alpha_fwd, alpha_bkw, eps,
                                                           layer_scale)
    return out


# ---------------------------------------------------------------------------
# Cosine Normalization (Luo et al. 2017). The float64 references with the same
# signatures are torchnorm.reference.cosine_linear and cosine_conv2d.
# ---------------------------------------------------------------------------

__all__ += ["cosine_linear", "cosine_conv2d"]

_IntPair = Union[int, Sequence[int]]


def _pair(value: _IntPair, name: str) -> List[int]:
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def cosine_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-8) -> Tensor:
    """Cosine Normalization of a linear layer (``torchnorm::cosine_linear``):
    ``out = (x . w_o + b_o) / (|x| |w_o|)`` for each row x of the input
    ``(*, in_features)`` and row w_o of the weight ``(out_features,
    in_features)``, so ``-1 <= out <= 1``. The norms are ``|x| = sqrt(sum x^2
    + [bias] + eps)`` and ``|w_o| = sqrt(sum w_o^2 + b_o^2 + eps)``: a bias is
    the weight of a constant input 1, and eps keeps an all-zero row's norm
    from 0 (its output is 0). See docs/cosine_norm.md."""
    out, _, _ = torch.ops.torchnorm.cosine_linear.default(input, weight, bias, eps)
    return out


def cosine_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _IntPair = 1,
                  padding: _IntPair = 0, dilation: _IntPair = 1, groups: int = 1, eps: float = 1e-8) -> Tensor:
    """Cosine Normalization of a 2-d convolution (``torchnorm::cosine_conv2d``):
    ``torch.nn.functional.conv2d(input, weight, bias, ...)`` (zero padding)
    divided at each output position by ``|x| |w_o|``, where x is the input
    patch under that position over the channels of the output's group
    (padding counts as zeros) and w_o the output channel's weights; ``-1 <=
    out <= 1``. Norms and bias as :func:`cosine_linear` (the bias's constant
    input is once per patch). See docs/cosine_norm.md."""
    out, _, _ = torch.ops.torchnorm.cosine_conv2d.default(input, weight, bias, _pair(stride, "stride"),
                                                         _pair(padding, "padding"), _pair(dilation, "dilation"),
                                                         groups, eps)
    return out


# ---------------------------------------------------------------------------
# Weight Normalization (Salimans and Kingma 2016). The float64 reference with
# the same signature is torchnorm.reference.weight_norm; the parametrization
# that applies it to a module's weight is torchnorm.weight_norm.
# ---------------------------------------------------------------------------

__all__ += ["weight_norm", "WEIGHT_NORM_EPS"]

# The smallest norm a slice is divided by: a zero slice gives w = 0, not NaN.
WEIGHT_NORM_EPS = 1e-12


def weight_norm(v: Tensor, g: Tensor, dim: Optional[int] = 0, eps: float = WEIGHT_NORM_EPS) -> Tensor:
    """Weight normalization ``w = g * v / max(||v||, eps)`` in one fused op
    (``torchnorm::weight_norm``), differentiable in ``v`` and ``g``.

    Args:
        v: the direction, float32, float64, float16 or bfloat16, any shape.
        g: the magnitudes, one per slice of ``v`` along ``dim``: shaped
            ``(v.shape[dim],)``, or like ``v`` with size 1 outside ``dim``
            (what ``torch.norm_except_dim`` returns); ``v``'s dtype (or float32
            for float16/bfloat16 ``v``).
        dim: the dimension whose slices ``v.select(dim, s)`` each get one norm
            (over every other dimension); negative counts from the end;
            ``None``: one norm of the whole tensor. (Unlike this,
            ``torch._weight_norm`` and the parametrizations take ``dim=-1`` to
            mean the whole tensor; :func:`torchnorm.weight_norm` follows them.)
        eps: a slice's norm is clamped to at least ``eps`` (> 0), so a zero
            slice gives zeros and finite gradients.

    Norms are accumulated in float32 for float16/bfloat16 ``v`` (float64 for
    float64). Returns ``w``, contiguous, in ``v``'s dtype.
    """
    w, _ = torch.ops.torchnorm.weight_norm.default(v, g, dim, eps)
    return w
