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


# ---------------------------------------------------------------------------
# Sequence norms: recurrent BatchNorm and BN-LSTM (Cooijmans et al.
# 2016, arXiv 1603.09025), sequence-wise BatchNorm of BN-RNNs (Laurent et al.
# 2015, arXiv 1510.01378). The ground truth for their kernels; built on
# one masked batch statistic, biased variance to normalize, unbiased for the
# running average.
# ---------------------------------------------------------------------------

__all__ += ["recurrent_batch_norm_step", "bn_lstm", "sequence_batch_norm"]


def _masked_batch_norm(
    x: Tensor,
    valid: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """BatchNorm of the rows of a float64 ``(M, C)`` ``x`` where the bool ``(M,)``
    ``valid`` is True; the other rows take no part and give output 0 (hence
    zero gradient). Training updates the 1-d running statistics in place (if
    given) with the unbiased variance; one valid row updates them with its
    variance 0 (the unbiased estimate is undefined), no valid row leaves them
    alone."""
    C = x.shape[1]
    if training:
        rows = x[valid]
        count = rows.shape[0]
        if count == 0:  # nothing to normalize: every output is 0
            mean, var = x.new_zeros(C), x.new_ones(C)
        else:
            mean = rows.mean(0)
            var = ((rows - mean) ** 2).mean(0)  # biased: what normalizes
        if running_mean is not None and count > 0:
            with torch.no_grad():
                unbiased = var * count / (count - 1) if count > 1 else var
                running_mean.copy_((1 - momentum) * running_mean.double() + momentum * mean)
                running_var.copy_((1 - momentum) * running_var.double() + momentum * unbiased)
    else:
        mean, var = running_mean.double(), running_var.double()
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return torch.where(valid.unsqueeze(1), y, torch.zeros((), dtype=y.dtype))


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
    """float64 recurrent BatchNorm (Cooijmans et al. 2016) of an ``(N, C)`` input
    at time step ``t``, with per-step statistics.

    ``running_mean`` / ``running_var`` are ``(max_length, C)``; step ``t`` uses
    row ``min(t, max_length - 1)``: a step at or beyond ``max_length`` uses the
    last row and, in training, updates it. Training normalizes with the batch
    statistics (biased variance) of the rows where the bool ``(N,)`` ``mask``
    is True (None: all) and updates that row of the running statistics in place
    with the mean and the unbiased variance, as torch.nn does. Eval normalizes
    with that row's running statistics. ``weight`` / ``bias`` are shared across
    time; None means scale 1 / shift 0 (BN-LSTM's fixed-zero shifts).

    Rows where ``mask`` is False (sequences that have ended) take no part in
    the statistics, their output is 0 and their gradient is 0, in training and
    in eval.

    One valid row: its mean is itself and its variance 0, so its normalized
    value is exactly 0 (``x - mean = 0``, divided by ``sqrt(eps)``) and the
    output is ``bias`` (0 without one), whatever the input; its gradient with
    respect to the input is 0. The running variance is then updated with the
    biased variance 0, the unbiased estimate being undefined (torch.nn raises
    here instead). No valid row: every output is 0 and the running statistics
    are left alone.
    """
    if t < 0:
        raise ValueError(f"time step t must be >= 0, got {t}")
    xd = x.double()
    N = xd.shape[0]
    if mask is None:
        valid = torch.ones(N, dtype=torch.bool, device=xd.device)
    else:
        valid = mask.to(device=xd.device, dtype=torch.bool)
    if valid.shape != (N,):
        raise ValueError(f"mask must have shape ({N},), got {tuple(valid.shape)}")
    row = min(t, running_mean.shape[0] - 1)
    return _masked_batch_norm(xd, valid, running_mean[row], running_var[row], weight, bias, training, momentum, eps)


def _valid_steps(lengths: Optional[Tensor], T: int, N: int, device) -> Tensor:
    """The ``(T, N)`` bool of the positions ``t < lengths[n]`` (all when None)."""
    if lengths is None:
        return torch.ones(T, N, dtype=torch.bool, device=device)
    lengths = torch.as_tensor(lengths).to(device=device, dtype=torch.long)
    if lengths.shape != (N,):
        raise ValueError(f"lengths must have shape ({N},), got {tuple(lengths.shape)}")
    if N > 0 and (lengths.min() < 0 or lengths.max() > T):
        raise ValueError(f"lengths must lie in [0, {T}], got {lengths.tolist()}")
    return torch.arange(T, device=device).unsqueeze(1) < lengths.unsqueeze(0)


def bn_lstm(
    x: Tensor,
    h0: Optional[Tensor],
    c0: Optional[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Optional[Tensor],
    bn_ih_weight: Optional[Tensor],
    bn_hh_weight: Optional[Tensor],
    bn_c_weight: Optional[Tensor],
    bn_c_bias: Optional[Tensor],
    running_stats: dict,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    lengths: Optional[Tensor] = None,
):
    """float64 one layer of BN-LSTM (Cooijmans et al. 2016) over a ``(T, N, I)`` input::

        gates = BN_hh(W_hh h_{t-1}) + BN_ih(W_ih x_t) + bias     (BN shifts fixed at 0)
        i, f, g, o = gates.chunk(4)                               (torch.nn.LSTM's order)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(BN_c(c_t))

    ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias`` (4H) or None;
    ``bn_ih_weight`` / ``bn_hh_weight`` (4H) and ``bn_c_weight`` /
    ``bn_c_bias`` (H) are the BN scales and shift, shared across time. ``h0`` /
    ``c0`` are ``(N, H)`` (None: zeros). Every BN is
    :func:`recurrent_batch_norm_step` with per-step statistics:
    ``running_stats`` maps "ih", "hh" and "c" to ``(running_mean,
    running_var)`` pairs of shape ``(max_length, 4H)``, ``(max_length, 4H)``
    and ``(max_length, H)``, updated in place when training.

    ``lengths`` (N,), sorted or not (None: all T): a sequence that has ended
    takes no part in any later step's statistics, its outputs there are 0 (with
    zero gradient), and its state stays that of its last valid step. A step
    with one sequence left normalizes it with variance 0 (see
    :func:`recurrent_batch_norm_step`): its two gate BNs give 0 and its cell
    BN gives ``bn_c_bias``, so its gates are ``bias`` alone and its
    ``h_t = sigmoid(o) * tanh(bn_c_bias)``; only ``c_t`` still depends on its
    past.

    Returns ``(output, (h_n, c_n))``: output ``(T, N, H)``, and ``h_n`` /
    ``c_n`` ``(N, H)``, each sequence's state at its last valid step (``h0`` /
    ``c0`` for length 0), what torch.nn.LSTM returns for packed input (without
    its leading layer dimension).
    """
    xd = x.double()
    T, N = xd.shape[0], xd.shape[1]
    H = weight_hh.shape[1]
    valid = _valid_steps(lengths, T, N, xd.device)
    h = xd.new_zeros(N, H) if h0 is None else h0.double()
    c = xd.new_zeros(N, H) if c0 is None else c0.double()
    w_ih, w_hh = weight_ih.double(), weight_hh.double()
    wx_all = xd @ w_ih.t()  # the input projection of every step at once
    outputs = []

    def bn(z, t, key, weight, bias, mask):
        return recurrent_batch_norm_step(z, t, *running_stats[key], weight, bias, training, momentum, eps, mask)

    for t in range(T):
        m = valid[t]
        wx = bn(wx_all[t], t, "ih", bn_ih_weight, None, m)
        wh = bn(h @ w_hh.t(), t, "hh", bn_hh_weight, None, m)
        gates = wx + wh
        if bias is not None:
            gates = gates + bias.double()
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(bn(c_new, t, "c", bn_c_weight, bn_c_bias, m))
        keep = m.unsqueeze(1)
        c = torch.where(keep, c_new, c)  # an ended sequence keeps its last valid state
        h = torch.where(keep, h_new, h)
        outputs.append(torch.where(keep, h_new, torch.zeros((), dtype=h_new.dtype)))
    output = torch.stack(outputs) if T > 0 else xd.new_zeros(0, N, H)
    return output, (h, c)


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
    """float64 sequence-wise BatchNorm of BN-RNNs (Laurent et al. 2015) of a
    ``(T, N, C)`` input (``(N, T, C)`` with ``batch_first``): statistics over
    batch and time together. Positions ``t >= lengths[n]`` (padding) take no
    part in the statistics and give output 0 (zero gradient). Without
    ``lengths`` it equals torch.nn.functional.batch_norm of the ``(T*N, C)``
    reshape, running statistics (``(C,)``, updated in place when training with
    the unbiased variance; may be None when training) included. Where
    torch.nn would raise (one valid position in training) the running variance
    is updated with the biased variance 0, and the output is ``bias``; no valid
    position leaves the running statistics alone."""
    xd = x.double()
    if batch_first:
        xd = xd.transpose(0, 1)
    T, N, C = xd.shape
    valid = _valid_steps(lengths, T, N, xd.device).reshape(T * N)
    y = _masked_batch_norm(
        xd.reshape(T * N, C), valid, running_mean, running_var, weight, bias, training, momentum, eps
    ).reshape(T, N, C)
    return y.transpose(0, 1) if batch_first else y


# ---------------------------------------------------------------------------
# Online Normalization (Chiley et al. 2019, arXiv 1905.05894): per channel,
# samples in order, with state carried across batches; its backward is the
# paper's control process, not the derivative of the forward.
# ---------------------------------------------------------------------------

__all__ += ["online_norm"]


class _OnlineNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mu, var, u, v, alpha_fwd, alpha_bkw, eps):
        flat = x.double().reshape(x.shape[0], x.shape[1], -1)  # (N, C, positions)
        m_state, v_state = mu.double().clone(), var.double().clone()
        ys, variances = [], []
        for sample in flat:
            # Normalize with the statistics from before this sample.
            y = (sample - m_state[:, None]) / torch.sqrt(v_state[:, None] + eps)
            ys.append(y)
            variances.append(v_state)
            m = sample.mean(1)
            s2 = ((sample - m[:, None]) ** 2).mean(1)
            v_state = alpha_fwd * v_state + (1 - alpha_fwd) * s2 + alpha_fwd * (1 - alpha_fwd) * (m - m_state) ** 2
            m_state = m_state + (1 - alpha_fwd) * (m - m_state)
        mu.copy_(m_state)
        var.copy_(v_state)
        y = torch.stack(ys) if ys else flat.clone()
        ctx.save_for_backward(y, torch.stack(variances) if variances else flat.new_zeros(0, x.shape[1]))
        ctx.state, ctx.alpha_bkw, ctx.eps, ctx.shape = (u, v), alpha_bkw, eps, x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_output):
        y, variances = ctx.saved_tensors
        u_buf, v_buf = ctx.state
        a = 1 - ctx.alpha_bkw
        u, v = u_buf.double().clone(), v_buf.double().clone()
        dys = grad_output.double().reshape(y.shape)
        dxs = []
        for y_n, dy_n, var_n in zip(y, dys, variances):
            g = dy_n - a * v[:, None] * y_n
            v = v + (g * y_n).mean(1)
            g = g / torch.sqrt(var_n[:, None] + ctx.eps)
            dx = g - a * u[:, None]
            u = u + dx.mean(1)
            dxs.append(dx)
        u_buf.copy_(u)
        v_buf.copy_(v)
        dx = torch.stack(dxs) if dxs else dys.clone()
        return dx.reshape(ctx.shape), None, None, None, None, None, None, None


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
) -> Tensor:
    """float64 Online Normalization of an ``(N, C, *)`` input, samples in order.

    Forward, per channel, for each sample n: ``y_n = (x_n - mu) / sqrt(var +
    eps)`` with the state from before sample n; then, with ``m_n`` and ``s2_n``
    the mean and biased variance of sample n over its positions (one value for
    ``(N, C)`` input: ``s2_n = 0``)::

        var <- a_f var + (1 - a_f) s2_n + a_f (1 - a_f) (m_n - mu)^2
        mu  <- mu + (1 - a_f) (m_n - mu)

    ``mu`` and ``var`` ``(C,)`` are updated in place (start: 0 and 1).
    Backward is the paper's control process, not the forward's derivative,
    for each sample n in order (means over the sample's positions)::

        g = dy_n - (1 - a_b) v y_n;   v += mean(g y_n);   g = g / sqrt(var_n + eps)
        dx_n = g - (1 - a_b) u;        u += mean(dx_n)

    ``u`` and ``v`` ``(C,)`` are updated in place by the backward (start: 0).
    Evaluation (``training=False``) normalizes with the state, updates
    nothing, and differentiates plainly.
    """
    if not training:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x.double() - mu.double().view(shape)) / torch.sqrt(var.double().view(shape) + eps)
    return _OnlineNorm.apply(x, mu, var, u, v, alpha_fwd, alpha_bkw, eps)


