// CUDA kernels of conv_bn_frozen's internal per-channel ops (schemas in
// csrc/registration.cpp, the composite op in csrc/conv_bn.cpp, the CPU
// kernels in csrc/cpu/conv_bn.cpp):
//   _frozen_bn_affine           scale, shift, inv_std of a frozen BatchNorm
//   _frozen_bn_parameter_grads  the conv bias's and the BN weight's gradients
//   _conv_weight_channel_dot    per output channel, sum(g * w); g *= scale
// Done by ATen ops instead, these are a dozen launches of C-element kernels
// per layer in forward and two dozen in backward, which on a GPU cost more
// than the layer's BatchNorm did. The formulas are batch_norm_math.h's,
// computed in double like the CPU loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common/batch_norm_math.h"
#include "common/conv_bn_channels.h"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

using at::Tensor;
using std::optional;

constexpr int kChannelThreads = 128;
constexpr int kDotThreads = 256, kLog2DotThreads = 8;

int channel_blocks(int64_t channels) { return int(ceil_div(channels, kChannelThreads)); }

template <typename scalar_t>
__global__ void frozen_affine_kernel(ChannelValues<scalar_t> conv_bias, ChannelValues<scalar_t> bn_weight,
                                     ChannelValues<scalar_t> bn_bias, ChannelValues<scalar_t> mean,
                                     ChannelValues<scalar_t> var, double eps, int64_t channels, scalar_t* scale,
                                     scalar_t* shift, scalar_t* inv_std) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= channels) return;
  const FrozenChannel<double> f = frozen_channel<double>(var[c], eps, bn_weight[c], bn_bias[c], conv_bias[c], mean[c]);
  scale[c] = scalar_t(f.scale);
  shift[c] = scalar_t(f.shift);
  inv_std[c] = scalar_t(f.inv_std);
}

std::tuple<Tensor, Tensor, Tensor> frozen_bn_affine(const optional<Tensor>& conv_bias,
                                                    const optional<Tensor>& bn_weight,
                                                    const optional<Tensor>& bn_bias, const Tensor& running_mean,
                                                    const Tensor& running_var, double eps) {
  FrozenAffineCall call = frozen_affine_call(conv_bias, bn_weight, bn_bias, running_mean, running_var);
  if (call.channels == 0) return {call.scale, call.shift, call.inv_std};
  const c10::cuda::CUDAGuard guard(running_mean.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.scale.scalar_type(), "_frozen_bn_affine_cuda", [&] {
    frozen_affine_kernel<scalar_t><<<channel_blocks(call.channels), kChannelThreads, 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
        channel_values<scalar_t>(call.conv_bias, 0), channel_values<scalar_t>(call.bn_weight, 1),
        channel_values<scalar_t>(call.bn_bias, 0), channel_values<scalar_t>(call.mean, 0),
        channel_values<scalar_t>(call.var, 0), eps, call.channels, call.scale.data_ptr<scalar_t>(),
        call.shift.data_ptr<scalar_t>(), call.inv_std.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {call.scale, call.shift, call.inv_std};
}

// One block per output channel c (group c / outs, block c % outs of each of
// the group's rows; the walk of channel_dot_layout): the sum of g * w over
// its entries, and g *= scale[c].
template <typename scalar_t>
__global__ void channel_dot_kernel(scalar_t* g, const scalar_t* w, const scalar_t* scale, int64_t rows,
                                   int64_t outs, int64_t block, scalar_t* dot) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = blockIdx.x;
  const int64_t group = c / outs, out = c % outs, entries = rows * block;
  const scalar_t s = scale ? scale[c] : scalar_t(1);
  acc_t sum[1] = {acc_t(0)};
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    const int64_t r = e / block;
    const int64_t i = ((group * rows + r) * outs + out) * block + (e - r * block);
    const scalar_t gv = g[i];
    sum[0] += acc_t(gv) * acc_t(w[i]);
    if (scale) g[i] = gv * s;
  }
  __shared__ acc_t sm[1][kMaxBlockWarps];
  group_allreduce_sum<1, acc_t>(sum, kLog2DotThreads, sm);
  if (threadIdx.x == 0) dot[c] = scalar_t(sum[0]);
}

