"""Fake (meta) kernels: output shapes, dtypes and strides of every torchnorm op
without computing anything, for torch.compile, torch.export and FakeTensor."""
import functools

import torch


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_layout(x):
    # The kernels return outputs in the input's layout when it is contiguous or
    # channels-last; any other stride pattern is first made contiguous.
    perm = [0, *range(2, x.dim()), 1]
    if x.is_contiguous() or x.permute(perm).is_contiguous():
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_devices(op, input, **tensors):
    # The C++ kernels check this too, but a tensor on the meta device sends
    # the whole call here, so the fake kernel must refuse it the same way.
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != input.device:
            raise RuntimeError(f"{op}: expected {name} on {input.device} like the input, got it on {tensor.device}")


@torch.library.register_fake("torchnorm::batch_norm_train")
def _batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps, activation, negative_slope,
                      residual):
    _check_devices("torchnorm.batch_norm_train", input, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var, residual=residual)
    stats = input.new_empty((input.shape[1],), dtype=_accumulate_dtype(input.dtype))
    return _kernel_layout(input), stats, torch.empty_like(stats)


@torch.library.register_fake("torchnorm::batch_norm_eval")
def _batch_norm_eval(input, running_mean, running_var, weight, bias, eps, activation, negative_slope, residual):
    _check_devices("torchnorm.batch_norm_eval", input, running_mean=running_mean, running_var=running_var,
                   weight=weight, bias=bias, residual=residual)
    return _kernel_layout(input)


@torch.library.register_fake("torchnorm::batch_norm_apply")
def _batch_norm_apply(input, mean, rstd, weight, bias, activation, negative_slope, residual):
    _check_devices("torchnorm.batch_norm_apply", input, mean=mean, rstd=rstd, weight=weight, bias=bias,
                   residual=residual)
    return _kernel_layout(input)


@torch.library.register_fake("torchnorm::batch_norm_backward")
def _batch_norm_backward(grad_output, input, weight, bias, residual, mean, rstd, training, activation,
                         negative_slope, output_mask):
    _check_devices("torchnorm.batch_norm_backward", input, grad_output=grad_output, weight=weight, bias=bias,
                   residual=residual, mean=mean, rstd=rstd)
    param_dtype = weight.dtype if weight is not None else input.dtype
    bias_dtype = bias.dtype if bias is not None else param_dtype
    channels = input.shape[1]

    def per_channel(wanted, dtype):
        return input.new_empty((channels,) if wanted else (0,), dtype=dtype)

    def like_input(wanted):
        return _kernel_layout(input) if wanted else input.new_empty((0,))

    return (
        like_input(output_mask[0]),
        per_channel(output_mask[1], param_dtype),
        per_channel(output_mask[2], bias_dtype),
        like_input(output_mask[3]),
    )


def _row_stats(input, normalized_shape):
    # One value per row, shaped as aten.native_layer_norm shapes its statistics.
    k = len(normalized_shape)
    shape = tuple(input.shape[: input.dim() - k]) + (1,) * k
    return input.new_empty(shape, dtype=_accumulate_dtype(input.dtype))


def _contiguous_like(input):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("torchnorm::layer_norm")
def _layer_norm(input, normalized_shape, weight, bias, eps, residual):
    _check_devices("torchnorm.layer_norm", input, weight=weight, bias=bias, residual=residual)
    total = _contiguous_like(input) if residual is not None else input.new_empty((0,))
    return _contiguous_like(input), total, _row_stats(input, normalized_shape), _row_stats(input, normalized_shape)


@torch.library.register_fake("torchnorm::rms_norm")
def _rms_norm(input, normalized_shape, weight, eps, residual):
    _check_devices("torchnorm.rms_norm", input, weight=weight, residual=residual)
    total = _contiguous_like(input) if residual is not None else input.new_empty((0,))
    return _contiguous_like(input), total, _row_stats(input, normalized_shape)