# ---------------------------------------------------------------------------
# Streaming Normalization (Liao, Kawaguchi and Poggio 2016, arXiv 1610.06160):
# per-channel batch statistics s = (mean, std) averaged into a short-term
# history (since the last weight update) and a long-term one (updated at each
# weight update); the gradient with respect to the statistics is streamed the
# same way. See docs/streaming_norm.md.
# ---------------------------------------------------------------------------

__all__ += ["streaming_norm_state", "streaming_norm", "streaming_norm_weight_update"]


def streaming_norm_state(num_features: int, dtype=torch.float64) -> dict:
    """A fresh state, named as StreamingNorm1d/2d's buffers: rows (mean, std)
    of the short- and long-term statistics and of the short- and long-term
    gradient histories, each (2, C), and how many batches (short) or weight
    updates (long) each holds. The long-term statistics start at mean 0,
    std 1 (what evaluation uses before the first weight update)."""
    C = num_features
    return dict(
        short_stats=torch.zeros(2, C, dtype=dtype), short_count=torch.zeros((), dtype=dtype),
        long_stats=torch.stack([torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)]),
        long_count=torch.zeros((), dtype=dtype),
        grad_short=torch.zeros(2, C, dtype=dtype), grad_short_count=torch.zeros((), dtype=dtype),
        grad_long=torch.zeros(2, C, dtype=dtype), grad_long_count=torch.zeros((), dtype=dtype),
    )


