// CUDA versions of conv_bn_frozen's per-channel loops (csrc/conv_bn.cpp; the
// table is common/conv_bn_kernels.h). Done by ATen ops instead, these are a
// dozen launches of C-element kernels per layer in forward and two dozen in
// backward, which on a GPU cost more than the layer's BatchNorm did. The
// formulas are batch_norm_math.h's, computed in double like the CPU loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "common/batch_norm_math.h"
#include "common/conv_bn_kernels.h"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

using at::Tensor;

constexpr int kChannelThreads = 128;
constexpr int kDotThreads = 256, kLog2DotThreads = 8;

// Element c of an optional per-channel vector, in double; `absent` when the
// vector is undefined (as the CPU loops' Vector).
template <typename scalar_t>
struct ChannelValues {
  const scalar_t* data;
  double absent;
  __device__ double operator[](int64_t c) const { return data ? double(data[c]) : absent; }
};

template <typename scalar_t>
ChannelValues<scalar_t> values_of(const Tensor& t, double absent) {
  return {t.defined() ? t.const_data_ptr<scalar_t>() : nullptr, absent};
}

template <typename scalar_t>
scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

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

void frozen_affine(const Tensor& conv_bias, const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& mean,
                   const Tensor& var, double eps, const Tensor& scale, const Tensor& shift, const Tensor& inv_std) {
  const int64_t channels = mean.numel();
  if (channels == 0) return;
  const c10::cuda::CUDAGuard guard(mean.device());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "frozen_affine_cuda", [&] {
    frozen_affine_kernel<scalar_t><<<channel_blocks(channels), kChannelThreads, 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
        values_of<scalar_t>(conv_bias, 0), values_of<scalar_t>(bn_weight, 1), values_of<scalar_t>(bn_bias, 0),
        values_of<scalar_t>(mean, 0), values_of<scalar_t>(var, 0), eps, channels, scale.data_ptr<scalar_t>(),
        shift.data_ptr<scalar_t>(), inv_std.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One block per output channel c (group c / outs, block c % outs of each of
// the group's rows): the sum of g * w over its entries, and g *= scale[c].
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

void channel_dot(const Tensor& g, const Tensor& w, const Tensor& scale, int64_t groups, int64_t rows, int64_t outs,
                 int64_t block, const Tensor& dot) {
  const int64_t channels = groups * outs;
  if (channels == 0) return;
  const c10::cuda::CUDAGuard guard(g.device());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "channel_dot_cuda", [&] {
    channel_dot_kernel<scalar_t><<<channels, kDotThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr, rows, outs, block, dot.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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

void parameter_grads(const Tensor& scale, const Tensor& inv_std, const Tensor& grad_scale, const Tensor& grad_shift,
                     const Tensor& conv_bias, const Tensor& mean, const Tensor& grad_conv_bias,
                     const Tensor& grad_bn_weight) {
  const int64_t channels = mean.numel();
  if (channels == 0) return;
  const c10::cuda::CUDAGuard guard(mean.device());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "frozen_parameter_grads_cuda", [&] {
    parameter_grads_kernel<scalar_t><<<channel_blocks(channels), kChannelThreads, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(
        values_of<scalar_t>(scale, 0), values_of<scalar_t>(inv_std, 0), values_of<scalar_t>(grad_scale, 0),
        values_of<scalar_t>(grad_shift, 0), values_of<scalar_t>(conv_bias, 0), values_of<scalar_t>(mean, 0),
        channels, data_or_null<scalar_t>(grad_conv_bias), data_or_null<scalar_t>(grad_bn_weight));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Fills the table when the extension loads.
const bool registered = [] {
  FrozenCudaKernels& kernels = frozen_cuda_kernels();
  kernels.affine = &frozen_affine;
  kernels.channel_dot = &channel_dot;
  kernels.parameter_grads = &parameter_grads;
  return true;
}();

}  // namespace
}  // namespace torchnorm