@torch.library.register_fake("torchnorm::layer_norm_backward")
def _layer_norm_backward(grad_output, grad_sum, input, normalized_shape, mean, rstd, weight, output_mask):
    _check_devices("torchnorm.layer_norm_backward", input, grad_output=grad_output, grad_sum=grad_sum, mean=mean,
                   rstd=rstd, weight=weight)
    param_dtype = weight.dtype if weight is not None else input.dtype

    def param(wanted):
        return input.new_empty(tuple(normalized_shape) if wanted else (0,), dtype=param_dtype)

    grad_input = _contiguous_like(input) if output_mask[0] else input.new_empty((0,))
    return grad_input, param(output_mask[1]), param(output_mask[2])


def _group_stats(input, groups):
    return input.new_empty((input.shape[0], groups), dtype=_accumulate_dtype(input.dtype))


@torch.library.register_fake("torchnorm::group_norm")
def _group_norm(input, num_groups, weight, bias, eps, activation, negative_slope):
    _check_devices("torchnorm.group_norm", input, weight=weight, bias=bias)
    return _kernel_layout(input), _group_stats(input, num_groups), _group_stats(input, num_groups)


@torch.library.register_fake("torchnorm::group_norm_backward")
def _group_norm_backward(grad_output, input, num_groups, mean, rstd, weight, bias, activation, negative_slope,
                         output_mask):
    _check_devices("torchnorm.group_norm_backward", input, grad_output=grad_output, mean=mean, rstd=rstd,
                   weight=weight, bias=bias)
    param_dtype = weight.dtype if weight is not None else input.dtype
    bias_dtype = bias.dtype if bias is not None else param_dtype
    channels = input.shape[1]
    grad_input = _kernel_layout(input) if output_mask[0] else input.new_empty((0,))
    return (
        grad_input,
        input.new_empty((channels,) if output_mask[1] else (0,), dtype=param_dtype),
        input.new_empty((channels,) if output_mask[2] else (0,), dtype=bias_dtype),
    )


@torch.library.register_fake("torchnorm::instance_norm")
def _instance_norm(input, weight, bias, running_mean, running_var, momentum, eps):
    _check_devices("torchnorm.instance_norm", input, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var)
    return _kernel_layout(input), _group_stats(input, input.shape[1]), _group_stats(input, input.shape[1])


def _wanted_or_empty(wanted, grad, like):
    # A backward op's output: the gradient, or an empty (0,) placeholder
    # (csrc/conv_bn.cpp's empty_unless).
    return grad if wanted else like.new_empty((0,))


def _conv_out_channels(weight, groups, transposed):
    # A transposed conv's weight is (in_channels, out_channels / groups, *k).
    return weight.shape[1] * groups if transposed else weight.shape[0]


def _check_conv(op, input, weight, groups, transposed, output_padding):
    """The checks of csrc/conv_bn.cpp (conv_args) that aten::convolution's own
    fake does not make, so that a compiled call fails as an eager one does.
    Returns the output channels and the output padding (zeros for none)."""
    spatial = input.dim() - 2
    if output_padding and len(output_padding) != spatial:
        raise ValueError(f"{op}: output_padding needs one entry per spatial dimension ({spatial}) or none")
    if not transposed and any(output_padding):
        raise ValueError(f"{op}: output_padding applies to transposed convolutions only")
    channels = _conv_out_channels(weight, groups, transposed)
    return channels, list(output_padding) or [0] * spatial


def _check_conv_bn_frozen(input, weight, running_mean, running_var, groups, transposed, output_padding):
    """_check_conv, and the running statistics' shapes (frozen_conv_args)."""
    op = "torchnorm.conv_bn_frozen"
    channels, output_padding = _check_conv(op, input, weight, groups, transposed, output_padding)
    for stats in (running_mean, running_var):
        if stats.dim() != 1 or stats.shape[0] != channels:
            raise ValueError(f"{op}: running statistics must have one entry per output channel ({channels}), "
                             f"got shape {list(stats.shape)}")
    return channels, output_padding