def _push(avg: Tensor, count: Tensor, value: Tensor) -> None:
    """avg <- the mean of the count + 1 values pushed since it was cleared."""
    avg.copy_((avg.double() * count.double() + value) / (count.double() + 1))
    count.add_(1)


def _long_or_short(long: Tensor, long_count: Tensor, short: Tensor) -> Tensor:
    """The long-term average, or, before the first weight update has set it,
    the short-term one in its place."""
    return long.double() if long_count.item() > 0 else short.double()


class _Streaming(torch.autograd.Function):
    """s (2, C) -> s_hat = a1 long + a2 short, after pushing s into the
    short-term history; backward pushes g = dL/ds_hat into the short-term
    gradient history and returns g_hat = b1 long_g + b2 short_g + b3 g as the
    gradient of s (the paper's streaming gradient, not the derivative)."""

    @staticmethod
    def forward(ctx, s, state, alpha, beta):
        _push(state["short_stats"], state["short_count"], s)
        ctx.state, ctx.beta = state, beta
        short = state["short_stats"].double()
        return alpha[0] * _long_or_short(state["long_stats"], state["long_count"], short) + alpha[1] * short

    @staticmethod
    def backward(ctx, g):
        state, beta = ctx.state, ctx.beta
        _push(state["grad_short"], state["grad_short_count"], g)
        short = state["grad_short"].double()
        long = _long_or_short(state["grad_long"], state["grad_long_count"], short)
        return beta[0] * long + beta[1] * short + beta[2] * g, None, None, None


