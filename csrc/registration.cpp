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
  // The tag of the Conv+BN blocks' ops, whose kernels read planar and
  // channels-last (N, C, *) tensors alike: without it, inductor copies its
  // channels-last conv outputs to the strides the op saw at trace time.
  const std::vector<at::Tag> kAnyLayout = {at::Tag::flexible_layout};
  // Training-mode BatchNorm: normalizes with the batch statistics, returns
  // (output, batch mean, batch 1/sqrt(var + eps)) and updates the running
  // statistics in place when given: running = (1 - momentum) * running +
  // momentum * batch, with the unbiased batch variance.
  // output = act(BN(input) + residual); activation is 'none', 'relu',
  // 'leaky_relu' (with negative_slope) or 'silu'.
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, str activation, float negative_slope, "
      "Tensor? residual) -> (Tensor, Tensor, Tensor)",
      kAnyLayout);
  // Inference-mode BatchNorm from running statistics:
  // output = act((input - running_mean) / sqrt(running_var + eps) * weight + bias + residual).
  m.def(
      "batch_norm_eval(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
      "Tensor? bias, float eps, str activation, float negative_slope, Tensor? residual) -> Tensor",
      kAnyLayout);
  // BatchNorm with given statistics: output = act((input - mean) * rstd *
  // weight + bias + residual), by the same element-wise code as
  // batch_norm_train's output. With the mean and rstd batch_norm_train
  // returned it rebuilds that output bit for bit from its input, which is how
  // the memory-efficient Conv+BN blocks (torchnorm.nn.ConvBN*) avoid keeping
  // their outputs for backward. Not differentiable (it runs under no_grad).
  m.def(
      "batch_norm_apply(Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "str activation, float negative_slope, Tensor? residual) -> Tensor",
      kAnyLayout);
  // Gradients of either forward. mean and rstd are what batch_norm_train
  // returned (training=True) or running_mean and 1/sqrt(running_var + eps)
  // (training=False). Returns (grad_input, grad_weight, grad_bias,
  // grad_residual); an output whose output_mask entry is false is an empty
  // tensor of shape (0,).
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor mean, Tensor rstd, bool training, str activation, "
      "float negative_slope, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
      kAnyLayout);

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
      "int groups, bool transposed=False, int[] output_padding=[]) -> Tensor",
      kAnyLayout);
  // Gradients of conv_bn_frozen: (input, weight, conv_bias, bn_weight,
  // bn_bias); an output whose output_mask entry is false is an empty tensor
  // of shape (0,).
  m.def(
      "conv_bn_frozen_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? conv_bias, "
      "Tensor? bn_weight, Tensor running_mean, Tensor running_var, float eps, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool transposed, int[] output_padding, bool[5] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)",
      kAnyLayout);
  // Convolution (as conv_bn_frozen's) followed by training-mode BatchNorm
  // (+ residual) (+ activation): batch_norm_train over the conv output, with
  // its outputs (output, batch mean, batch rstd) and its running-statistics
  // update. Its autograd keeps the conv input, not the conv output: backward
  // runs the convolution again.
  m.def(
      "conv_bn_train(Tensor input, Tensor weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, str activation, "
      "float negative_slope, Tensor? residual, int[] stride, int[] padding, int[] dilation, int groups, "
      "bool transposed=False, int[] output_padding=[]) -> (Tensor, Tensor, Tensor)",
      kAnyLayout);
  // Gradients of conv_bn_train from its inputs and the batch statistics it
  // returned: (input, weight, conv_bias, bn_weight, bn_bias, residual); an
  // output whose output_mask entry is false is an empty tensor of shape (0,).
  m.def(
      "conv_bn_train_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? conv_bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor? residual, Tensor mean, Tensor rstd, str activation, "
      "float negative_slope, int[] stride, int[] padding, int[] dilation, int groups, bool transposed, "
      "int[] output_padding, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      kAnyLayout);

  // Sequence norms (docs/sequence_norms.md). Statistics are float32 (float64
  // for float64 input); an output that is not produced is an empty tensor of
  // shape (0,).
  //
  // BatchNorm of the rows of a 2-d (R, C) input where the bool (R,) `valid`
  // is true (None: every row); the other rows take no part in the statistics
  // and their output is 0. Training normalizes with the valid rows' mean and
  // biased variance and updates the running statistics in place (as
  // batch_norm_train: unbiased variance; one valid row updates them with its
  // variance 0, no valid row leaves them alone). Evaluation normalizes with
  // the running statistics. Running statistics are (C,), or (L, C) per time
  // step, of which row min(step, L - 1) is used (recurrent BatchNorm: a step
  // at or beyond L uses the last row). Returns (output, mean, rstd), the
  // statistics that normalized (the running ones in evaluation).
  m.def(
      "masked_batch_norm(Tensor input, Tensor? valid, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, int step, bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // Gradients of masked_batch_norm from the mean and rstd it returned:
  // (grad_input, grad_weight, grad_bias); invalid rows get grad_input 0.
  m.def(
      "masked_batch_norm_backward(Tensor grad_output, Tensor input, Tensor? valid, Tensor? weight, Tensor mean, "
      "Tensor rstd, bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // One layer of BN-LSTM (Cooijmans et al. 2016) over T steps from the input
  // projection input_gates = x @ weight_ih.T, (T, N, 4H), with per-step
  // BatchNorms (statistics over the batch, shared scales):
  //   gates = BN_ih(input_gates[t]) + BN_hh(h @ weight_hh.T) + bias
  //   c = sigmoid(f) * c + sigmoid(i) * tanh(g);  h = sigmoid(o) * tanh(BN_c(c))
  // (gate order i, f, g, o; the gate BNs have no shift). Step t uses row
  // first_step + t of the (L, F) running statistics, clamped to L - 1, as
  // masked_batch_norm. lengths (N,) int64, any order (None: all T): a
  // sequence that has ended is masked out of every later step (output 0, no
  // part in statistics, state kept). Returns (output (T, N, H), h_n, c_n,
  // hidden_gates (T, N, 4H), cells (T, N, H), stats (T, 2, 9H)): h_n and c_n
  // are each sequence's state at its last valid step; the last three are what
  // the backward needs (hidden_gates = h_{t-1} @ weight_hh.T, cells = c_t
  // carried past a sequence's end, stats = per step [mean; rstd] of
  // [ih (4H) | hh (4H) | c (H)]).
  m.def(
      "bn_lstm_layer(Tensor input_gates, Tensor hx, Tensor cx, Tensor weight_hh, Tensor? bias, "
      "Tensor bn_ih_weight, Tensor bn_hh_weight, Tensor bn_c_weight, Tensor bn_c_bias, "
      "Tensor(a!)? running_mean_ih, Tensor(b!)? running_var_ih, Tensor(c!)? running_mean_hh, "
      "Tensor(d!)? running_var_hh, Tensor(e!)? running_mean_c, Tensor(f!)? running_var_c, Tensor? lengths, "
      "int first_step, bool training, float momentum, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of bn_lstm_layer from what it returned: (input_gates, hx, cx,
  // weight_hh, bias, bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias);
  // grad_bias is empty (0,) without a bias. Absent incoming gradients are 0.
  m.def(
      "bn_lstm_layer_backward(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input_gates, "
      "Tensor hx, Tensor cx, Tensor weight_hh, Tensor? bias, Tensor bn_ih_weight, Tensor bn_hh_weight, "
      "Tensor bn_c_weight, Tensor bn_c_bias, Tensor output, Tensor hidden_gates, Tensor cells, Tensor stats, "
      "Tensor? lengths, bool training) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Online Normalization (Chiley et al. 2019), training, of an (N, C, *)
  // input: per channel, samples in order, each normalized with the state from
  // before it, y_n = (x_n - mu) / sqrt(var + eps), out = y_n * weight + bias
  // (absent: 1 and 0); then, with m_n and s2_n the
  // mean and biased variance of sample n over its positions,
  //   var <- a_f var + (1 - a_f) s2_n + a_f (1 - a_f) (m_n - mu)^2
  //   mu  <- mu + (1 - a_f) (m_n - mu)          (mu, var (C,), in place)
  // With layer_scale (the error compensation "ls"), out is then scaled per
  // sample: out <- out / sqrt(mean over the sample's channels and positions
  // of out^2 + eps), in the same pass.
  // Returns (out, mean, rstd, layer_rstd): the (N, C) statistics each sample
  // was normalized with, and with layer_scale each sample's (N,) scale
  // 1 / sqrt(mean(out^2) + eps) (else an empty (0,) tensor). u, v and
  // alpha_bkw, the backward's state and rate, are not used here: they are
  // inputs so that autograd can hand them to the backward.
  m.def(
      "online_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!) mu, Tensor(b!) var, Tensor u, "
      "Tensor v, float alpha_fwd, float alpha_bkw, float eps, bool layer_scale=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // The paper's backward, a control process rather than the forward's
  // derivative: per channel, for each sample n in order, with y_n the
  // forward's output (means over the sample's positions),
  //   g = weight dy_n - (1 - a_b) v y_n;  v += mean(g y_n);  g = g * rstd_n
  //   dx_n = g - (1 - a_b) u;             u += mean(dx_n)   (u, v (C,), in place)
  // With layer_rstd (the forward's with layer_scale; bias is then the
  // forward's bias), grad_output is the gradient of the layer-scaled output
  // and dy above is its derivative through the scaling (per sample, with r =
  // layer_rstd and z = weight y + bias: dy = r grad_output - r^3
  // mean(grad_output z) z), folded into the same passes.
  // Returns (grad_input, grad_weight = sum dy y, grad_bias = sum dy); an
  // output whose output_mask entry is false is an empty tensor of shape (0,).
  m.def(
      "online_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor rstd, "
      "Tensor(a!) u, Tensor(b!) v, float alpha_bkw, bool[3] output_mask, Tensor? bias=None, "
      "Tensor? layer_rstd=None) -> (Tensor, Tensor, Tensor)");

  // Streaming Normalization (Liao, Kawaguchi and Poggio 2016), training, of
  // an (N, C, *) input (at least one value per channel; one is allowed):
  // per channel, the batch statistics s = (mean, std), std = sqrt(biased var
  // + eps), are pushed into the short-term history (short_stats (2, C), rows
  // mean and std, the average of the short_count batches pushed since the
  // last weight update; both in place: short <- short + (s - short) /
  // (short_count + 1), short_count += 1), and the input is normalized with
  // s_hat = alpha_long * long + alpha_short * short, long the long-term
  // statistics long_stats (2, C) (the short-term ones before the first
  // weight update, long_count == 0):
  //   out = (x - mean_hat) / std_hat * weight + bias
  // Returns (out, mean, rstd, mean_hat, rstd_hat): the batch's (C,) mean and
  // 1 / std, and those of s_hat, in the accumulation dtype. The gradient
  // history (grad_*) and beta_*, the backward's, are checked but not used
  // here: they are inputs so that autograd can hand them to the backward.
  m.def(
      "streaming_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!) short_stats, "
      "Tensor(b!) short_count, Tensor long_stats, Tensor long_count, Tensor grad_short, Tensor grad_short_count, "
      "Tensor grad_long, Tensor grad_long_count, float alpha_long, float alpha_short, float beta_long, "
      "float beta_short, float beta_current, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its backward, the paper's streamed gradient: per channel g =
  // dL/d(mean_hat, std_hat) of this batch is pushed into the short-term
  // gradient history (grad_short, grad_short_count, in place, as above), and
  // the batch statistics s receive, in place of their derivative, g_hat =
  // beta_long * grad_long + beta_short * grad_short + beta_current * g
  // (grad_long the short-term one before its first weight update), which
  // reaches the input through d mean/dx and d std/dx; the rest of grad_input
  // is dy * weight / std_hat. Returns (grad_input, grad_weight = sum dy x_hat,
  // grad_bias = sum dy), x_hat = (x - mean_hat) / std_hat; an output whose
  // output_mask entry is false is an empty tensor of shape (0,). The history
  // is updated whatever the mask.
  m.def(
      "streaming_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor rstd, "
      "Tensor mean_hat, Tensor rstd_hat, Tensor(a!) grad_short, Tensor(b!) grad_short_count, Tensor grad_long, "
      "Tensor grad_long_count, float beta_long, float beta_short, float beta_current, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");

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

  // Internal ops: one step of bn_lstm_layer and of its backward, the fused
  // per-device kernels that bn_lstm_layer and bn_lstm_layer_backward (one
  // composite for every backend, csrc/bn_lstm_layer.cpp) call once per step
  // around the matrix products. They write into the given outputs, which are
  // slices of the layer's (T, ...) tensors. Rows where `valid` is false get
  // hy = 0 and cy = cx.
  //
  // Forward: both gate BNs (statistics of this step's valid rows, or the
  // running row `step` in evaluation), the gates, the cell update, BN_c and
  // h, and the running-statistics update; stats gets (2, 9H) [mean; rstd].
  m.def(
      "_bn_lstm_step(Tensor input_gates, Tensor hidden_gates, Tensor cx, Tensor? bias, Tensor bn_ih_weight, "
      "Tensor bn_hh_weight, Tensor bn_c_weight, Tensor bn_c_bias, Tensor(a!)? running_mean_ih, "
      "Tensor(b!)? running_var_ih, Tensor(c!)? running_mean_hh, Tensor(d!)? running_var_hh, "
      "Tensor(e!)? running_mean_c, Tensor(f!)? running_var_c, int step, Tensor? valid, bool training, "
      "float momentum, float eps, Tensor(g!) hy, Tensor(h!) cy, Tensor(i!) stats) -> ()");
  // Backward of one step from grad_hy (all that reaches h_t) and grad_cy
  // (what reaches c_t from later steps): writes grad_input_gates,
  // grad_hidden_gates (N, 4H) and grad_cx (N, H), and adds the parameter
  // gradients of this step to grad_params, a float32 (float64) (14H,) of
  // [bias (4H) | bn_ih_weight (4H) | bn_hh_weight (4H) | bn_c_weight (H) |
  // bn_c_bias (H)]. Invalid rows: zero gate gradients, grad_cx = grad_cy.
  m.def(
      "_bn_lstm_step_backward(Tensor grad_hy, Tensor grad_cy, Tensor input_gates, Tensor hidden_gates, "
      "Tensor cx, Tensor cy, Tensor? bias, Tensor bn_ih_weight, Tensor bn_hh_weight, Tensor bn_c_weight, "
      "Tensor bn_c_bias, Tensor stats, Tensor? valid, bool training, Tensor(a!) grad_input_gates, "
      "Tensor(b!) grad_hidden_gates, Tensor(c!) grad_cx, Tensor(d!) grad_params) -> ()");

  // ------------------------------------------------ Cosine Normalization --
  // Cosine Normalization (Luo et al. 2017; docs/cosine_norm.md): each output
  // is the cosine of the angle between an output unit's weights and the
  // input it sees, out = (w . x + b) / (|w| |x|), in [-1, 1], with the norms
  // |w| = sqrt(sum w^2 + b^2 + eps) and |x| = sqrt(sum x^2 + [bias] + eps): a
  // bias is the weight of a constant input 1 (once per patch), and eps
  // (> 0) keeps an all-zero input's or weight's norm from 0 (its output is
  // then 0, not NaN). Each returns (out, input_rnorm, weight_rnorm), the
  // norms' reciprocals 1 / |x| and 1 / |w| (O,), in float32 (float64 for
  // float64 input). Dtypes: float32, float64, float16, bfloat16, the weight
  // and bias in the input's.
  //
  // A linear layer: input (*, I), weight (O, I), bias (O,); out (*, O),
  // input_rnorm (*) per row.
  m.def("cosine_linear(Tensor input, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // A 2-d convolution with zero padding: input (N, C, H, W), weight (O, C /
  // groups, kh, kw), bias (O,); out (N, O, Ho, Wo) as aten::convolution's.
  // |x| is the norm of the input patch under each output position, over the
  // channels of the output's group: input_rnorm is (N, groups, Ho, Wo).
  m.def(
      "cosine_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, float eps) -> (Tensor, Tensor, Tensor)");
  // Their gradients from the forward's arguments and what it returned:
  // (grad_input, grad_weight, grad_bias); an output whose output_mask entry
  // is false (grad_bias without a bias too) is an empty tensor of shape (0,).
  m.def(
      "cosine_linear_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, Tensor output, "
      "Tensor input_rnorm, Tensor weight_rnorm, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cosine_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, Tensor output, "
      "Tensor input_rnorm, Tensor weight_rnorm, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // ---------------------------------------------- Weight Normalization --
  // Weight Normalization (Salimans and Kingma 2016): w = g * v / ||v||, one
  // 2-norm per slice of v along dim (dim None: the whole tensor is one
  // slice; a negative dim counts from the end). The norm is clamped below by
  // eps (w = g * v / max(||v||, eps)), so a zero slice gives w = 0, not NaN.
  // g holds one value per slice: shaped (slices,), or like v with size 1
  // outside dim. Returns (w, norms): w like v (contiguous), norms = ||v||
  // per slice, unclamped, in g's shape and v's accumulation dtype (float32,
  // float64 for float64 v): half weights get float32 norms.
  m.def("weight_norm(Tensor v, Tensor g, int? dim, float eps) -> (Tensor, Tensor)");
  // Gradients of weight_norm from the norms it returned. With d =
  // sum(grad_w * v) per slice: grad_g = d / ||v|| and grad_v = (g / ||v||)
  // (grad_w - v * d / ||v||^2); where ||v|| < eps, the clamped forward is
  // linear in v: grad_g = d / eps, grad_v = (g / eps) grad_w. Returns
  // (grad_v, grad_g) in v's and g's shapes and dtypes; an output whose
  // output_mask entry is false is an empty tensor of shape (0,).
  m.def(
      "weight_norm_backward(Tensor grad_w, Tensor v, Tensor g, Tensor norms, int? dim, float eps, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
}

// torchnorm._C is imported only for its side effect of running the
// registrations above; it exposes no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// ---------------------------------------------------------------------------
// SyncBatchNorm's per-rank ops (torchnorm.nn.SyncBatchNorm,
// docs/sync_batch_norm.md). The collectives between them run in Python
// (torch.distributed._functional_collectives), so each op is local and not
// differentiable: the module's autograd Function calls them.
// ---------------------------------------------------------------------------
TORCH_LIBRARY_FRAGMENT(torchnorm, m) {
  // One rank's per-channel statistics of an (N, C, *) input (contiguous or
  // channels-last, read in place): a float64 (3, C) tensor of rows count
  // (N * S, the same for every channel), mean and M2 = sum((x - mean)^2),
  // computed in the input's accumulation type (float32 for float32, float16
  // and bfloat16) about a per-channel shift (on the CPU), then widened: the
  // count stays exact and the mean keeps its digits below float32's spacing
  // at its magnitude. An empty input gives zeros. The optional tensors are
  // only checked, as batch_norm_train checks them against the input, so
  // that a bad call fails before any collective or running-statistics update.
  m.def(
      "batch_norm_stats(Tensor input, Tensor? weight=None, Tensor? bias=None, Tensor? running_mean=None, "
      "Tensor? running_var=None, Tensor? residual=None) -> Tensor");
  // Merges W partials (count, mean, M2) given as a (W, 3, C) table (W
  // batch_norm_stats results stacked: what an all_gather of them returns)
  // with Chan's formula in order w = 0 .. W-1 (partials of count 0 skipped);
  // returns (mean, rstd, count), each (C,) in the table's dtype (float32 or
  // float64), rstd = 1/sqrt(M2 / count + eps). Updates the running statistics in place
  // as batch_norm_train does, with the merged count for the unbiased
  // variance; where the merged count is 0, mean is 0, rstd 1/sqrt(eps) and
  // the running statistics stay as they are.
  m.def(
      "batch_norm_gather_stats(Tensor stats, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  // grad_input of training-mode BatchNorm from global statistics (mean,
  // rstd) and the global means mean_dz = mean(dz) and mean_dz_xhat =
  // mean(dz * (x - mean) * rstd), dz = dy * act'(z) being the gradient of the
  // pre-activation (batch_norm_backward with training=False returns the local
  // sums as grad_bias and grad_weight): grad_input = weight * rstd * (dz -
  // mean_dz - xhat * mean_dz_xhat); grad_residual = dz. Returns (grad_input,
  // grad_residual); an output whose output_mask entry is false is an empty
  // tensor of shape (0,).
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor mean, Tensor rstd, Tensor mean_dz, Tensor mean_dz_xhat, str activation, float negative_slope, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
}