// The kernel where g and w fit channel_dot_layout's walk, ATen ops
// otherwise (channel_dot_by_aten).
Tensor conv_weight_channel_dot(Tensor& g, const Tensor& w, const optional<Tensor>& scale, int64_t groups,
                               bool transposed) {
  const ChannelDotLayout layout = channel_dot_layout(g, w, scale, groups, transposed);
  if (!layout.loop) return channel_dot_by_aten(g, w, scale, groups, transposed);
  Tensor dot = at::empty({layout.channels}, g.options());
  if (layout.channels == 0) return dot;
  const Tensor scale_values = scale ? scale->to(g.scalar_type()).contiguous() : Tensor();
  const c10::cuda::CUDAGuard guard(g.device());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "_conv_weight_channel_dot_cuda", [&] {
    channel_dot_kernel<scalar_t><<<layout.channels, kDotThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        scale_values.defined() ? scale_values.const_data_ptr<scalar_t>() : nullptr, layout.rows, layout.outs,
        layout.block, dot.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dot;
}

template <typename scalar_t>
__global__ void parameter_grads_kernel(ChannelValues<scalar_t> scale, ChannelValues<scalar_t> inv_std,
                                       ChannelValues<scalar_t> grad_scale, ChannelValues<scalar_t> grad_shift,
                                       ChannelValues<scalar_t> conv_bias, ChannelValues<scalar_t> mean,
                                       int64_t channels, scalar_t* grad_conv_bias, scalar_t* grad_bn_weight) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= channels) return;
  if (grad_conv_bias) grad_conv_bias[c] = scalar_t(frozen_conv_bias_grad(grad_shift[c], scale[c]));
  if (grad_bn_weight) {
    grad_bn_weight[c] = scalar_t(frozen_bn_weight_grad(grad_scale[c], grad_shift[c], conv_bias[c], mean[c],
                                                       inv_std[c]));
  }
}

std::tuple<Tensor, Tensor> frozen_bn_parameter_grads(const Tensor& grad_shift, const optional<Tensor>& grad_scale,
                                                     const Tensor& scale, const Tensor& inv_std,
                                                     const optional<Tensor>& conv_bias, const Tensor& running_mean,
                                                     std::array<bool, 2> output_mask) {
  ParameterGradsCall call =
      parameter_grads_call(grad_shift, grad_scale, scale, inv_std, conv_bias, running_mean, output_mask);
  if (call.channels == 0 || !(call.want_conv_bias || call.want_bn_weight)) {
    return {call.grad_conv_bias, call.grad_bn_weight};
  }
  const c10::cuda::CUDAGuard guard(running_mean.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, call.grad_conv_bias.scalar_type(), "_frozen_bn_parameter_grads_cuda", [&] {
        parameter_grads_kernel<scalar_t><<<channel_blocks(call.channels), kChannelThreads, 0,
                                           at::cuda::getCurrentCUDAStream()>>>(
            channel_values<scalar_t>(call.scale, 0), channel_values<scalar_t>(call.inv_std, 0),
            channel_values<scalar_t>(call.grad_scale, 0), channel_values<scalar_t>(call.grad_shift, 0),
            channel_values<scalar_t>(call.conv_bias, 0), channel_values<scalar_t>(call.mean, 0), call.channels,
            call.want_conv_bias ? call.grad_conv_bias.data_ptr<scalar_t>() : nullptr,
            call.want_bn_weight ? call.grad_bn_weight.data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {call.grad_conv_bias, call.grad_bn_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  m.impl("_frozen_bn_affine", &frozen_bn_affine);
  m.impl("_frozen_bn_parameter_grads", &frozen_bn_parameter_grads);
  m.impl("_conv_weight_channel_dot", &conv_weight_channel_dot);
}

}  // namespace torchnorm