def streaming_norm(
    x: Tensor,
    state: dict,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    alpha=(0.5, 0.5),
    beta=None,
    eps: float = 1e-5,
    training: bool = True,
) -> Tensor:
    """float64 Streaming Normalization of an ``(N, C, *)`` input.

    Training, per channel, with the batch statistics s = (mean, std), std =
    sqrt(biased variance + eps) over N and the positions: s is pushed into the
    short-term average ``short_stats`` (state, updated in place), and the
    input is normalized with s_hat = alpha[0] long + alpha[1] short (long: the
    long-term statistics, or the short-term ones before the first weight
    update)::

        y = (x - mean_hat) / std_hat * weight + bias

    The gradient dL/ds_hat of this batch is pushed into ``grad_short`` by the
    backward, and s receives, instead of its derivative, g_hat = beta[0]
    grad_long + beta[1] grad_short + beta[2] dL/ds_hat (beta None: (alpha[0],
    alpha[1], 0)), which autograd carries to x through mean and std. Eval
    normalizes with ``long_stats`` and changes nothing. alpha = (0, 1) with
    beta = (0, 0, 1), or with one weight update per batch, is training-mode
    BatchNorm.
    """
    beta = (alpha[0], alpha[1], 0.0) if beta is None else beta
    shape = [1, -1] + [1] * (x.dim() - 2)
    xd = x.double()
    if training:
        dims = [0] + list(range(2, x.dim()))
        mean = xd.mean(dims)
        std = torch.sqrt(((xd - mean.view(shape)) ** 2).mean(dims) + eps)
        s_hat = _Streaming.apply(torch.stack([mean, std]), state, alpha, beta)
    else:
        s_hat = state["long_stats"].double()
    y = (xd - s_hat[0].view(shape)) / s_hat[1].view(shape)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y


