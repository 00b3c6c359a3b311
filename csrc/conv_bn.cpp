// Conv or transposed conv + frozen BatchNorm (eval-mode statistics, trainable
// parameters) as one op, registered once for every backend
// (CompositeExplicitAutograd) and run wherever its internal per-channel ops
// have kernels (the CPU, and CUDA in a CUDA build): the convolution is
// ATen's, the frozen BatchNorm is the per-output-channel affine map
//   out = conv(x, W) * scale + shift,
//   scale = bn_weight / sqrt(var + eps), shift = (conv_bias - mean) * scale + bn_bias,
// computed either as the fold, conv(x, W * scale) + shift, or by scaling the
// conv output, whichever touches less memory (output_is_smaller). Its
// autograd (csrc/autograd/conv_bn.cpp) keeps the conv input and the parameters only:
// neither the conv output, which torch.nn's pair keeps, nor a folded weight,
// which a differentiable fold keeps.
//
// This is C++ because the same arithmetic as a Python autograd.Function cost
// about 0.4 ms of interpreter time per layer and step (profiled on ResNet-50
// at batch 8, 112x112, CPU), which was most of its gap to torch.nn.
//
// Its per-channel pieces are internal ops it calls through the dispatcher
// (_frozen_bn_affine, _frozen_bn_parameter_grads, _conv_weight_channel_dot;
// kernels in csrc/cpu/conv_bn.cpp and csrc/cuda/conv_bn.cu), and its folded
// weight is _conv_weight_channel_scale's (common/conv_bn_channels.h), so the
// fold's formula and the transposed weight's layout have one home each,
// which torchnorm/fx/fold.py uses too.
//
// Also here: conv_bn_train, conv + training-mode BatchNorm (+ residual) (+
// activation) whose autograd keeps the conv input and recomputes the conv in
// backward (the ResNet tail's block, see torchnorm/nn/conv_bn.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/conv_bn_channels.h"
#include "common/input_checks.h"
#include "ops/batch_norm.h"
#include "ops/conv_bn.h"

namespace torchnorm {
namespace {

using at::Tensor;
using std::optional;

// The frozen BatchNorm per output channel, in the parameters' (promoted)
// dtype, and whether backward may divide by every scale (see
// output_is_smaller).
struct FrozenAffine {
  Tensor scale, shift, inv_std;
  bool divisible = false;
};

// A scale whose products with gradients stay normal floats, so dividing
// them by it again loses nothing: not zero (a zero-initialized BN weight),
// tiny, huge or non-finite.
constexpr double kMinDivisible = 1e-20, kMaxDivisible = 1e20;
bool divisible(double scale) { return std::abs(scale) >= kMinDivisible && std::abs(scale) <= kMaxDivisible; }

// The internal per-channel ops are called below autograd: they are not
// differentiable (this op's autograd covers them), and above it each call
// would take the autograd fallback, which boxes its arguments (about 2 us a
// call on the CPU, about 2% of a small layer's backward).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// Whether every scale is divisible: a loop over a CPU scale, else an ATen
// reduction (a host sync; output_is_smaller asks only on the CPU). It tests
// the scale as rounded to its dtype, the value backward multiplies and
// divides by.
bool all_divisible(const Tensor& scale) {
  if (!scale.is_cpu()) {
    const Tensor magnitude = scale.abs();
    return (magnitude >= kMinDivisible).logical_and(magnitude <= kMaxDivisible).all().item<bool>();
  }
  const Tensor values = scale.contiguous();
  bool all = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "all_divisible", [&] {
    const scalar_t* data = values.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < values.numel(); ++c) all = all && divisible(double(data[c]));
  });
  return all;
}

