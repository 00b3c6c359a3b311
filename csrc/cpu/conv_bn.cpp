// CPU kernels of conv_bn_frozen's internal per-channel ops (schemas in
// csrc/registration.cpp, the composite op in csrc/conv_bn.cpp, the CUDA
// kernels in csrc/cuda/conv_bn.cu):
//   _frozen_bn_affine           scale, shift, inv_std of a frozen BatchNorm
//   _frozen_bn_parameter_grads  the conv bias's and the BN weight's gradients
//   _conv_weight_channel_dot    per output channel, sum(g * w); g *= scale
// The per-channel formulas are batch_norm_math.h's, evaluated in double for
// every dtype of the vectors. Loops, not ATen ops: a dozen ATen calls on
// C-element vectors cost more than ResNet's smaller convolutions' whole
// BatchNorm (about 50 us against 14 us for a tiny layer's conv).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "common/batch_norm_math.h"
#include "common/conv_bn_channels.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm {
namespace {

using at::Tensor;
using std::optional;

std::tuple<Tensor, Tensor, Tensor> frozen_bn_affine(const optional<Tensor>& conv_bias,
                                                    const optional<Tensor>& bn_weight,
                                                    const optional<Tensor>& bn_bias, const Tensor& running_mean,
                                                    const Tensor& running_var, double eps) {
  FrozenAffineCall call = frozen_affine_call(conv_bias, bn_weight, bn_bias, running_mean, running_var);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.scale.scalar_type(), "_frozen_bn_affine", [&] {
    const auto b = channel_values<scalar_t>(call.conv_bias, 0), w = channel_values<scalar_t>(call.bn_weight, 1),
               beta = channel_values<scalar_t>(call.bn_bias, 0), mean = channel_values<scalar_t>(call.mean, 0),
               var = channel_values<scalar_t>(call.var, 0);
    scalar_t* scale_out = call.scale.data_ptr<scalar_t>();
    scalar_t* shift_out = call.shift.data_ptr<scalar_t>();
    scalar_t* inv_std_out = call.inv_std.data_ptr<scalar_t>();
    for (int64_t c = 0; c < call.channels; ++c) {
      const FrozenChannel<double> f = frozen_channel<double>(var[c], eps, w[c], beta[c], b[c], mean[c]);
      scale_out[c] = scalar_t(f.scale);
      shift_out[c] = scalar_t(f.shift);
      inv_std_out[c] = scalar_t(f.inv_std);
    }
  });
  return {call.scale, call.shift, call.inv_std};
}

std::tuple<Tensor, Tensor> frozen_bn_parameter_grads(const Tensor& grad_shift, const optional<Tensor>& grad_scale,
                                                     const Tensor& scale, const Tensor& inv_std,
                                                     const optional<Tensor>& conv_bias, const Tensor& running_mean,
                                                     std::array<bool, 2> output_mask) {
  ParameterGradsCall call =
      parameter_grads_call(grad_shift, grad_scale, scale, inv_std, conv_bias, running_mean, output_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, call.grad_conv_bias.scalar_type(), "_frozen_bn_parameter_grads", [&] {
        const auto scale_c = channel_values<scalar_t>(call.scale, 0),
                   inv_std_c = channel_values<scalar_t>(call.inv_std, 0),
                   shift_grad = channel_values<scalar_t>(call.grad_shift, 0),
                   scale_grad = channel_values<scalar_t>(call.grad_scale, 0),
                   b = channel_values<scalar_t>(call.conv_bias, 0), mean = channel_values<scalar_t>(call.mean, 0);
        scalar_t* conv_bias_out = call.want_conv_bias ? call.grad_conv_bias.data_ptr<scalar_t>() : nullptr;
        scalar_t* bn_weight_out = call.want_bn_weight ? call.grad_bn_weight.data_ptr<scalar_t>() : nullptr;
        for (int64_t c = 0; c < call.channels; ++c) {
          if (conv_bias_out) conv_bias_out[c] = scalar_t(frozen_conv_bias_grad(shift_grad[c], scale_c[c]));
          if (bn_weight_out) {
            bn_weight_out[c] =
                scalar_t(frozen_bn_weight_grad(scale_grad[c], shift_grad[c], b[c], mean[c], inv_std_c[c]));
          }
        }
      });
  return {call.grad_conv_bias, call.grad_bn_weight};
}

// One pass over g and w where they fit channel_dot_layout's walk, ATen ops
// otherwise (channel_dot_by_aten).
Tensor conv_weight_channel_dot(Tensor& g, const Tensor& w, const optional<Tensor>& scale, int64_t groups,
                               bool transposed) {
  const ChannelDotLayout layout = channel_dot_layout(g, w, scale, groups, transposed);
  if (!layout.loop) return channel_dot_by_aten(g, w, scale, groups, transposed);
  const int64_t channels = layout.channels, rows = layout.rows, outs = layout.outs, block = layout.block;
  const Tensor scale_values = scale ? scale->to(g.scalar_type()).contiguous() : Tensor();
  Tensor dot = at::zeros({channels}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "_conv_weight_channel_dot", [&] {
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

}  // namespace

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  m.impl("_frozen_bn_affine", &frozen_bn_affine);
  m.impl("_frozen_bn_parameter_grads", &frozen_bn_parameter_grads);
  m.impl("_conv_weight_channel_dot", &conv_weight_channel_dot);
}

}  // namespace torchnorm