def streaming_norm_weight_update(state: dict, k1: float = 0.7, k3: Optional[float] = None) -> None:
    """At a weight update: long <- k1 long + (1 - k1) short (the first time:
    long <- short) and the short-term history is cleared; the same for the
    gradient histories with k3 (None: k1). A history with nothing pushed
    since the last update leaves its long-term average alone."""
    k3 = k1 if k3 is None else k3
    for short, count, long, long_count, k in (
            ("short_stats", "short_count", "long_stats", "long_count", k1),
            ("grad_short", "grad_short_count", "grad_long", "grad_long_count", k3)):
        if state[count].item() == 0:
            continue
        s = state[short].double()
        new = s if state[long_count].item() == 0 else k * state[long].double() + (1 - k) * s
        state[long].copy_(new)
        state[long_count].add_(1)
        state[short].zero_()
        state[count].zero_()


# ---------------------------------------------------------------------------
# Cosine Normalization (Luo et al. 2017, arXiv 1702.05870): out = (w . x + b)
# / (|w| |x|), norms with eps inside the square root and the bias as the
# weight of a constant input 1 (docs/cosine_norm.md). The compositions are
# the torch ops a user would write, in the inputs' dtype (the benchmarks'
# baseline); the references are the same in float64.
# ---------------------------------------------------------------------------

__all__ += ["cosine_linear", "cosine_conv2d", "cosine_linear_composition", "cosine_conv2d_composition"]


