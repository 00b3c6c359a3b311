// Conv or transposed conv + frozen BatchNorm (eval-mode statistics, trainable
// parameters) as one op, for every backend (CompositeExplicitAutograd): the
// convolution is ATen's, the frozen BatchNorm is the per-output-channel affine
// map
//   out = conv(x, W) * scale + shift,
//   scale = bn_weight / sqrt(var + eps), shift = (conv_bias - mean) * scale + bn_bias,
// computed either as the fold, conv(x, W * scale) + shift, or by scaling the
// conv output, whichever touches less memory (output_is_smaller). Its
// autograd (csrc/autograd.cpp) keeps the conv input and the parameters only:
// neither the conv output, which torch.nn's pair keeps, nor a folded weight,
// which a differentiable fold keeps.
//
// This is C++ because the same arithmetic as a Python autograd.Function cost
// about 0.4 ms of interpreter time per layer and step (profiled on ResNet-50
// at batch 8, 112x112, CPU), which was most of its gap to torch.nn.
//
// Also here: conv_bn_train, conv + training-mode BatchNorm (+ residual) (+
// activation) whose autograd keeps the conv input and recomputes the conv in
// backward (the ResNet tail's block, see torchnorm/nn/conv_bn.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/input_checks.h"
#include "common/batch_norm_math.h"
#include "common/conv_bn_kernels.h"
#include "ops/batch_norm.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm {

FrozenCudaKernels& frozen_cuda_kernels() {
  static FrozenCudaKernels kernels;
  return kernels;
}

namespace {

using at::Tensor;
using std::optional;

// The frozen BatchNorm per output channel, in the parameters' dtype, and
// whether backward may divide by every scale (see output_is_smaller).
struct FrozenAffine {
  Tensor scale, shift, inv_std;
  bool divisible = false;
};

// A scale whose products with gradients stay normal floats, so dividing
// them by it again loses nothing: not zero (a zero-initialized BN weight),
// tiny, huge or non-finite.
constexpr double kMinDivisible = 1e-20, kMaxDivisible = 1e20;
bool divisible(double scale) { return std::abs(scale) >= kMinDivisible && std::abs(scale) <= kMaxDivisible; }

// Whether a device runs the per-channel loops below: the CPU, and CUDA where
// the extension was built with its kernels (common/conv_bn_kernels.h).
bool has_loops(const Tensor& t) { return t.is_cpu() || (t.is_cuda() && frozen_cuda_kernels().affine); }

// Whether the per-channel vectors (undefined ones aside) are contiguous
// float or double tensors of one type on one device with loops: a dozen
// ATen calls on C-element vectors cost more than ResNet's smaller
// convolutions' whole BatchNorm (on the CPU about 50 us against 14 us for a
// tiny layer's conv; on a GPU, a kernel launch each).
bool per_channel_loops(std::initializer_list<const Tensor*> vectors) {
  const Tensor* first = nullptr;
  for (const Tensor* t : vectors) {
    if (!t->defined()) continue;
    if (!first) first = t;
    if (t->device() != first->device() || t->scalar_type() != first->scalar_type() || !t->is_contiguous() ||
        (t->scalar_type() != at::kFloat && t->scalar_type() != at::kDouble)) {
      return false;
    }
  }
  return first != nullptr && has_loops(*first);
}

// Element c of an optional per-channel vector, in double; `absent` when the
// vector is undefined.
template <typename scalar_t>
struct Vector {
  const scalar_t* data;
  double absent;
  Vector(const Tensor& t, double absent) : data(t.defined() ? t.const_data_ptr<scalar_t>() : nullptr), absent(absent) {}
  double operator[](int64_t c) const { return data ? double(data[c]) : absent; }
};

// Whether every scale is divisible (an ATen reduction; a host sync off the CPU).
bool all_divisible(const Tensor& scale) {
  const Tensor magnitude = scale.abs();
  return (magnitude >= kMinDivisible).logical_and(magnitude <= kMaxDivisible).all().item<bool>();
}

// The fold's formula (frozen_channel in batch_norm_math.h, DESIGN.md): scale
// = bn_weight / sqrt(var + eps) and shift = (conv_bias - mean) * scale +
// bn_bias, with 1 / sqrt(var + eps). By a loop (a CPU loop or a CUDA kernel)
// where per_channel_loops allows, computed in double, else by the same
// formula in ATen ops (half-precision parameters, other devices).
// `want_divisible` asks for FrozenAffine::divisible (a host sync off the CPU).
FrozenAffine frozen_affine(const optional<Tensor>& conv_bias, const optional<Tensor>& bn_weight,
                           const optional<Tensor>& bn_bias, const Tensor& mean, const Tensor& var, double eps,
                           bool want_divisible) {
  const Tensor b = conv_bias.value_or(Tensor()), w = bn_weight.value_or(Tensor()), beta = bn_bias.value_or(Tensor());
  if (per_channel_loops({&b, &w, &beta, &mean, &var})) {
    const int64_t channels = mean.numel();
    FrozenAffine r{at::empty({channels}, mean.options()), at::empty({channels}, mean.options()),
                   at::empty({channels}, mean.options()), true};
    if (!mean.is_cpu()) {
      frozen_cuda_kernels().affine(b, w, beta, mean, var, eps, r.scale, r.shift, r.inv_std);
      r.divisible = want_divisible && all_divisible(r.scale);
      return r;
    }
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "frozen_affine", [&] {
      const Vector<scalar_t> var_c(var, 0), w_c(w, 1), b_c(b, 0), mean_c(mean, 0), beta_c(beta, 0);
      scalar_t* scale_out = r.scale.data_ptr<scalar_t>();
      scalar_t* shift_out = r.shift.data_ptr<scalar_t>();
      scalar_t* inv_std_out = r.inv_std.data_ptr<scalar_t>();
      for (int64_t c = 0; c < channels; ++c) {
        const FrozenChannel<double> f = frozen_channel<double>(var_c[c], eps, w_c[c], beta_c[c], b_c[c], mean_c[c]);
        scale_out[c] = scalar_t(f.scale);
        shift_out[c] = scalar_t(f.shift);
        inv_std_out[c] = scalar_t(f.inv_std);
        r.divisible = r.divisible && divisible(f.scale);
      }
    });
    return r;
  }
  Tensor inv_std = (var + eps).rsqrt();
  Tensor scale = bn_weight ? *bn_weight * inv_std : inv_std;
  Tensor shift = (conv_bias ? *conv_bias - mean : -mean) * scale;
  if (bn_bias) shift = shift + *bn_bias;
  return {scale, shift, inv_std, want_divisible && all_divisible(scale)};
}

