// CUDA kernels of Weight Normalization (weight_norm, weight_norm_backward).
// Schemas and semantics are in csrc/registration.cpp; the per-slice math,
// shared with the CPU kernels (csrc/cpu/weight_norm.cpp), is in
// common/weight_norm_math.h. Kept simple: three launches per direction.
//
//   1. slice_dot_kernel    grid (slices, pieces): each block sums a * b over
//                          one piece of one slice's outer * inner elements
//                          (a == b: the sum of squares), its threads striding
//                          over the piece, then a fixed shared-memory tree;
//                          one partial per (slice, piece).
//   2. slice_coefs_kernel  one thread per slice: its partials summed in
//                          order, then the forward's norm and scale, or the
//                          backward's grad_g and grad_v coefficients.
//   3. slice_combine_kernel  element-wise, grid-stride: out = x * ca[s]
//                          (+ y * cb[s]), s = (e / inner) % slices.
//
// Deterministic: fixed trees and orders, no atomics (the number of pieces
// depends on the GPU's size). v (and grad_w) are taken as contiguous; half
// and bfloat16 are converted to float before any arithmetic, float64
// computes in double. Element offsets are int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common/input_checks.h"
#include "common/weight_norm_math.h"
#include "common/weight_norm_plan.h"
#include "cuda/kernel_helpers.cuh"

namespace torchnorm::cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void slice_dot_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t slices,
                                 int64_t inner, int64_t slice_len, int64_t piece_len, acc_t* __restrict__ partial) {
  __shared__ acc_t tree[kThreads];
  const int64_t s = blockIdx.x, piece = blockIdx.y;
  const int64_t begin = piece * piece_len, end = min(slice_len, begin + piece_len);
  acc_t sum = acc_t(0);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t e = (j / inner) * slices * inner + s * inner + j % inner;
    sum += static_cast<acc_t>(a[e]) * static_cast<acc_t>(b[e]);
  }
  tree[threadIdx.x] = sum;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) tree[threadIdx.x] += tree[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[s * gridDim.y + piece] = tree[0];
}

// Forward (norms_out given): norms_out[s] = sqrt(dot), ca[s] = the scale,
// cb[s] = 0. Backward: grad_g[s], ca[s] (grad_w's coefficient) and cb[s]
// (v's), from the forward's norms (saved_norms).
template <typename acc_t>
__global__ void slice_coefs_kernel(const acc_t* __restrict__ partial, int64_t slices, int64_t pieces,
                                   const acc_t* __restrict__ g, acc_t* __restrict__ norms_out,
                                   const acc_t* __restrict__ saved_norms, acc_t* __restrict__ grad_g, acc_t eps,
                                   acc_t* __restrict__ ca, acc_t* __restrict__ cb) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= slices) return;
  acc_t dot = acc_t(0);
  for (int64_t p = 0; p < pieces; ++p) dot += partial[s * pieces + p];
  if (norms_out) {
    const acc_t norm = sqrt(dot);
    norms_out[s] = norm;
    ca[s] = weight_norm_scale(g[s], norm, eps);
    cb[s] = acc_t(0);
  } else {
    const auto k = weight_norm_grad_coefs(g[s], saved_norms[s], dot, eps);
    grad_g[s] = k.g_grad;
    ca[s] = k.grad_w_coef;
    cb[s] = k.v_coef;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void slice_combine_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ y, const acc_t* __restrict__ ca,
                                     const acc_t* __restrict__ cb, int64_t numel, int64_t slices, int64_t inner) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = (e / inner) % slices;
    const acc_t xv = static_cast<acc_t>(x[e]);
    const acc_t r = y ? weight_norm_grad_v(xv, static_cast<acc_t>(y[e]), ca[s], cb[s]) : xv * ca[s];
    out[e] = static_cast<scalar_t>(r);
  }
}