def _weight_norm(weight: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
    """|w_o| = sqrt(sum w_o^2 + b_o^2 + eps) per output unit (row of the weight)."""
    sq = weight.pow(2).flatten(1).sum(1)
    if bias is not None:
        sq = sq + bias.pow(2)
    return (sq + eps).sqrt()


def cosine_linear_composition(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                              eps: float = 1e-8) -> Tensor:
    """``linear(x, w, b) / (|x| |w|)`` by torch ops, in the inputs' dtype:
    |x| = sqrt(sum x^2 (+ 1 with a bias) + eps) per row."""
    x_sq = x.pow(2).sum(-1, keepdim=True)
    if bias is not None:
        x_sq = x_sq + 1
    return F.linear(x, weight, bias) / ((x_sq + eps).sqrt() * _weight_norm(weight, bias, eps))


def cosine_conv2d_composition(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                              dilation=1, groups: int = 1, eps: float = 1e-8) -> Tensor:
    """``conv2d(x, w, b) / (|patch| |w_o|)`` by torch ops, in the inputs'
    dtype: the squared patch norms by a convolution of x^2 with ones (one
    output per group, over the group's channels; + 1 with a bias, the
    constant input of every patch)."""
    dot = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    ones = x.new_ones(groups, x.shape[1] // groups, *weight.shape[2:])
    x_sq = F.conv2d(x * x, ones, None, stride, padding, dilation, groups)  # (N, groups, Ho, Wo)
    if bias is not None:
        x_sq = x_sq + 1
    n, out, h, w = dot.shape
    x_norm = (x_sq + eps).sqrt().unsqueeze(2)  # each group's norm over its out / groups channels
    w_norm = _weight_norm(weight, bias, eps).view(1, groups, out // groups, 1, 1)
    return (dot.view(n, groups, out // groups, h, w) / (x_norm * w_norm)).view(n, out, h, w)


def _double(*tensors):
    return [None if t is None else t.double() for t in tensors]


def cosine_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-8) -> Tensor:
    """float64 Cosine Normalization of a linear layer
    (:func:`cosine_linear_composition` in float64)."""
    return cosine_linear_composition(*_double(x, weight, bias), eps)


def cosine_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                  groups: int = 1, eps: float = 1e-8) -> Tensor:
    """float64 Cosine Normalization of a 2-d convolution
    (:func:`cosine_conv2d_composition` in float64)."""
    return cosine_conv2d_composition(*_double(x, weight, bias), stride, padding, dilation, groups, eps)
# Weight Normalization (Salimans and Kingma 2016, arXiv 1602.07868):
# w = g * v / ||v||, one norm per slice of v. See docs/weight_norm.md.
# ---------------------------------------------------------------------------

__all__ += ["weight_norm"]


def weight_norm(v: Tensor, g: Tensor, dim: Optional[int] = 0, eps: float = 1e-12) -> Tensor:
    """float64 ``w = g * v / max(||v||, eps)``; same arguments as
    :func:`torchnorm.functional.weight_norm`.

    One 2-norm per slice ``v.select(dim, s)`` (over every other dimension);
    ``dim=None``: one norm of the whole tensor. A negative ``dim`` counts from
    the end, as everywhere in torch (torchnorm.weight_norm's parametrization
    maps torch's ``dim=-1`` to None before it gets here). ``g`` holds one
    value per slice, in any shape of that many elements. Differentiable: the
    clamp's gradient is zero below eps, so a slice with ``||v|| < eps`` is
    ``g * v / eps``.
    """
    v = v.double()
    if dim is None:
        norm = torch.linalg.vector_norm(v)
    elif v.dim() == 1:  # each element is a slice (vector_norm would take dim=[] as every dim)
        norm = v.abs()
    else:
        d = dim % v.dim()
        norm = torch.linalg.vector_norm(v, dim=[k for k in range(v.dim()) if k != d], keepdim=True)
    return g.double().reshape(norm.shape) * v / norm.clamp_min(eps)
