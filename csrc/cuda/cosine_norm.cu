// CUDA kernels of Cosine Normalization (cosine_linear, cosine_conv2d and
// their backwards): the backend half of common/cosine_norm_plan.h, whose
// drivers run ATen's dot product (matmul or convolution) and these. They
// mirror csrc/cpu/cosine_norm.cpp with the same per-element math
// (common/cosine_norm_math.h) in the plainest form that is right:
//
//   norms      the group's channel sum of x^2 per input position (a thread
//              per position; a block per row when a sample has one position,
//              as a linear layer's), then one thread per output position
//              adding its window's taps; weight rows: a block per row.
//   output     one thread per element: y = dot * rw[o] * rx[n, g, p], after
//              the norms (the CPU fuses the two per (sample, group)).
//   backward   gd the same way from dy; q (per patch) one thread per output
//              position looping over the group's channels; t and sum(gd)
//              (per output channel) one block per channel, a fixed tree;
//              the norm term of grad_x one thread per input position, which
//              gathers q from the outputs whose window covers it
//              (Window1d::source) and subtracts x * that from each of the
//              group's channels; grad_w -= w * t per element.
//
// Deterministic: no atomics, every sum in a fixed order. Half and bfloat16
// are converted to float before any arithmetic; float64 computes in double.
// Element offsets are int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common/cosine_norm_math.h"
#include "common/cosine_norm_plan.h"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

// A grid-stride loop's grid for n items.
unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::min(ceil_div(n, kThreads), kMaxBlocks)); }

#define TN_GRID_STRIDE(i, n)                                                                   \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);                   \
       i += int64_t(blockDim.x) * gridDim.x)

// The shape a kernel needs (CosineGeometry without its methods).
struct Shape {
  int64_t N, C, HW, W, O, G, Cg, Og, P, Wo;
  Window1d rows, cols;
};

Shape shape_of(const CosineGeometry& g) {
  return {g.N, g.C, g.HW(), g.W, g.O, g.G, g.Cg(), g.Og(), g.P(), g.Wo(), g.rows, g.cols};
}

// Sums each of v[0..N) over the block (kThreads threads) with a fixed tree;
// every thread gets the totals.
template <int N, typename acc_t>
__device__ void block_sum(acc_t (&v)[N], acc_t (*sm)[kThreads]) {
  for (int k = 0; k < N; ++k) sm[k][threadIdx.x] = v[k];
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      for (int k = 0; k < N; ++k) sm[k][threadIdx.x] += sm[k][threadIdx.x + half];
    }
    __syncthreads();
  }
  for (int k = 0; k < N; ++k) v[k] = sm[k][0];
}

// ------------------------------------------------------------ the norms --

// sums[r] = sum of the squares of row r (rows of len contiguous elements); a block per row.
template <typename scalar_t, typename acc_t>
__global__ void row_sum_of_squares_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t len,
                                          acc_t* __restrict__ sums) {
  __shared__ acc_t sm[1][kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    acc_t v[1] = {acc_t(0)};
    for (int64_t k = threadIdx.x; k < len; k += kThreads) {
      const acc_t a = static_cast<acc_t>(x[r * len + k]);
      v[0] += a * a;
    }
    block_sum(v, sm);
    if (threadIdx.x == 0) sums[r] = v[0];
    __syncthreads();  // sm is reused by the next row
  }
}

// plane[ng, p] = sum over the group's Cg channels of x^2 at input position p.
template <typename scalar_t, typename acc_t>
__global__ void channel_sum_of_squares_kernel(const scalar_t* __restrict__ x, Shape s, acc_t* __restrict__ plane) {
  TN_GRID_STRIDE(i, s.N * s.G * s.HW) {
    const int64_t ng = i / s.HW, p = i - ng * s.HW;
    acc_t sum = 0;
    for (int64_t c = 0; c < s.Cg; ++c) {
      const acc_t a = static_cast<acc_t>(x[(ng * s.Cg + c) * s.HW + p]);
      sum += a * a;
    }
    plane[i] = sum;
  }
}