// A per-channel vector shaped to broadcast over dimension `channel_dim` of a
// tensor with `dim` dimensions (1 for an activation).
Tensor per_channel(const Tensor& t, int64_t dim, int64_t channel_dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[channel_dim] = -1;
  return t.reshape(shape);
}

// The convolution's arguments. A transposed conv's weight is (in_channels,
// out_channels / groups, kernel...): dimension 1 indexes the output channels
// within a group, and group g's rows are block g of dimension 0.
struct Conv {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
  bool transposed;
  std::vector<int64_t> output_padding;  // all zeros where the op was given none

  int64_t out_channels(const Tensor& weight) const { return transposed ? weight.size(1) * groups : weight.size(0); }

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

  // `scale` (one entry per output channel) shaped to multiply `weight`
  // element-wise.
  Tensor weight_scale(const Tensor& scale, const Tensor& weight) const {
    if (!transposed) return per_channel(scale, weight.dim(), 0);
    const int64_t in_per_group = weight.size(0) / groups, out_per_group = weight.size(1);
    std::vector<int64_t> shape(weight.dim(), 1);
    shape[0] = weight.size(0);
    shape[1] = out_per_group;
    return scale.reshape({groups, 1, out_per_group}).expand({groups, in_per_group, out_per_group}).reshape(shape);
  }

  // Per output channel, the sum of a weight-shaped tensor's entries.
  Tensor sum_per_output_channel(const Tensor& t) const {
    if (!transposed) return t.flatten(1).sum(1);
    return t.flatten(2).sum(2).reshape({groups, t.size(0) / groups, t.size(1)}).sum(1).reshape(-1);
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
// then, when `scale` is given, g *= scale per output channel, in place. One
// pass over g and w (a CPU loop or a CUDA kernel) for float and double, where
// g and w lay their elements out alike (see the loop); ATen ops otherwise.
Tensor channel_dot(const Tensor& g, const Tensor& w, const optional<Tensor>& scale, const Conv& conv) {
  const int64_t channels = conv.out_channels(w);
  // The loop's view of a weight: `groups` groups of `rows` rows, each row
  // holding, per output channel of the group, one block of `block`
  // contiguous entries. A conv weight is one row of all channels' blocks
  // (in any dense layout that puts channel c's entries in block c); a
  // contiguous transposed weight has one row per input channel.
  const int64_t groups = conv.transposed ? conv.groups : 1;
  const int64_t rows = conv.transposed ? w.size(0) / groups : 1;
  const int64_t outs = channels / groups;
  const int64_t blocks = groups * rows * outs;
  const int64_t block = blocks ? w.numel() / blocks : 0;
  const bool layout_ok = conv.transposed ? g.is_contiguous() && w.is_contiguous()
                                         : g.is_non_overlapping_and_dense() && g.stride(0) == block;
  const bool fast = has_loops(g) && (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble) &&
                    w.scalar_type() == g.scalar_type() && g.strides() == w.strides() && layout_ok;
  if (!fast) {
    Tensor dot = conv.sum_per_output_channel(g * w);
    if (scale) g.mul_(conv.weight_scale(*scale, g));
    return dot;
  }
  const Tensor scale_values = scale ? scale->to(g.scalar_type()).contiguous() : Tensor();
  if (!g.is_cpu()) {
    Tensor dot = at::empty({channels}, g.options());
    frozen_cuda_kernels().channel_dot(g, w, scale_values, groups, rows, outs, block, dot);
    return dot;
  }
  Tensor dot = at::zeros({channels}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "channel_dot", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    scalar_t* g_data = g.data_ptr<scalar_t>();
    const scalar_t* w_data = w.const_data_ptr<scalar_t>();
    const scalar_t* s_data = scale ? scale_values.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dot_data = dot.data_ptr<scalar_t>();
    // One block: returns the sum of gb * wb and scales gb.
    auto block_dot = [&](scalar_t* gb, const scalar_t* wb, int64_t c) {
      const Vec s(s_data ? s_data[c] : scalar_t(1));
      Vec acc(0);
      int64_t k = 0;
      for (; k + Vec::size() <= block; k += Vec::size()) {
        const Vec gv = Vec::loadu(gb + k);
        acc = at::vec::fmadd(gv, Vec::loadu(wb + k), acc);
        if (s_data) (gv * s).store(gb + k);
      }
      scalar_t sum = at::vec::vec_reduce_all<scalar_t>([](Vec a, Vec b) { return a + b; }, acc);
      for (; k < block; ++k) {
        sum += gb[k] * wb[k];
        if (s_data) gb[k] *= s_data[c];
      }
      return sum;
    };
    // A task takes a range of output channels and walks their blocks row by
    // row, so it writes contiguous stretches of g.
    at::parallel_for(0, channels, cpu::grain_for(block * rows), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end;) {
        const int64_t group = c / outs, first = c % outs, count = std::min(outs - first, end - c);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t offset = ((group * rows + r) * outs + first) * block;
          for (int64_t i = 0; i < count; ++i) {
            dot_data[c + i] += block_dot(g_data + offset + i * block, w_data + offset + i * block, c + i);
          }
        }
        c += count;
      }
    });
  });
  return dot;
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
  const Tensor folded = (weight * conv.weight_scale(affine.scale, weight)).to(dtype);
  return conv.run(input, folded, affine.shift.to(dtype));
}