// The frozen BatchNorm's per-channel map (_frozen_bn_affine, whose kernels
// evaluate frozen_channel of common/batch_norm_math.h in double).
// `want_divisible` asks for FrozenAffine::divisible.
FrozenAffine frozen_affine(const optional<Tensor>& conv_bias, const optional<Tensor>& bn_weight,
                           const optional<Tensor>& bn_bias, const Tensor& mean, const Tensor& var, double eps,
                           bool want_divisible) {
  const auto& op = ops::handle<ops::FrozenBnAffine>();
  const BelowAutograd below_autograd;
  auto [scale, shift, inv_std] = op.call(conv_bias, bn_weight, bn_bias, mean, var, eps);
  const bool scale_divisible = want_divisible && all_divisible(scale);
  return {std::move(scale), std::move(shift), std::move(inv_std), scale_divisible};
}

// A per-channel vector shaped to broadcast over dimension `channel_dim` of a
// tensor with `dim` dimensions (1 for an activation).
Tensor per_channel(const Tensor& t, int64_t dim, int64_t channel_dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[channel_dim] = -1;
  return t.reshape(shape);
}

// The convolution's arguments. (How a transposed conv's weight holds its
// output channels: common/conv_bn_channels.h.)
struct Conv {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
  bool transposed;
  std::vector<int64_t> output_padding;  // all zeros where the op was given none

  int64_t out_channels(const Tensor& weight) const { return conv_out_channels(weight, groups, transposed); }

  Tensor run(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias) const {
    return at::convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups);
  }

  // (grad_input, grad_weight), those the mask asks for. The bias gradient
  // is a plain sum (see conv_bn_frozen_backward), not asked of the conv.
  std::pair<Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                                     bool want_input, bool want_weight) const {
    auto [grad_input, grad_weight, unused] =
        at::convolution_backward(grad_output, input, weight, std::nullopt, stride, padding, dilation, transposed,
                                 output_padding, groups, {want_input, want_weight, false});
    return {grad_input, grad_weight};
  }

  // The weight folded with `scale` in the weight's dtype (the kernel of
  // _conv_weight_channel_scale, called directly: it is the same function on
  // every backend).
  Tensor folded_weight(const Tensor& weight, const Tensor& scale) const {
    return scale_output_channels(weight, scale, groups, transposed).to(weight.scalar_type());
  }

  int64_t output_numel(const Tensor& input, const Tensor& weight) const {
    int64_t numel = input.size(0) * out_channels(weight);
    for (int64_t d = 2; d < input.dim(); ++d) {
      const int64_t i = d - 2, extent = dilation[i] * (weight.size(d) - 1);
      numel *= transposed ? (input.size(d) - 1) * stride[i] - 2 * padding[i] + extent + output_padding[i] + 1
                          : (input.size(d) + 2 * padding[i] - extent - 1) / stride[i] + 1;
    }
    return numel;
  }
};

// Whether the scale goes on the conv output instead of on the weight (the
// fold, which backward repeats). Either is one read and one write of that
// tensor in forward and again in backward, so the smaller wins: in a
// ResNet's last stages the weights are several times a small batch's
// activations (on ResNet-50 at batch 8, 112x112: 89.5 MiB of conv weights,
// while the smaller of weight and output sums to 23.7 MiB over the layers).
// Backward then runs the conv's backward on grad * scale, which gives the
// conv weight's gradient G * scale directly, and divides the dot product
// that gives the scale's gradient by the scale; so a scale that is not
// FrozenAffine::divisible makes backward fold instead. Only on the CPU: on
// a GPU weight passes cost microseconds next to the convolutions, and the
// check would wait for the device.
bool output_is_smaller(const Tensor& input, const Tensor& weight, const Conv& conv) {
  return input.is_cpu() && conv.output_numel(input, weight) < weight.numel();
}