@torch.library.register_fake("torchnorm::conv_bn_frozen")
def _conv_bn_frozen(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
                    dilation, groups, transposed=False, output_padding=()):
    _check_devices("torchnorm.conv_bn_frozen", input, weight=weight, conv_bias=conv_bias, bn_weight=bn_weight,
                   bn_bias=bn_bias, running_mean=running_mean, running_var=running_var)
    _, output_padding = _check_conv_bn_frozen(input, weight, running_mean, running_var, groups, transposed,
                                              output_padding)
    # The output is the convolution's, with its shape, dtype and layout.
    return torch.ops.aten.convolution.default(input, weight, None, stride, padding, dilation, transposed,
                                              output_padding, groups)


@torch.library.register_fake("torchnorm::conv_bn_frozen_backward")
def _conv_bn_frozen_backward(grad_output, input, weight, conv_bias, bn_weight, running_mean, running_var, eps,
                             stride, padding, dilation, groups, transposed, output_padding, output_mask):
    _check_devices("torchnorm.conv_bn_frozen_backward", input, grad_output=grad_output, weight=weight,
                   conv_bias=conv_bias, bn_weight=bn_weight, running_mean=running_mean, running_var=running_var)
    channels, output_padding = _check_conv_bn_frozen(input, weight, running_mean, running_var, groups, transposed,
                                                     output_padding)
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward.default(
        grad_output, input, weight, None, stride, padding, dilation, transposed, output_padding, groups,
        [output_mask[0], output_mask[1], False])
    bn_dtype = bn_weight.dtype if bn_weight is not None else weight.dtype
    bias_dtype = conv_bias.dtype if conv_bias is not None else weight.dtype

    def per_channel(wanted, dtype):
        return weight.new_empty((channels,) if wanted else (0,), dtype=dtype)

    return (_wanted_or_empty(output_mask[0], grad_input, input), _wanted_or_empty(output_mask[1], grad_weight, weight),
            per_channel(output_mask[2], bias_dtype), per_channel(output_mask[3], bn_dtype),
            per_channel(output_mask[4], bn_dtype))


@torch.library.register_fake("torchnorm::conv_bn_train")
def _conv_bn_train(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, activation,
                   negative_slope, residual, stride, padding, dilation, groups, transposed=False, output_padding=()):
    _check_devices("torchnorm.conv_bn_train", input, weight=weight, conv_bias=conv_bias)
    _, output_padding = _check_conv("torchnorm.conv_bn_train", input, weight, groups, transposed, output_padding)
    conv_output = torch.ops.aten.convolution.default(input, weight, conv_bias, stride, padding, dilation, transposed,
                                                     output_padding, groups)
    return _batch_norm_train(conv_output, bn_weight, bn_bias, running_mean, running_var, momentum, eps, activation,
                             negative_slope, residual)


@torch.library.register_fake("torchnorm::conv_bn_train_backward")
def _conv_bn_train_backward(grad_output, input, weight, conv_bias, bn_weight, bn_bias, residual, mean, rstd,
                            activation, negative_slope, stride, padding, dilation, groups, transposed, output_padding,
                            output_mask):
    op = "torchnorm.conv_bn_train_backward"
    _check_devices(op, input, grad_output=grad_output, weight=weight, conv_bias=conv_bias)
    _, output_padding = _check_conv(op, input, weight, groups, transposed, output_padding)
    conv_output = torch.ops.aten.convolution.default(input, weight, conv_bias, stride, padding, dilation, transposed,
                                                     output_padding, groups)
    _, grad_bn_weight, grad_bn_bias, grad_residual = _batch_norm_backward(
        grad_output, conv_output, bn_weight, bn_bias, residual, mean, rstd, True, activation, negative_slope,
        [False, output_mask[3], output_mask[4], output_mask[5]])
    grad_input, grad_weight, grad_conv_bias = torch.ops.aten.convolution_backward.default(
        conv_output, input, weight, None if conv_bias is None else list(conv_bias.shape), stride, padding, dilation,
        transposed, output_padding, groups, [output_mask[0], output_mask[1], output_mask[2]])
    return (_wanted_or_empty(output_mask[0], grad_input, input), _wanted_or_empty(output_mask[1], grad_weight, weight),
            _wanted_or_empty(output_mask[2], grad_conv_bias, conv_bias if conv_bias is not None else weight),
            grad_bn_weight, grad_bn_bias, grad_residual)