// The conv bias's and the BN weight's gradients from per-channel sums
// (frozen_conv_bias_grad, frozen_bn_weight_grad in batch_norm_math.h).
// Loops or ATen ops, as frozen_affine.
std::pair<Tensor, Tensor> parameter_grads(const FrozenAffine& affine, const Tensor& grad_scale,
                                          const Tensor& grad_shift, const optional<Tensor>& conv_bias,
                                          const Tensor& mean, bool want_conv_bias, bool want_bn_weight) {
  if (!want_conv_bias && !want_bn_weight) return {};
  const Tensor b = conv_bias.value_or(Tensor());
  if (per_channel_loops({&affine.scale, &affine.inv_std, &grad_scale, &grad_shift, &b, &mean})) {
    const int64_t channels = mean.numel();
    Tensor grad_conv_bias = want_conv_bias ? at::empty({channels}, mean.options()) : Tensor();
    Tensor grad_bn_weight = want_bn_weight ? at::empty({channels}, mean.options()) : Tensor();
    if (!mean.is_cpu()) {
      frozen_cuda_kernels().parameter_grads(affine.scale, affine.inv_std, grad_scale, grad_shift, b, mean,
                                            grad_conv_bias, grad_bn_weight);
      return {grad_conv_bias, grad_bn_weight};
    }
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "parameter_grads", [&] {
      const Vector<scalar_t> scale(affine.scale, 0), inv_std(affine.inv_std, 0), shift_grad(grad_shift, 0),
          scale_grad(grad_scale, 0), b_c(b, 0), mean_c(mean, 0);
      scalar_t* conv_bias_out = want_conv_bias ? grad_conv_bias.data_ptr<scalar_t>() : nullptr;
      scalar_t* bn_weight_out = want_bn_weight ? grad_bn_weight.data_ptr<scalar_t>() : nullptr;
      for (int64_t c = 0; c < channels; ++c) {
        if (conv_bias_out) conv_bias_out[c] = scalar_t(frozen_conv_bias_grad(shift_grad[c], scale[c]));
        if (bn_weight_out) {
          bn_weight_out[c] =
              scalar_t(frozen_bn_weight_grad(scale_grad[c], shift_grad[c], b_c[c], mean_c[c], inv_std[c]));
        }
      }
    });
    return {grad_conv_bias, grad_bn_weight};
  }
  Tensor grad_conv_bias = want_conv_bias ? grad_shift * affine.scale : Tensor();
  Tensor grad_bn_weight;
  if (want_bn_weight) {
    const Tensor centred = conv_bias ? *conv_bias - mean : -mean;
    grad_bn_weight = (grad_scale + grad_shift * centred) * affine.inv_std;
  }
  return {grad_conv_bias, grad_bn_weight};
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
    const Tensor folded = (weight * conv.weight_scale(scale, weight)).to(weight.scalar_type());
    std::tie(grad_input, grad_weight) = conv.backward(grad_output, input, folded, output_mask[0], want_weight);
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
}

}  // namespace torchnorm