// Checks the convolution's arguments and gathers them; `op` names the op in
// messages.
Conv conv_args(const char* op, const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool transposed,
               at::IntArrayRef output_padding) {
  const int64_t spatial = input.dim() - 2;
  TORCH_CHECK_VALUE(spatial >= 1 && spatial <= 3, op, ": expected a 3d, 4d or 5d input, got ", input.dim(), "d");
  TORCH_CHECK_VALUE(weight.dim() == input.dim(), op, ": weight must have as many dimensions as the input (",
                    input.dim(), "), got ", weight.dim());
  for (const auto* list : {&stride, &padding, &dilation}) {
    TORCH_CHECK_VALUE(int64_t(list->size()) == spatial, op, ": stride, padding and dilation need one entry per "
                      "spatial dimension (", spatial, ")");
  }
  TORCH_CHECK_VALUE(groups >= 1 && weight.size(0) % groups == 0, op, ": groups (", groups,
                    ") must be positive and divide the weight's first dimension (", weight.size(0), ")");
  Conv conv{stride, padding, dilation, groups, transposed, std::vector<int64_t>(spatial, 0)};
  if (!output_padding.empty()) {
    TORCH_CHECK_VALUE(int64_t(output_padding.size()) == spatial, op, ": output_padding needs one entry per "
                      "spatial dimension (", spatial, ") or none");
    conv.output_padding = output_padding.vec();
  }
  for (int64_t p : conv.output_padding) {
    TORCH_CHECK_VALUE(transposed || p == 0, op, ": output_padding applies to transposed convolutions only");
  }
  return conv;
}

// conv_args, and that the running statistics have one entry per output
// channel.
Conv frozen_conv_args(const Tensor& input, const Tensor& weight, const Tensor& mean, const Tensor& var,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      bool transposed, at::IntArrayRef output_padding) {
  const char* op = "torchnorm.conv_bn_frozen";
  Conv conv = conv_args(op, input, weight, stride, padding, dilation, groups, transposed, output_padding);
  const int64_t channels = conv.out_channels(weight);
  for (const auto* stats : {&mean, &var}) {
    TORCH_CHECK_VALUE(stats->dim() == 1 && stats->size(0) == channels, op, ": running statistics must have one "
                      "entry per output channel (", channels, "), got shape ", stats->sizes());
  }
  return conv;
}

// Per output channel c: the sum of g * w over the entries of c's weights;
// then, when `scale` is given, g *= scale per output channel, in place
// (_conv_weight_channel_dot).
Tensor channel_dot(Tensor& g, const Tensor& w, const optional<Tensor>& scale, const Conv& conv) {
  const auto& op = ops::handle<ops::ConvWeightChannelDot>();
  const BelowAutograd below_autograd;
  return op.call(g, w, scale, conv.groups, conv.transposed);
}

Tensor conv_bn_frozen(const Tensor& input, const Tensor& weight, const optional<Tensor>& conv_bias,
                      const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias, const Tensor& running_mean,
                      const Tensor& running_var, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups, bool transposed, at::IntArrayRef output_padding) {
  const Conv conv = frozen_conv_args(input, weight, running_mean, running_var, stride, padding, dilation, groups,
                                     transposed, output_padding);
  const FrozenAffine affine = frozen_affine(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, false);
  const auto dtype = weight.scalar_type();
  if (output_is_smaller(input, weight, conv)) {
    Tensor out = conv.run(input, weight, std::nullopt);
    return at::addcmul_out(out, per_channel(affine.shift.to(dtype), out.dim(), 1), out,
                           per_channel(affine.scale.to(dtype), out.dim(), 1));
  }
  return conv.run(input, conv.folded_weight(weight, affine.scale), affine.shift.to(dtype));
}