# conv_bn_frozen's internal per-channel ops (csrc/registration.cpp; their
# checks are csrc/common/conv_bn_channels.cpp's).


def _check_channel_vectors(op, channels, device, **vectors):
    """prepare_channel_vectors' checks; returns the outputs' dtype, the
    vectors' promoted dtype."""
    given = {name: t for name, t in vectors.items() if t is not None}
    for name, t in given.items():
        if t.dim() != 1 or t.shape[0] != channels:
            raise RuntimeError(f"{op}: expected {name} to have one entry per channel ({channels}), "
                               f"got shape {list(t.shape)}")
        if t.device != device:
            raise RuntimeError(f"{op}: expected {name} on {device}, got it on {t.device}")
        if not t.dtype.is_floating_point:
            raise RuntimeError(f"{op}: expected a floating-point {name}, got {t.dtype}")
    return functools.reduce(torch.promote_types, (t.dtype for t in given.values()))


def _check_weight_channels(op, weight, scale, groups, transposed):
    """check_weight_channels: the weight's and the scale's checks; returns
    the output channels."""
    if weight.dim() < 2:
        raise RuntimeError(f"{op}: expected a weight of 2 or more dimensions, got {weight.dim()}")
    if groups < 1 or weight.shape[0] % groups != 0:
        raise RuntimeError(f"{op}: groups ({groups}) must be positive and divide the weight's first dimension "
                           f"({weight.shape[0]})")
    channels = _conv_out_channels(weight, groups, transposed)
    if scale is not None:
        if scale.dim() != 1 or scale.shape[0] != channels:
            raise RuntimeError(f"{op}: expected scale to have one entry per output channel ({channels}), "
                               f"got shape {list(scale.shape)}")
        if scale.device != weight.device:
            raise RuntimeError(f"{op}: expected scale on {weight.device} like the weight, got it on {scale.device}")
    return channels