// Either direction on the current stream: dot = sum(a * b) per slice, the
// coefficients (forward when grad_g is undefined), then out = x * ca (+ y *
// cb) unless out is undefined.
template <typename scalar_t>
void run_direction(const WeightNormPlan& p, const Tensor& a, const Tensor& b, const Tensor& g_acc,
                   const Tensor& norms, const Tensor& grad_g, double eps, const Tensor& out, const Tensor& x,
                   const Tensor& y) {
  using acc_t = acc_type_of<scalar_t>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t S = p.slices;
  if (S == 0) return;
  const int64_t slice_len = p.outer * p.inner;
  // About four waves of blocks in all, pieces of at least 8 elements a thread.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t pieces = std::clamp<int64_t>(ceil_div(4 * sms, S), 1,
                                             std::min<int64_t>(65535, std::max<int64_t>(1, ceil_div(slice_len, 8 * kThreads))));
  const int64_t piece_len = std::max<int64_t>(1, ceil_div(slice_len, pieces));
  const auto acc_options = a.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Tensor partial = at::empty({S * pieces}, acc_options), ca = at::empty({S}, acc_options),
         cb = at::empty({S}, acc_options);
  slice_dot_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(S), static_cast<unsigned>(pieces)), kThreads, 0,
                                      stream>>>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), S,
                                                p.inner, slice_len, piece_len, partial.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool forward = !grad_g.defined();
  slice_coefs_kernel<acc_t><<<static_cast<unsigned>(ceil_div(S, kThreads)), kThreads, 0, stream>>>(
      partial.const_data_ptr<acc_t>(), S, pieces, g_acc.const_data_ptr<acc_t>(),
      forward ? norms.mutable_data_ptr<acc_t>() : nullptr, forward ? nullptr : norms.const_data_ptr<acc_t>(),
      forward ? nullptr : grad_g.mutable_data_ptr<acc_t>(), acc_t(eps), ca.mutable_data_ptr<acc_t>(),
      cb.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!out.defined() || out.numel() == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(out.numel(), kThreads), 32 * sms);
  slice_combine_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      out.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
      y.defined() ? y.const_data_ptr<scalar_t>() : nullptr, ca.const_data_ptr<acc_t>(), cb.const_data_ptr<acc_t>(),
      out.numel(), S, p.inner);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> weight_norm_cuda(const Tensor& v_in, const Tensor& g, std::optional<int64_t> dim,
                                            double eps) {
  const WeightNormPlan p = check_weight_norm("torchnorm.weight_norm", v_in, g, dim, eps);
  c10::cuda::CUDAGuard guard(v_in.device());
  const Tensor v = v_in.contiguous();
  const auto acc = accumulate_type(v.scalar_type());
  const Tensor g_acc = g.to(acc).contiguous();
  Tensor w = at::empty_like(v);
  Tensor norms = at::empty(g.sizes(), g.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "weight_norm_cuda", [&] {
    run_direction<scalar_t>(p, v, v, g_acc, norms, Tensor(), eps, w, v, Tensor());
  });
  return {w, norms};
}

std::tuple<Tensor, Tensor> weight_norm_backward_cuda(const Tensor& grad_w_in, const Tensor& v_in, const Tensor& g,
                                                     const Tensor& norms, std::optional<int64_t> dim, double eps,
                                                     std::array<bool, 2> output_mask) {
  const WeightNormPlan p =
      check_weight_norm_backward("torchnorm.weight_norm_backward", grad_w_in, v_in, g, norms, dim, eps);
  c10::cuda::CUDAGuard guard(v_in.device());
  const Tensor v = v_in.contiguous(), grad_w = grad_w_in.contiguous();
  const auto acc = accumulate_type(v.scalar_type());
  const Tensor g_acc = g.to(acc).contiguous(), norms_acc = norms.contiguous();
  Tensor grad_v = output_mask[0] ? at::empty_like(v) : empty_placeholder(v, v.scalar_type());
  Tensor grad_g = at::empty(g.sizes(), g.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "weight_norm_backward_cuda", [&] {
    run_direction<scalar_t>(p, grad_w, v, g_acc, norms_acc, grad_g, eps, output_mask[0] ? grad_v : Tensor(), grad_w,
                            v);
  });
  return {grad_v, output_mask[1] ? grad_g.to(g.scalar_type()) : empty_placeholder(v, g.scalar_type())};
}

}  // namespace
}  // namespace torchnorm::cuda

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  m.impl("weight_norm", &torchnorm::cuda::weight_norm_cuda);
  m.impl("weight_norm_backward", &torchnorm::cuda::weight_norm_backward_cuda);
}