// The conv bias's and the BN weight's gradients from per-channel sums
// (_frozen_bn_parameter_grads, whose kernels evaluate frozen_conv_bias_grad
// and frozen_bn_weight_grad of common/batch_norm_math.h).
std::pair<Tensor, Tensor> parameter_grads(const FrozenAffine& affine, const Tensor& grad_scale,
                                          const Tensor& grad_shift, const optional<Tensor>& conv_bias,
                                          const Tensor& mean, bool want_conv_bias, bool want_bn_weight) {
  if (!want_conv_bias && !want_bn_weight) return {};
  const auto& op = ops::handle<ops::FrozenBnParameterGrads>();
  const BelowAutograd below_autograd;
  auto [grad_conv_bias, grad_bn_weight] =
      op.call(grad_shift, want_bn_weight ? optional<Tensor>(grad_scale) : std::nullopt, affine.scale,
              affine.inv_std, conv_bias, mean, {want_conv_bias, want_bn_weight});
  return {want_conv_bias ? grad_conv_bias : Tensor(), want_bn_weight ? grad_bn_weight : Tensor()};
}

// Per channel (dimension 1), the sum of a gradient's entries: a per-channel
// shift's or a conv bias's gradient.
Tensor channel_sums(const Tensor& grad) {
  std::vector<int64_t> all_but_channels{0};
  for (int64_t d = 2; d < grad.dim(); ++d) all_but_channels.push_back(d);
  return grad.sum(all_but_channels);
}

Tensor empty_unless(bool wanted, const Tensor& t, const Tensor& like) {
  return wanted ? t.to(like.scalar_type()) : empty_placeholder(like, like.scalar_type());
}

// Gradients (input, conv weight, conv bias, BN weight, BN bias). With G the
// conv's weight gradient for the unscaled output, conv_weight_backward(x,
// grad), the conv weight's gradient is G * scale and the scale's is the sum
// of G * W over each output channel's weights, which equals the sum of
// grad * conv(x, W) over the output: no conv output is needed. Folded, the
// conv's backward runs on grad with the folded weight and returns G; scaling
// the output, it runs on grad * scale with the weight and returns G * scale
// (output_is_smaller).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_frozen_backward(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const optional<Tensor>& conv_bias,
    const optional<Tensor>& bn_weight, const Tensor& running_mean, const Tensor& running_var, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool transposed,
    at::IntArrayRef output_padding, std::array<bool, 5> output_mask) {
  const Conv conv = frozen_conv_args(input, weight, running_mean, running_var, stride, padding, dilation, groups,
                                     transposed, output_padding);
  const bool smaller = output_is_smaller(input, weight, conv);
  const FrozenAffine affine =
      frozen_affine(conv_bias, bn_weight, std::nullopt, running_mean, running_var, eps, smaller);
  const Tensor& scale = affine.scale;
  const bool want_weight = output_mask[1] || output_mask[3];
  const bool want_shift = output_mask[2] || output_mask[3] || output_mask[4];
  Tensor grad_input, grad_weight, grad_shift, grad_scale;
  if (want_shift) {
    // One sum for both paths, not the conv backward's bias output: on the
    // CPU, ResNet-50's conv backwards (batch 8, 112x112) took 0.4-4.4% longer
    // with oneDNN's bias gradient than without it plus this sum.
    grad_shift = channel_sums(grad_output);
  }
  if (smaller && affine.divisible) {
    const Tensor grad_scaled = grad_output * per_channel(scale.to(grad_output.scalar_type()), grad_output.dim(), 1);
    std::tie(grad_input, grad_weight) = conv.backward(grad_scaled, input, weight, output_mask[0], want_weight);
    if (output_mask[3]) grad_scale = channel_dot(grad_weight, weight, std::nullopt, conv) / scale;
  } else {
    std::tie(grad_input, grad_weight) =
        conv.backward(grad_output, input, conv.folded_weight(weight, scale), output_mask[0], want_weight);
    if (want_weight) {
      grad_scale = channel_dot(grad_weight, weight, output_mask[1] ? optional<Tensor>(scale) : std::nullopt, conv);
    }
  }
  auto [grad_conv_bias, grad_bn_weight] = parameter_grads(affine, grad_scale, grad_shift, conv_bias, running_mean,
                                                          output_mask[2], output_mask[3]);
  const Tensor& bn_like = bn_weight ? *bn_weight : weight;
  return {empty_unless(output_mask[0], grad_input, input), empty_unless(output_mask[1], grad_weight, weight),
          empty_unless(output_mask[2], grad_conv_bias, conv_bias ? *conv_bias : weight),
          empty_unless(output_mask[3], grad_bn_weight, bn_like), empty_unless(output_mask[4], grad_shift, bn_like)};
}