@torch.library.register_fake("torchnorm::_frozen_bn_affine")
def _frozen_bn_affine(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    channels = running_mean.numel()
    dtype = _check_channel_vectors("torchnorm._frozen_bn_affine", channels, running_mean.device,
                                   conv_bias=conv_bias, bn_weight=bn_weight, bn_bias=bn_bias,
                                   running_mean=running_mean, running_var=running_var)
    return tuple(running_mean.new_empty((channels,), dtype=dtype) for _ in range(3))


@torch.library.register_fake("torchnorm::_frozen_bn_parameter_grads")
def _frozen_bn_parameter_grads(grad_shift, grad_scale, scale, inv_std, conv_bias, running_mean, output_mask):
    op = "torchnorm._frozen_bn_parameter_grads"
    if output_mask[1] and grad_scale is None:
        raise RuntimeError(f"{op}: grad_scale is needed for the BN weight's gradient (output_mask[1])")
    channels = running_mean.numel()
    dtype = _check_channel_vectors(op, channels, running_mean.device, grad_shift=grad_shift, grad_scale=grad_scale,
                                   scale=scale, inv_std=inv_std, conv_bias=conv_bias, running_mean=running_mean)
    return tuple(running_mean.new_empty((channels if wanted else 0,), dtype=dtype) for wanted in output_mask)


@torch.library.register_fake("torchnorm::_conv_weight_channel_dot")
def _conv_weight_channel_dot(grad_weight, weight, scale, groups, transposed):
    op = "torchnorm._conv_weight_channel_dot"
    channels = _check_weight_channels(op, weight, scale, groups, transposed)
    if grad_weight.shape != weight.shape:
        raise RuntimeError(f"{op}: expected grad_weight of the weight's shape {list(weight.shape)}, "
                           f"got {list(grad_weight.shape)}")
    if grad_weight.device != weight.device:
        raise RuntimeError(f"{op}: expected grad_weight on {weight.device} like the weight, "
                           f"got it on {grad_weight.device}")
    return weight.new_empty((channels,), dtype=torch.promote_types(grad_weight.dtype, weight.dtype))


@torch.library.register_fake("torchnorm::_conv_weight_channel_scale")
def _conv_weight_channel_scale(weight, scale, groups, transposed):
    _check_weight_channels("torchnorm._conv_weight_channel_scale", weight, scale, groups, transposed)
    return torch.empty_like(weight, dtype=torch.promote_types(weight.dtype, scale.dtype))


# Sequence norms.

@torch.library.register_fake("torchnorm::masked_batch_norm")
def _masked_batch_norm(input, valid, weight, bias, running_mean, running_var, step, training, momentum, eps):
    _check_devices("torchnorm.masked_batch_norm", input, valid=valid, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var)
    if input.dim() != 2:
        raise RuntimeError(f"torchnorm.masked_batch_norm: expected a 2-d (rows, features) input, got shape "
                           f"{list(input.shape)}")
    stats = input.new_empty((input.shape[1],), dtype=_accumulate_dtype(input.dtype))
    return _contiguous_like(input), stats, torch.empty_like(stats)


@torch.library.register_fake("torchnorm::masked_batch_norm_backward")
def _masked_batch_norm_backward(grad_output, input, valid, weight, mean, rstd, training, output_mask):
    _check_devices("torchnorm.masked_batch_norm_backward", input, grad_output=grad_output, valid=valid,
                   weight=weight, mean=mean, rstd=rstd)
    param_dtype = weight.dtype if weight is not None else input.dtype
    features = input.shape[1]
    grad_input = _contiguous_like(input) if output_mask[0] else input.new_empty((0,))
    return (grad_input, *(input.new_empty((features if wanted else 0,), dtype=param_dtype)
                          for wanted in output_mask[1:]))


@torch.library.register_fake("torchnorm::bn_lstm_layer")
def _bn_lstm_layer(input_gates, hx, cx, weight_hh, bias, bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias,
                   running_mean_ih, running_var_ih, running_mean_hh, running_var_hh, running_mean_c, running_var_c,
                   lengths, first_step, training, momentum, eps):
    _check_devices("torchnorm.bn_lstm_layer", input_gates, hx=hx, cx=cx, weight_hh=weight_hh, bias=bias,
                   bn_ih_weight=bn_ih_weight, bn_hh_weight=bn_hh_weight, bn_c_weight=bn_c_weight,
                   bn_c_bias=bn_c_bias)
    if input_gates.dim() != 3 or weight_hh.dim() != 2 or input_gates.shape[2] != 4 * weight_hh.shape[1]:
        raise RuntimeError(f"torchnorm.bn_lstm_layer: expected input_gates (steps, batch, 4 * hidden_size) and "
                           f"weight_hh (4 * hidden_size, hidden_size), got {list(input_gates.shape)} and "
                           f"{list(weight_hh.shape)}")
    T, N, G = input_gates.shape
    H = G // 4
    steps = input_gates.new_empty((T, N, H))
    state = input_gates.new_empty((N, H))
    stats = input_gates.new_empty((T, 2, 9 * H), dtype=_accumulate_dtype(input_gates.dtype))
    return steps, state, torch.empty_like(state), input_gates.new_empty((T, N, G)), torch.empty_like(steps), stats


@torch.library.register_fake("torchnorm::bn_lstm_layer_backward")
def _bn_lstm_layer_backward(grad_output, grad_hy, grad_cy, input_gates, hx, cx, weight_hh, bias, bn_ih_weight,
                            bn_hh_weight, bn_c_weight, bn_c_bias, output, hidden_gates, cells, stats, lengths,
                            training):
    _check_devices("torchnorm.bn_lstm_layer_backward", input_gates, grad_output=grad_output, grad_hy=grad_hy,
                   grad_cy=grad_cy, hx=hx, cx=cx, weight_hh=weight_hh, bias=bias, output=output,
                   hidden_gates=hidden_gates, cells=cells, stats=stats)
    grad_bias = torch.empty_like(bias) if bias is not None else input_gates.new_empty((0,))
    return (_contiguous_like(input_gates), torch.empty_like(hx), torch.empty_like(cx), torch.empty_like(weight_hh),
            grad_bias, torch.empty_like(bn_ih_weight), torch.empty_like(bn_hh_weight), torch.empty_like(bn_c_weight),
            torch.empty_like(bn_c_bias))


@torch.library.register_fake("torchnorm::_bn_lstm_step")
def _bn_lstm_step(input_gates, hidden_gates, cx, bias, bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias,
                  running_mean_ih, running_var_ih, running_mean_hh, running_var_hh, running_mean_c, running_var_c,
                  step, valid, training, momentum, eps, hy, cy, stats):
    _check_devices("torchnorm._bn_lstm_step", input_gates, hidden_gates=hidden_gates, cx=cx, hy=hy, cy=cy,
                   stats=stats)


@torch.library.register_fake("torchnorm::_bn_lstm_step_backward")
def _bn_lstm_step_backward(grad_hy, grad_cy, input_gates, hidden_gates, cx, cy, bias, bn_ih_weight, bn_hh_weight,
                           bn_c_weight, bn_c_bias, stats, valid, training, grad_input_gates, grad_hidden_gates,
                           grad_cx, grad_params):
    _check_devices("torchnorm._bn_lstm_step_backward", input_gates, grad_hy=grad_hy, grad_cy=grad_cy,
                   grad_input_gates=grad_input_gates, grad_hidden_gates=grad_hidden_gates, grad_cx=grad_cx,
                   grad_params=grad_params)


# Online Normalization.

@torch.library.register_fake("torchnorm::online_norm")
def _online_norm(input, weight, bias, mu, var, u, v, alpha_fwd, alpha_bkw, eps, layer_scale=False):
    _check_devices("torchnorm.online_norm", input, weight=weight, bias=bias, mu=mu, var=var, u=u, v=v)
    if input.dim() < 2:
        raise RuntimeError(f"torchnorm.online_norm: expected an (N, C, *) input, got shape {list(input.shape)}")
    stats = input.new_empty(input.shape[:2], dtype=_accumulate_dtype(input.dtype))
    layer_rstd = stats.new_empty((input.shape[0] if layer_scale else 0,))
    return _contiguous_like(input), stats, torch.empty_like(stats), layer_rstd


@torch.library.register_fake("torchnorm::online_norm_backward")
def _online_norm_backward(grad_output, input, weight, mean, rstd, u, v, alpha_bkw, output_mask, bias=None,
                          layer_rstd=None):
    _check_devices("torchnorm.online_norm_backward", input, grad_output=grad_output, weight=weight, mean=mean,
                   rstd=rstd, u=u, v=v, bias=bias, layer_rstd=layer_rstd)
    param_dtype = weight.dtype if weight is not None else input.dtype
    grad_input = _contiguous_like(input) if output_mask[0] else input.new_empty((0,))
    return (grad_input, *(input.new_empty((input.shape[1] if wanted else 0,), dtype=param_dtype)
                          for wanted in output_mask[1:]))


# SyncBatchNorm's per-rank ops.

@torch.library.register_fake("torchnorm::batch_norm_stats")
def _batch_norm_stats(input, weight=None, bias=None, running_mean=None, running_var=None, residual=None):
    _check_devices("torchnorm.batch_norm_stats", input, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var, residual=residual)
    if input.dim() < 2:
        raise RuntimeError(f"torchnorm.batch_norm_stats: expected an (N, C, *) input, got shape {list(input.shape)}")
    return input.new_empty((3, input.shape[1]), dtype=torch.float64)


@torch.library.register_fake("torchnorm::batch_norm_gather_stats")
def _batch_norm_gather_stats(stats, running_mean, running_var, momentum, eps):
    _check_devices("torchnorm.batch_norm_gather_stats", stats, running_mean=running_mean, running_var=running_var)
    if stats.dim() != 3 or stats.shape[1] != 3:
        raise RuntimeError(f"torchnorm.batch_norm_gather_stats: expected stats of shape (W, 3, C), got shape "
                           f"{list(stats.shape)}")
    mean = stats.new_empty((stats.shape[2],))
    return mean, torch.empty_like(mean), torch.empty_like(mean)


@torch.library.register_fake("torchnorm::batch_norm_backward_elemt")
def _batch_norm_backward_elemt(grad_output, input, weight, bias, residual, mean, rstd, mean_dz, mean_dz_xhat,
                               activation, negative_slope, output_mask):
    _check_devices("torchnorm.batch_norm_backward_elemt", input, grad_output=grad_output, weight=weight, bias=bias,
                   residual=residual, mean=mean, rstd=rstd, mean_dz=mean_dz, mean_dz_xhat=mean_dz_xhat)
    return tuple(_kernel_layout(input) if wanted else input.new_empty((0,)) for wanted in output_mask)
# Cosine Normalization.

def _cosine_outputs(input, out_shape, rx_shape, out_features):
    """(output, input_rnorm, weight_rnorm) as the kernels return them: contiguous, the norms in the accumulation
    dtype."""
    acc = _accumulate_dtype(input.dtype)
    return (input.new_empty(out_shape), input.new_empty(rx_shape, dtype=acc),
            input.new_empty((out_features,), dtype=acc))


def _cosine_grads(input, weight, bias, output_mask):
    """(grad_input, grad_weight, grad_bias): contiguous, empty (0,) where not wanted (grad_bias without a bias)."""
    return (_contiguous_like(input) if output_mask[0] else input.new_empty((0,)),
            _contiguous_like(weight) if output_mask[1] else input.new_empty((0,)),
            input.new_empty((weight.shape[0],)) if output_mask[2] and bias is not None else input.new_empty((0,)))


def _cosine_linear_shapes(op, input, weight):
    if weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"{op}: expected an input (*, in_features) and a weight (out_features, in_features), "
                           f"got {list(input.shape)} and {list(weight.shape)}")
    return (*input.shape[:-1], weight.shape[0]), input.shape[:-1]


