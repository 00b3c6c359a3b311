// Every torchnorm operator schema lives here, with what the op computes.
// Backends register kernels in csrc/cpu and csrc/cuda with TORCH_LIBRARY_IMPL;
// the Conv+BN composites are registered once for every backend
// (CompositeExplicitAutograd, csrc/conv_bn.cpp) and call the ops below them
// through the dispatcher. Autograd is registered in C++ (csrc/autograd/, one
// file per op family), fake kernels from Python (torchnorm/_fake.py). Each
// op's C++ signature, for C++ callers, is in csrc/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(torchnorm, m) {
  // Training-mode BatchNorm: normalizes with the batch statistics, returns
  // (output, batch mean, batch 1/sqrt(var + eps)) and updates the running
  // statistics in place when given: running = (1 - momentum) * running +
  // momentum * batch, with the unbiased batch variance.
  // output = act(BN(input) + residual); activation is 'none', 'relu',
  // 'leaky_relu' (with negative_slope) or 'silu'.
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, str activation, float negative_slope, "
      "Tensor? residual) -> (Tensor, Tensor, Tensor)");
  // Inference-mode BatchNorm from running statistics:
  // output = act((input - running_mean) / sqrt(running_var + eps) * weight + bias + residual).
  m.def(
      "batch_norm_eval(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
      "Tensor? bias, float eps, str activation, float negative_slope, Tensor? residual) -> Tensor");
  // BatchNorm with given statistics: output = act((input - mean) * rstd *
  // weight + bias + residual), by the same element-wise code as
  // batch_norm_train's output. With the mean and rstd batch_norm_train
  // returned it rebuilds that output bit for bit from its input, which is how
  // the memory-efficient Conv+BN blocks (torchnorm.nn.ConvBN*) avoid keeping
  // their outputs for backward. Not differentiable (it runs under no_grad).
  m.def(
      "batch_norm_apply(Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "str activation, float negative_slope, Tensor? residual) -> Tensor");
  // Gradients of either forward. mean and rstd are what batch_norm_train
  // returned (training=True) or running_mean and 1/sqrt(running_var + eps)
  // (training=False). Returns (grad_input, grad_weight, grad_bias,
  // grad_residual); an output whose output_mask entry is false is an empty
  // tensor of shape (0,).
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor mean, Tensor rstd, bool training, str activation, "
      "float negative_slope, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // Per-sample norms. Saved statistics are float32 (float64 for float64
  // input); an output that is not produced is an empty tensor of shape (0,).
  //
  // LayerNorm over the trailing normalized_shape of s = input + residual (or
  // of input): returns (out, s, mean, rstd), s only when a residual is given
  // (the pre-norm residual stream, written in the same pass). mean and rstd
  // are shaped input.shape[:-len(normalized_shape)] + (1,) * len(normalized_shape).
  m.def(
      "layer_norm(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps, "
      "Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor)");
  // RMSNorm: out = s / sqrt(mean(s^2) + eps) * weight; returns (out, s, rstd).
  // eps None is the machine epsilon of the computation type (float32 for
  // float32/float16/bfloat16 input, float64 for float64), as in torch.
  m.def(
      "rms_norm(Tensor input, int[] normalized_shape, Tensor? weight, float? eps, Tensor? residual) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients of layer_norm (mean given) or rms_norm (mean None). input is the
  // tensor that was normalized (s); grad_sum, the gradient reaching s
  // directly, is added to grad_input. Returns (grad_input, grad_weight, grad_bias).
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor? grad_sum, Tensor input, int[] normalized_shape, "
      "Tensor? mean, Tensor rstd, Tensor? weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // GroupNorm on (N, C, *), contiguous or channels-last:
  // out = act((x - mean) * rstd * weight + bias), statistics per (sample,
  // group), returned with shape (N, num_groups).
  m.def(
      "group_norm(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps, str activation, "
      "float negative_slope) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_backward(Tensor grad_output, Tensor input, int num_groups, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias, str activation, float negative_slope, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // InstanceNorm with the input's statistics (GroupNorm with one group per
  // channel); returns (out, mean, rstd), statistics of shape (N, C). Given
  // running statistics, updates them as torch.nn.functional.instance_norm
  // does, with the batch average of each instance's mean and unbiased variance.
  m.def(
      "instance_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)");

  // Convolution (zero padding; transposed where `transposed`, as
  // aten::convolution) followed by BatchNorm with frozen statistics: out =
  // conv(input, weight) * scale + shift per output channel, scale = bn_weight
  // / sqrt(running_var + eps), shift = (conv_bias - running_mean) * scale +
  // bn_bias. Differentiable in input, weight, conv_bias, bn_weight and
  // bn_bias; keeps no conv output for backward. An empty output_padding
  // means zeros.
  m.def(
      "conv_bn_frozen(Tensor input, Tensor weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor running_mean, Tensor running_var, float eps, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool transposed=False, int[] output_padding=[]) -> Tensor");
  // Gradients of conv_bn_frozen: (input, weight, conv_bias, bn_weight,
  // bn_bias); an output whose output_mask entry is false is an empty tensor
  // of shape (0,).
  m.def(
      "conv_bn_frozen_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? conv_bias, "
      "Tensor? bn_weight, Tensor running_mean, Tensor running_var, float eps, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool transposed, int[] output_padding, bool[5] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Convolution (as conv_bn_frozen's) followed by training-mode BatchNorm
  // (+ residual) (+ activation): batch_norm_train over the conv output, with
  // its outputs (output, batch mean, batch rstd) and its running-statistics
  // update. Its autograd keeps the conv input, not the conv output: backward
  // runs the convolution again.
  m.def(
      "conv_bn_train(Tensor input, Tensor weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, str activation, "
      "float negative_slope, Tensor? residual, int[] stride, int[] padding, int[] dilation, int groups, "
      "bool transposed=False, int[] output_padding=[]) -> (Tensor, Tensor, Tensor)");
  // Gradients of conv_bn_train from its inputs and the batch statistics it
  // returned: (input, weight, conv_bias, bn_weight, bn_bias, residual); an
  // output whose output_mask entry is false is an empty tensor of shape (0,).
  m.def(
      "conv_bn_train_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? conv_bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor? residual, Tensor mean, Tensor rstd, str activation, "
      "float negative_slope, int[] stride, int[] padding, int[] dilation, int groups, bool transposed, "
      "int[] output_padding, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Internal ops: the per-channel pieces of conv_bn_frozen and
  // conv_bn_frozen_backward, which call them through the dispatcher, and of
  // torchnorm.fx.fold_parameters, so that the fold's formula has one home.
  // Not API (hence the underscore) and not differentiable: their callers'
  // autograd covers them. The per-channel vectors of _frozen_bn_* may be of
  // any floating dtypes: the ops compute in float64 and return their outputs
  // in the vectors' promoted dtype (torch.result_type).
  //
  // A frozen BatchNorm after a conv as one affine map per channel (absent
  // conv_bias and bn_bias count as 0, an absent bn_weight as 1): returns
  // (scale, shift, inv_std), inv_std = 1 / sqrt(running_var + eps), scale =
  // bn_weight * inv_std, shift = (conv_bias - running_mean) * scale + bn_bias.
  m.def(
      "_frozen_bn_affine(Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> (Tensor, Tensor, Tensor)");
  // The gradients (conv_bias, bn_weight) of that map from the per-channel
  // sums grad_shift (of the output's gradient) and grad_scale (of the
  // gradient times the conv output; needed for bn_weight only), with scale
  // and inv_std from _frozen_bn_affine: grad_shift * scale and (grad_scale +
  // grad_shift * (conv_bias - running_mean)) * inv_std. An output whose
  // output_mask entry is false is an empty tensor of shape (0,).
  m.def(
      "_frozen_bn_parameter_grads(Tensor grad_shift, Tensor? grad_scale, Tensor scale, Tensor inv_std, "
      "Tensor? conv_bias, Tensor running_mean, bool[2] output_mask) -> (Tensor, Tensor)");
  // Per output channel of a conv weight w (transposed: a ConvTranspose's
  // (in, out / groups, *k) weight), the sum of grad_weight * w over the
  // channel's entries, in their promoted dtype; then, when scale is given,
  // grad_weight *= scale per output channel, in place.
  m.def(
      "_conv_weight_channel_dot(Tensor(a!) grad_weight, Tensor weight, Tensor? scale, int groups, "
      "bool transposed) -> Tensor");
  // weight * scale per output channel (the folded weight), in their promoted
  // dtype and the weight's layout; weight as _conv_weight_channel_dot's, or
  // a Linear's. One kernel for every backend (CompositeExplicitAutograd).
  m.def("_conv_weight_channel_scale(Tensor weight, Tensor scale, int groups, bool transposed) -> Tensor");
}

// torchnorm._C is imported only for its side effect of running the
// registrations above; it exposes no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