// Training-mode conv -> BatchNorm (+ residual) (+ activation): the
// convolution, then batch_norm_train over its output, which the op does not
// return: its autograd keeps the conv input instead and backward recomputes
// the convolution (see conv_bn_train_backward).
std::tuple<Tensor, Tensor, Tensor> conv_bn_train(
    const Tensor& input, const Tensor& weight, const optional<Tensor>& conv_bias, const optional<Tensor>& bn_weight,
    const optional<Tensor>& bn_bias, const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    double momentum, double eps, c10::string_view activation, double negative_slope, const optional<Tensor>& residual,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool transposed,
    at::IntArrayRef output_padding) {
  const Conv conv = conv_args("torchnorm.conv_bn_train", input, weight, stride, padding, dilation, groups, transposed,
                              output_padding);
  const auto& train = ops::handle<ops::BatchNormTrain>();
  return train.call(conv.run(input, weight, conv_bias), bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                    activation, negative_slope, residual);
}

// Gradients (input, weight, conv_bias, bn_weight, bn_bias, residual) of
// conv_bn_train from its inputs and batch statistics: the convolution runs
// again (its output is freed before the conv's backward), batch_norm_backward
// gives its output's gradient, and the conv's backward the rest. The conv
// bias's gradient is that gradient's per-channel sum.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_train_backward(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const optional<Tensor>& conv_bias,
    const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias, const optional<Tensor>& residual,
    const Tensor& mean, const Tensor& rstd, c10::string_view activation, double negative_slope,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool transposed,
    at::IntArrayRef output_padding, std::array<bool, 6> output_mask) {
  const Conv conv = conv_args("torchnorm.conv_bn_train_backward", input, weight, stride, padding, dilation, groups,
                              transposed, output_padding);
  const bool want_conv_output = output_mask[0] || output_mask[1] || output_mask[2];
  const auto& bn_backward = ops::handle<ops::BatchNormBackward>();
  Tensor grad_conv_output, grad_bn_weight, grad_bn_bias, grad_residual;
  {
    const Tensor conv_output = conv.run(input, weight, conv_bias);
    std::tie(grad_conv_output, grad_bn_weight, grad_bn_bias, grad_residual) =
        bn_backward.call(grad_output, conv_output, bn_weight, bn_bias, residual, mean, rstd, /*training=*/true,
                         activation, negative_slope, {want_conv_output, output_mask[3], output_mask[4], output_mask[5]});
  }
  Tensor grad_input, grad_weight, grad_conv_bias;
  if (output_mask[0] || output_mask[1]) {
    std::tie(grad_input, grad_weight) =
        conv.backward(grad_conv_output, input, weight, output_mask[0], output_mask[1]);
  }
  if (output_mask[2]) grad_conv_bias = channel_sums(grad_conv_output);
  return {empty_unless(output_mask[0], grad_input, input), empty_unless(output_mask[1], grad_weight, weight),
          empty_unless(output_mask[2], grad_conv_bias, conv_bias ? *conv_bias : weight), grad_bn_weight, grad_bn_bias,
          grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnorm, CompositeExplicitAutograd, m) {
  m.impl("conv_bn_frozen", &conv_bn_frozen);
  m.impl("conv_bn_frozen_backward", &conv_bn_frozen_backward);
  m.impl("conv_bn_train", &conv_bn_train);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward);
  m.impl("_conv_weight_channel_scale", &scale_output_channels);
}

}  // namespace torchnorm