// rx[ng, ho, wo] = cosine_rnorm(sum of plane[ng] over the window at (ho, wo) + constant, eps).
template <typename acc_t>
__global__ void patch_rnorm_kernel(const acc_t* __restrict__ plane, Shape s, acc_t constant, acc_t eps,
                                   acc_t* __restrict__ rx) {
  TN_GRID_STRIDE(i, s.N * s.G * s.P) {
    const int64_t ng = i / s.P, ho = (i - ng * s.P) / s.Wo, wo = i - ng * s.P - ho * s.Wo;
    acc_t sum = 0;
    for (int64_t a = 0; a < s.rows.size; ++a) {
      const int64_t h = s.rows.tap(ho, a);
      if (h < 0 || h >= s.rows.in) continue;
      for (int64_t b = 0; b < s.cols.size; ++b) {
        const int64_t w = s.cols.tap(wo, b);
        if (w >= 0 && w < s.cols.in) sum += plane[ng * s.HW + h * s.W + w];
      }
    }
    rx[i] = cosine_rnorm(sum + constant, eps);
  }
}

// rw[o] = cosine_rnorm(sums[o] + bias[o]^2, eps)
template <typename scalar_t, typename acc_t>
__global__ void weight_rnorm_kernel(const acc_t* __restrict__ sums, const scalar_t* __restrict__ bias, int64_t O,
                                    acc_t eps, acc_t* __restrict__ rw) {
  TN_GRID_STRIDE(o, O) {
    const acc_t b = bias ? static_cast<acc_t>(bias[o]) : acc_t(0);
    rw[o] = cosine_rnorm(sums[o] + b * b, eps);
  }
}

template <typename scalar_t>
const scalar_t* optional_data(const std::optional<Tensor>& t) {
  return t ? t->const_data_ptr<scalar_t>() : nullptr;
}