def _cosine_conv2d_shapes(op, input, weight, stride, padding, dilation, groups):
    if input.dim() != 4 or weight.dim() != 4 or groups < 1 or input.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(f"{op}: expected an (N, C, H, W) input and an (O, C / groups, kh, kw) weight, got "
                           f"{list(input.shape)} and {list(weight.shape)} with groups={groups}")
    out_hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1
              for size, k, s, p, d in zip(input.shape[2:], weight.shape[2:], stride, padding, dilation)]
    if min(out_hw) < 1:
        raise RuntimeError(f"{op}: the input {list(input.shape)} is smaller than the dilated kernel")
    n = input.shape[0]
    return (n, weight.shape[0], *out_hw), (n, groups, *out_hw)


@torch.library.register_fake("torchnorm::cosine_linear")
def _cosine_linear(input, weight, bias, eps):
    _check_devices("torchnorm.cosine_linear", input, weight=weight, bias=bias)
    out_shape, rx_shape = _cosine_linear_shapes("torchnorm.cosine_linear", input, weight)
    return _cosine_outputs(input, out_shape, rx_shape, weight.shape[0])


@torch.library.register_fake("torchnorm::cosine_linear_backward")
def _cosine_linear_backward(grad_output, input, weight, bias, output, input_rnorm, weight_rnorm, output_mask):
    _check_devices("torchnorm.cosine_linear_backward", input, grad_output=grad_output, weight=weight, bias=bias,
                   output=output, input_rnorm=input_rnorm, weight_rnorm=weight_rnorm)
    _cosine_linear_shapes("torchnorm.cosine_linear_backward", input, weight)
    return _cosine_grads(input, weight, bias, output_mask)


