"""Fake (meta) kernels: output shapes, dtypes and strides of every torchnorm op
without computing anything, for torch.compile, torch.export and FakeTensor."""
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