void input_rnorm_cuda(const Tensor& x, const CosineGeometry& g, double constant, double eps, const Tensor& rx) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const Shape s = shape_of(g);
  if (rx.numel() == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cosine_input_rnorm_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    Tensor plane = at::empty({s.N * s.G * s.HW}, rx.options());
    if (s.HW == 1) {  // one position per sample: each (n, g) is a contiguous row of Cg
      row_sum_of_squares_kernel<scalar_t, acc_t><<<grid_for(s.N * s.G * kThreads), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), s.N * s.G, s.Cg, plane.mutable_data_ptr<acc_t>());
    } else {
      channel_sum_of_squares_kernel<scalar_t, acc_t><<<grid_for(s.N * s.G * s.HW), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), s, plane.mutable_data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    patch_rnorm_kernel<acc_t><<<grid_for(rx.numel()), kThreads, 0, stream>>>(
        plane.const_data_ptr<acc_t>(), s, acc_t(constant), acc_t(eps), rx.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void weight_rnorm_cuda(const Tensor& w, const std::optional<Tensor>& bias, double eps, const Tensor& rw) {
  const at::cuda::OptionalCUDAGuard guard(w.device());
  const int64_t O = w.size(0), K = w.size(1);
  if (O == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "cosine_weight_rnorm_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    Tensor sums = at::empty({O}, rw.options());
    row_sum_of_squares_kernel<scalar_t, acc_t><<<grid_for(O * kThreads), kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), O, K, sums.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    weight_rnorm_kernel<scalar_t, acc_t><<<grid_for(O), kThreads, 0, stream>>>(
        sums.const_data_ptr<acc_t>(), optional_data<scalar_t>(bias), O, acc_t(eps), rw.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ------------------------------------------------------------ the output --

// out[n, o, p] = cosine_scale(in[n, o, p], rw[o], rx[n, o / Og, p]); out may be in.
template <typename scalar_t, typename acc_t>
__global__ void scale_kernel(const scalar_t* in, const acc_t* __restrict__ rw, const acc_t* __restrict__ rx, Shape s,
                             scalar_t* out) {
  TN_GRID_STRIDE(i, s.N * s.O * s.P) {
    const int64_t no = i / s.P, p = i - no * s.P, n = no / s.O, o = no - n * s.O;
    out[i] = static_cast<scalar_t>(
        cosine_scale(static_cast<acc_t>(in[i]), rw[o], rx[(n * s.G + o / s.Og) * s.P + p]));
  }
}

void scale_cuda(const Tensor& in, const Tensor& rw, const Tensor& rx, const CosineGeometry& g, const Tensor& out) {
  const at::cuda::OptionalCUDAGuard guard(in.device());
  if (in.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "cosine_scale_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    scale_kernel<scalar_t, acc_t><<<grid_for(in.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        in.const_data_ptr<scalar_t>(), rw.const_data_ptr<acc_t>(), rx.const_data_ptr<acc_t>(), shape_of(g),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void normalize_cuda(const Tensor& x, const Tensor& rw, const CosineGeometry& g, double constant, double eps,
                    const Tensor& rx, const Tensor& y) {
  input_rnorm_cuda(x, g, constant, eps, rx);
  scale_cuda(y, rw, rx, g, y);
}

// ------------------------------------------------------- gradient sums --

// q[n, g, p] = rx^2 * sum over the group's o of dy * y at (n, o, p).
template <typename scalar_t, typename acc_t>
__global__ void patch_grad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                                  const acc_t* __restrict__ rx, Shape s, acc_t* __restrict__ q) {
  TN_GRID_STRIDE(i, s.N * s.G * s.P) {
    const int64_t ng = i / s.P, p = i - ng * s.P, n = ng / s.G, g = ng - n * s.G;
    acc_t sum = 0;
    for (int64_t o = g * s.Og; o < (g + 1) * s.Og; ++o) {
      const int64_t e = (n * s.O + o) * s.P + p;
      sum += static_cast<acc_t>(dy[e]) * static_cast<acc_t>(y[e]);
    }
    q[i] = cosine_norm_grad_coefficient(rx[i], sum);
  }
}

// t[o] = rw^2 * sum over n, p of dy * y; sum_gd[o] = sum over n, p of gd; a block per o.
template <typename scalar_t, typename acc_t>
__global__ void channel_grad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                                    const scalar_t* __restrict__ gd, const acc_t* __restrict__ rw, Shape s,
                                    acc_t* __restrict__ t, acc_t* __restrict__ sum_gd) {
  __shared__ acc_t sm[2][kThreads];
  for (int64_t o = blockIdx.x; o < s.O; o += gridDim.x) {
    acc_t v[2] = {acc_t(0), acc_t(0)};
    for (int64_t j = threadIdx.x; j < s.N * s.P; j += kThreads) {
      const int64_t n = j / s.P, e = (n * s.O + o) * s.P + (j - n * s.P);
      v[0] += static_cast<acc_t>(dy[e]) * static_cast<acc_t>(y[e]);
      v[1] += static_cast<acc_t>(gd[e]);
    }
    block_sum(v, sm);
    if (threadIdx.x == 0) {
      t[o] = cosine_norm_grad_coefficient(rw[o], v[0]);
      sum_gd[o] = v[1];
    }
    __syncthreads();  // sm is reused by the next channel
  }
}

void grad_sums_cuda(const Tensor& dy, const Tensor& y, const Tensor& rw, const Tensor& rx, const CosineGeometry& g,
                    const Tensor& gd, const Tensor& q, const Tensor& t, const Tensor& sum_gd) {
  scale_cuda(dy, rw, rx, g, gd);
  const at::cuda::OptionalCUDAGuard guard(dy.device());
  const Shape s = shape_of(g);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "cosine_grad_sums_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    if (q.numel() > 0) {
      patch_grad_kernel<scalar_t, acc_t><<<grid_for(q.numel()), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), rx.const_data_ptr<acc_t>(), s,
          q.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (s.O > 0) {
      channel_grad_kernel<scalar_t, acc_t><<<grid_for(s.O * kThreads), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), gd.const_data_ptr<scalar_t>(),
          rw.const_data_ptr<acc_t>(), s, t.mutable_data_ptr<acc_t>(), sum_gd.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// --------------------------------------------------- the norms' terms --

// grad_x[n, c, h, w] -= x * Q, Q = the sum of q[n, g] over the output
// positions whose window covers (h, w); a thread per (n, g, h, w), looping
// over the group's channels.
template <typename scalar_t, typename acc_t>
__global__ void input_norm_grad_kernel(scalar_t* __restrict__ gx, const scalar_t* __restrict__ x,
                                       const acc_t* __restrict__ q, Shape s) {
  TN_GRID_STRIDE(i, s.N * s.G * s.HW) {
    const int64_t ng = i / s.HW, hw = i - ng * s.HW, h = hw / s.W, w = hw - h * s.W;
    acc_t sum = 0;
    for (int64_t a = 0; a < s.rows.size; ++a) {
      const int64_t ho = s.rows.source(h, a);
      if (ho < 0) continue;
      for (int64_t b = 0; b < s.cols.size; ++b) {
        const int64_t wo = s.cols.source(w, b);
        if (wo >= 0) sum += q[ng * s.P + ho * s.Wo + wo];
      }
    }
    for (int64_t c = 0; c < s.Cg; ++c) {
      const int64_t e = (ng * s.Cg + c) * s.HW + hw;
      gx[e] = static_cast<scalar_t>(static_cast<acc_t>(gx[e]) - static_cast<acc_t>(x[e]) * sum);
    }
  }
}

void input_norm_grad_cuda(const Tensor& grad_x, const Tensor& x, const Tensor& q, const CosineGeometry& g) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const Shape s = shape_of(g);
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cosine_input_norm_grad_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    input_norm_grad_kernel<scalar_t, acc_t>
        <<<grid_for(s.N * s.G * s.HW), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            grad_x.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), q.const_data_ptr<acc_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_w[o, k] -= w[o, k] * t[o]
template <typename scalar_t, typename acc_t>
__global__ void weight_norm_grad_kernel(scalar_t* __restrict__ gw, const scalar_t* __restrict__ w,
                                        const acc_t* __restrict__ t, int64_t O, int64_t K) {
  TN_GRID_STRIDE(i, O * K) {
    gw[i] = static_cast<scalar_t>(static_cast<acc_t>(gw[i]) - static_cast<acc_t>(w[i]) * t[i / K]);
  }
}

// grad_b[o] = sum_gd[o] - bias[o] * t[o]
template <typename scalar_t, typename acc_t>
__global__ void bias_grad_kernel(scalar_t* __restrict__ gb, const scalar_t* __restrict__ bias,
                                 const acc_t* __restrict__ t, const acc_t* __restrict__ sum_gd, int64_t O) {
  TN_GRID_STRIDE(o, O) { gb[o] = static_cast<scalar_t>(sum_gd[o] - static_cast<acc_t>(bias[o]) * t[o]); }
}

void weight_norm_grad_cuda(const Tensor& grad_w, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& t,
                           const Tensor& sum_gd, const Tensor& grad_b) {
  const at::cuda::OptionalCUDAGuard guard(w.device());
  const int64_t O = w.size(0), K = w.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "cosine_weight_norm_grad_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    if (grad_w.defined() && O * K > 0) {
      weight_norm_grad_kernel<scalar_t, acc_t><<<grid_for(O * K), kThreads, 0, stream>>>(
          grad_w.mutable_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), t.const_data_ptr<acc_t>(), O, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grad_b.defined() && O > 0) {
      bias_grad_kernel<scalar_t, acc_t><<<grid_for(O), kThreads, 0, stream>>>(
          grad_b.mutable_data_ptr<scalar_t>(), bias->const_data_ptr<scalar_t>(), t.const_data_ptr<acc_t>(),
          sum_gd.const_data_ptr<acc_t>(), O);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

const CosineKernels kCudaKernels{weight_rnorm_cuda, normalize_cuda, grad_sums_cuda, input_norm_grad_cuda,
                                 weight_norm_grad_cuda};

}  // namespace
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  using Ops = torchnorm::CosineOps<torchnorm::kCudaKernels>;
  m.impl("cosine_linear", &Ops::linear);
  m.impl("cosine_linear_backward", &Ops::linear_backward);
  m.impl("cosine_conv2d", &Ops::conv2d);
  m.impl("cosine_conv2d_backward", &Ops::conv2d_backward);
}