@torch.library.register_fake("torchnorm::cosine_conv2d")
def _cosine_conv2d(input, weight, bias, stride, padding, dilation, groups, eps):
    _check_devices("torchnorm.cosine_conv2d", input, weight=weight, bias=bias)
    out_shape, rx_shape = _cosine_conv2d_shapes("torchnorm.cosine_conv2d", input, weight, stride, padding, dilation,
                                                groups)
    return _cosine_outputs(input, out_shape, rx_shape, weight.shape[0])


@torch.library.register_fake("torchnorm::cosine_conv2d_backward")
def _cosine_conv2d_backward(grad_output, input, weight, bias, output, input_rnorm, weight_rnorm, stride, padding,
                            dilation, groups, output_mask):
    _check_devices("torchnorm.cosine_conv2d_backward", input, grad_output=grad_output, weight=weight, bias=bias,
                   output=output, input_rnorm=input_rnorm, weight_rnorm=weight_rnorm)
    _cosine_conv2d_shapes("torchnorm.cosine_conv2d_backward", input, weight, stride, padding, dilation, groups)
    return _cosine_grads(input, weight, bias, output_mask)
@torch.library.register_fake("torchnorm::streaming_norm")
def _streaming_norm(input, weight, bias, short_stats, short_count, long_stats, long_count, grad_short,
                    grad_short_count, grad_long, grad_long_count, alpha_long, alpha_short, beta_long, beta_short,
                    beta_current, eps):
    _check_devices("torchnorm.streaming_norm", input, weight=weight, bias=bias, short_stats=short_stats,
                   short_count=short_count, long_stats=long_stats, long_count=long_count, grad_short=grad_short,
                   grad_short_count=grad_short_count, grad_long=grad_long, grad_long_count=grad_long_count)
    stats = input.new_empty((input.shape[1],), dtype=_accumulate_dtype(input.dtype))
    return _kernel_layout(input), stats, torch.empty_like(stats), torch.empty_like(stats), torch.empty_like(stats)


@torch.library.register_fake("torchnorm::streaming_norm_backward")
def _streaming_norm_backward(grad_output, input, weight, mean, rstd, mean_hat, rstd_hat, grad_short, grad_short_count,
                             grad_long, grad_long_count, beta_long, beta_short, beta_current, output_mask):
    _check_devices("torchnorm.streaming_norm_backward", input, grad_output=grad_output, weight=weight, mean=mean,
                   rstd=rstd, mean_hat=mean_hat, rstd_hat=rstd_hat, grad_short=grad_short,
                   grad_short_count=grad_short_count, grad_long=grad_long, grad_long_count=grad_long_count)
    param_dtype = weight.dtype if weight is not None else input.dtype
    grad_input = _kernel_layout(input) if output_mask[0] else input.new_empty((0,))
    return (grad_input, *(input.new_empty((input.shape[1] if wanted else 0,), dtype=param_dtype)
                          for wanted in output_mask[1:]))
# ---------------------------------------------------------------------------
# Weight Normalization
# ---------------------------------------------------------------------------


def _weight_norm_slices(op, v, dim):
    # The number of slices of v along dim (None: one), with the kernels'
    # range check (a meta v sends the whole call here).
    if dim is None:
        return 1
    if not -v.dim() <= dim < v.dim():
        raise RuntimeError(f"{op}: expected dim in [{-v.dim()}, {v.dim()}) for v of shape {list(v.shape)}, "
                           f"or None for the whole tensor, got {dim}")
    return v.shape[dim]


@torch.library.register_fake("torchnorm::weight_norm")
def _weight_norm(v, g, dim, eps):
    _check_devices("torchnorm.weight_norm", v, g=g)
    slices = _weight_norm_slices("torchnorm.weight_norm", v, dim)
    torch._check(g.numel() == slices, lambda: f"torchnorm.weight_norm: expected g to hold one value per slice "
                                              f"of v ({slices}), got shape {list(g.shape)}")
    return _contiguous_like(v), g.new_empty(g.shape, dtype=_accumulate_dtype(v.dtype))


@torch.library.register_fake("torchnorm::weight_norm_backward")
def _weight_norm_backward(grad_w, v, g, norms, dim, eps, output_mask):
    _check_devices("torchnorm.weight_norm_backward", v, grad_w=grad_w, g=g, norms=norms)
    _weight_norm_slices("torchnorm.weight_norm_backward", v, dim)
    grad_v = _contiguous_like(v) if output_mask[0] else v.new_empty((0,))
    return grad_v, g.new_empty(g.shape if output_mask[1] else (0,))
