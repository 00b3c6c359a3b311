#pragma once
// BatchNorm's passes on the GPU, shared by batch_norm.cu and
// streaming_norm.cu (Streaming Normalization runs BatchNorm's passes with its
// own per-channel step between them): the reduction kernels (statistics,
// gradient sums) into per-(split, channel) partials and their combination,
// the element-wise forward and backward kernels, and their launches. The
// per-channel finalize kernels, which turn the partials into the element-wise
// coefficients, are each op's own.
//
// Everything here is in an anonymous namespace, on purpose: a __global__
// kernel template instantiated in two translation units would have one host
// stub picked by the linker for both, registered with only one of the two
// fatbinaries (see kernel_helpers.cuh); so each including .cu file gets its
// own copies.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/activations.h"
#include "common/batch_norm_math.h"
#include "common/batch_norm_plan.h"
#include "common/welford.h"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

constexpr int kThreads = 256;  // threads per block, for every kernel here
constexpr int kWarp = 32;
constexpr int kUnroll = 4;  // independent loads each thread issues per iteration of a reduction loop

// Vector packs, ChannelParam, the accumulators (MeanM2, SumPair), their
// workspace layout and block_tree_reduce, the occupancy and launch helpers,
// and the element-wise walk (ChannelWalker, gather_channels) are in
// kernel_helpers.cuh, shared with the per-sample norms; pre_activation and
// pre_activation_grad are in common/batch_norm_math.h.

// ---------------------------------------------------------------------------
// What the reduction kernels accumulate
// ---------------------------------------------------------------------------

// Forward statistics: Welford over x.
template <typename scalar_t>
struct StatsOp {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = MeanM2<acc_t>;
  using Loaded = acc_t;
  struct Channel {};
  static constexpr int kFields = 3;

  const scalar_t* x;

  __device__ __forceinline__ Channel channel(int64_t) const { return {}; }
  __device__ __forceinline__ Loaded load(int64_t i) const { return static_cast<acc_t>(x[i]); }
  __device__ __forceinline__ void add(Acc& a, const Channel&, Loaded v) const { welford_add(a, v); }
};

// Backward sums: sum(dz) and sum(dz * (x - mean)).
template <typename scalar_t>
struct GradOp {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = SumPair<acc_t>;
  struct Loaded {
    acc_t x, dy, r;
  };
  struct Channel {
    acc_t mean, scale, shift;
  };
  static constexpr int kFields = 2;

  const scalar_t* x;
  const scalar_t* dy;
  const scalar_t* residual;  // only when the activation needs z, else nullptr
  ChannelParam<scalar_t> mean, rstd, weight, bias;
  Activation act;
  acc_t slope;

  __device__ __forceinline__ Channel channel(int64_t c) const {
    const auto fc = forward_coefficients(rstd.load(c, acc_t(1)), weight.load(c, acc_t(1)), bias.load(c, acc_t(0)));
    return {mean.load(c, acc_t(0)), fc.scale, fc.shift};
  }
  __device__ __forceinline__ Loaded load(int64_t i) const {
    return {static_cast<acc_t>(x[i]), static_cast<acc_t>(dy[i]),
            residual != nullptr ? static_cast<acc_t>(residual[i]) : acc_t(0)};
  }
  __device__ __forceinline__ void add(Acc& a, const Channel& ch, const Loaded& v) const {
    const acc_t xc = v.x - ch.mean;
    const acc_t dz = pre_activation_grad(act, slope, v.dy, xc, ch.scale, ch.shift, v.r);
    a.dz += dz;
    a.dz_xc += dz * xc;
  }
};

// ---------------------------------------------------------------------------
// Reduction kernels: one partial per (grid row, channel)
// ---------------------------------------------------------------------------

// Planar (N, C, S). grid = (C, n_splits * s_splits), block = (tx, ty) with
// tx * ty = kThreads. Block (c, y) covers the planes n = y_n*ty + threadIdx.y
// (step n_splits*ty) and positions s = y_s*tx + threadIdx.x (step s_splits*tx)
// of channel c: threadIdx.x runs along the contiguous s axis (coalesced), and
// threadIdx.y over planes keeps threads busy when S is small. Splitting a
// channel over several blocks fills the GPU when C is small; the partials are
// combined by the finalize kernel.
template <typename Op>
__global__ void __launch_bounds__(kThreads) planar_reduce_kernel(
    Op op, int64_t N, int64_t C, int64_t S, unsigned s_splits, typename Op::acc_t* __restrict__ partials) {
  using Acc = typename Op::Acc;
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(Acc)];

  const int64_t c = blockIdx.x;
  // 32-bit divisions (gridDim.y < 2^16): a 64-bit one is a subroutine call.
  const int64_t n_splits = gridDim.y / s_splits;
  const int64_t split_n = blockIdx.y / s_splits;
  const int64_t split_s = blockIdx.y % s_splits;
  const int64_t n_step = n_splits * blockDim.y;
  const int64_t s_step = s_splits * blockDim.x;
  const int64_t s_first = split_s * blockDim.x + threadIdx.x;

  const auto ch = op.channel(c);
  Acc acc;
  for (int64_t n = split_n * blockDim.y + threadIdx.y; n < N; n += n_step) {
    const int64_t plane = (n * C + c) * S;
    for (int64_t s = s_first; s < S; s += kUnroll * s_step) {
      // All loads first, then the dependent accumulation, so kUnroll loads
      // per thread are in flight.
      typename Op::Loaded v[kUnroll] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (s + u * s_step < S) v[u] = op.load(plane + s + u * s_step);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (s + u * s_step < S) op.add(acc, ch, v[u]);
      }
    }
  }

  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const Acc total = block_tree_reduce(reinterpret_cast<Acc*>(smem), acc, tid, 0, kThreads, 1);
  if (tid == 0) store_partial(partials, int64_t(gridDim.y) * C, int64_t(blockIdx.y) * C + c, total);
}

// Rowwise (R, C). grid = (ceil(C / bx), row_splits), block = (bx, by) with bx
// a power of two <= 32 and bx * by = kThreads. Thread (tx, ty) owns channel
// c = blockIdx.x*bx + tx and rows r = blockIdx.y*by + ty (step row_splits*by):
// a warp reads consecutive channels of one row, or whole consecutive rows when
// C < 32, so loads are coalesced either way.
template <typename Op>
__global__ void __launch_bounds__(kThreads) rowwise_reduce_kernel(
    Op op, int64_t R, int64_t C, typename Op::acc_t* __restrict__ partials) {
  using Acc = typename Op::Acc;
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(Acc)];

  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  Acc acc;
  if (c < C) {
    const auto ch = op.channel(c);
    const int64_t r_step = int64_t(gridDim.y) * blockDim.y;
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < R; r += kUnroll * r_step) {
      typename Op::Loaded v[kUnroll] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * r_step < R) v[u] = op.load((r + u * r_step) * C + c);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * r_step < R) op.add(acc, ch, v[u]);
      }
    }
  }
  // Every thread takes part in the tree (it synchronizes), idle columns with
  // an empty accumulator.
  const Acc total =
      block_tree_reduce(reinterpret_cast<Acc*>(smem), acc, threadIdx.y, threadIdx.x, blockDim.y, blockDim.x);
  if (threadIdx.y == 0 && c < C) store_partial(partials, int64_t(gridDim.y) * C, int64_t(blockIdx.y) * C + c, total);
}

// ---------------------------------------------------------------------------
// Finalize kernels: one result per channel
// ---------------------------------------------------------------------------

// The finalize kernels use block = (bx, by), bx * by = kThreads, grid =
// ceil(C / bx): threadIdx.x picks the channel (consecutive channels are
// consecutive in the (fields, splits, C) workspace), threadIdx.y strides over
// the splits. by grows with the number of splits (finalize_block), so a few
// channels with many partials each (small C, large N*S) still combine in
// parallel rather than one thread walking hundreds of partials.

// The total of channel c's `splits` partials, in the threads with threadIdx.y == 0.
template <typename Acc, typename acc_t>
__device__ Acc combine_partials(const acc_t* __restrict__ partials, int64_t splits, int64_t C, int64_t c) {
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(Acc)];
  Acc acc;
  if (c < C) {
    for (int64_t k = threadIdx.y; k < splits; k += blockDim.y) {
      Acc p;
      load_partial(partials, splits * C, k * C + c, p);
      acc = merge(acc, p);
    }
  }
  return block_tree_reduce(reinterpret_cast<Acc*>(smem), acc, threadIdx.y, threadIdx.x, blockDim.y, blockDim.x);
}


// Layout of the backward's (6, C) coefficient workspace: mean, scale, shift
// (to recompute z), then grad_input's dz_coef, xc_coef, const_coef.
enum BackwardCoef : int { kMean = 0, kScale, kShift, kDzCoef, kXcCoef, kConstCoef };

// Channel c's column of that workspace (a finalize kernel's output).
template <typename acc_t>
__device__ __forceinline__ void store_backward_coef(acc_t* __restrict__ coef, int64_t C, int64_t c, acc_t mean,
                                                   const ForwardCoefficients<acc_t>& fc,
                                                   const BackwardCoefficients<acc_t>& bc) {
  coef[kMean * C + c] = mean;
  coef[kScale * C + c] = fc.scale;
  coef[kShift * C + c] = fc.shift;
  coef[kDzCoef * C + c] = bc.dz_coef;
  coef[kXcCoef * C + c] = bc.xc_coef;
  coef[kConstCoef * C + c] = bc.const_coef;
}

// ---------------------------------------------------------------------------
// Element-wise kernels
// ---------------------------------------------------------------------------

// act((x - mean) * scale + shift + r): pre_activation's z, as the backward
// recomputes it.
template <typename acc_t>
__device__ __forceinline__ acc_t normalize_one(
    acc_t x, acc_t r, acc_t mean, acc_t scale, acc_t shift, Activation act, acc_t slope) {
  return activation_forward(act, pre_activation(x - mean, scale, shift, r), slope);
}

// out = act((x - mean) * scale + shift + residual), over the flat array; the
// vector loop covers numel / VEC whole vectors and a tail of < VEC elements
// is done one per thread. `packed`: see gather_channels (host-checked,
// including the alignment of mean / scale / shift).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) forward_elementwise_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ residual,  // nullable
    scalar_t* __restrict__ out,
    const acc_type_of<scalar_t>* __restrict__ mean,
    const acc_type_of<scalar_t>* __restrict__ scale,
    const acc_type_of<scalar_t>* __restrict__ shift,
    int64_t numel,
    int64_t S,
    int64_t C,
    bool packed,
    Activation act,
    acc_type_of<scalar_t> slope) {
  using acc_t = acc_type_of<scalar_t>;
  constexpr int G = coef_chunk<scalar_t, VEC>();
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / VEC;
  const bool has_residual = residual != nullptr;

  ChannelWalker walk(tid * VEC, nthreads * VEC, S, C);
  for (int64_t i = tid; i < nvec; i += nthreads) {
    const Pack<scalar_t, VEC> xv = load_pack<VEC>(x, i);
    Pack<scalar_t, VEC> rv{};
    if (has_residual) rv = load_pack<VEC>(residual, i);
    Pack<scalar_t, VEC> ov;
    int64_t s = walk.s, c = walk.c;  // position of element k0
#pragma unroll
    for (int k0 = 0; k0 < VEC; k0 += G) {
      acc_t m[G], sc[G], sh[G];
      gather_channels<G>(mean, s, c, S, C, packed, m);
      gather_channels<G>(scale, s, c, S, C, packed, sc);
      gather_channels<G>(shift, s, c, S, C, packed, sh);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const acc_t r = has_residual ? static_cast<acc_t>(rv.v[k0 + k]) : acc_t(0);
        ov.v[k0 + k] =
            static_cast<scalar_t>(normalize_one(static_cast<acc_t>(xv.v[k0 + k]), r, m[k], sc[k], sh[k], act, slope));
      }
      if (k0 + G < VEC) {
#pragma unroll
        for (int k = 0; k < G; ++k) next_element(s, c, S, C);
      }
    }
    store_pack<VEC>(out, i, ov);
    walk.advance();
  }

  if constexpr (VEC > 1) {
    const int64_t e = nvec * VEC + tid;
    if (e < numel) {
      const int64_t c = (e / S) % C;
      const acc_t r = has_residual ? static_cast<acc_t>(residual[e]) : acc_t(0);
      out[e] = static_cast<scalar_t>(
          normalize_one(static_cast<acc_t>(x[e]), r, mean[c], scale[c], shift[c], act, slope));
    }
  }
}

template <typename acc_t>
struct GradOut {
  acc_t grad_input, grad_residual;
};

// One element of the backward: dz from dy, then grad_residual = dz and
// grad_input = dz * dz_coef + (x - mean) * xc_coef + const_coef.
template <typename acc_t>
__device__ __forceinline__ GradOut<acc_t> backward_one(
    acc_t x, acc_t dy, acc_t r, acc_t mean, acc_t scale, acc_t shift, acc_t dz_coef, acc_t xc_coef,
    acc_t const_coef, Activation act, acc_t slope) {
  const acc_t xc = x - mean;
  const acc_t dz = pre_activation_grad(act, slope, dy, xc, scale, shift, r);
  return {dz * dz_coef + xc * xc_coef + const_coef, dz};
}

// At least 3 resident blocks (<= 80 registers), which every instantiation
// fits; without the bound ptxas picks 64 for half and spills.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads, 3) backward_elementwise_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ dy,
    const scalar_t* __restrict__ residual,  // nullable; given only when the activation needs z
    scalar_t* __restrict__ grad_input,      // nullable
    scalar_t* __restrict__ grad_residual,   // nullable
    const acc_type_of<scalar_t>* __restrict__ coef,
    int64_t numel,
    int64_t S,
    int64_t C,
    bool packed,
    Activation act,
    acc_type_of<scalar_t> slope) {
  using acc_t = acc_type_of<scalar_t>;
  constexpr int G = coef_chunk<scalar_t, VEC>();
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / VEC;
  const bool has_residual = residual != nullptr;
  const bool needs_z = act != Activation::None;
  const bool want_input = grad_input != nullptr;

  ChannelWalker walk(tid * VEC, nthreads * VEC, S, C);
  for (int64_t i = tid; i < nvec; i += nthreads) {
    const Pack<scalar_t, VEC> xv = load_pack<VEC>(x, i);
    const Pack<scalar_t, VEC> dyv = load_pack<VEC>(dy, i);
    Pack<scalar_t, VEC> rv{};
    if (has_residual) rv = load_pack<VEC>(residual, i);
    Pack<scalar_t, VEC> gi, gr;
    int64_t s = walk.s, c = walk.c;  // position of element k0
#pragma unroll
    for (int k0 = 0; k0 < VEC; k0 += G) {
      // Only the coefficients something reads are loaded: scale / shift only
      // to recompute z, the grad_input ones only when grad_input is wanted.
      acc_t m[G], sc[G] = {}, sh[G] = {}, dzc[G] = {}, xcc[G] = {}, cc[G] = {};
      gather_channels<G>(coef + kMean * C, s, c, S, C, packed, m);
      if (needs_z) {
        gather_channels<G>(coef + kScale * C, s, c, S, C, packed, sc);
        gather_channels<G>(coef + kShift * C, s, c, S, C, packed, sh);
      }
      if (want_input) {
        gather_channels<G>(coef + kDzCoef * C, s, c, S, C, packed, dzc);
        gather_channels<G>(coef + kXcCoef * C, s, c, S, C, packed, xcc);
        gather_channels<G>(coef + kConstCoef * C, s, c, S, C, packed, cc);
      }
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const acc_t r = has_residual ? static_cast<acc_t>(rv.v[k0 + k]) : acc_t(0);
        const GradOut<acc_t> g = backward_one(static_cast<acc_t>(xv.v[k0 + k]), static_cast<acc_t>(dyv.v[k0 + k]), r,
                                              m[k], sc[k], sh[k], dzc[k], xcc[k], cc[k], act, slope);
        gi.v[k0 + k] = static_cast<scalar_t>(g.grad_input);
        gr.v[k0 + k] = static_cast<scalar_t>(g.grad_residual);
      }
      if (k0 + G < VEC) {
#pragma unroll
        for (int k = 0; k < G; ++k) next_element(s, c, S, C);
      }
    }
    if (want_input) store_pack<VEC>(grad_input, i, gi);
    if (grad_residual != nullptr) store_pack<VEC>(grad_residual, i, gr);
    walk.advance();
  }

  if constexpr (VEC > 1) {
    const int64_t e = nvec * VEC + tid;
    if (e < numel) {
      const int64_t c = (e / S) % C;
      const acc_t r = has_residual ? static_cast<acc_t>(residual[e]) : acc_t(0);
      const GradOut<acc_t> g = backward_one(
          static_cast<acc_t>(x[e]), static_cast<acc_t>(dy[e]), r, coef[kMean * C + c], coef[kScale * C + c],
          coef[kShift * C + c], coef[kDzCoef * C + c], coef[kXcCoef * C + c], coef[kConstCoef * C + c], act, slope);
      if (want_input) grad_input[e] = static_cast<scalar_t>(g.grad_input);
      if (grad_residual != nullptr) grad_residual[e] = static_cast<scalar_t>(g.grad_residual);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side: launch configuration
// ---------------------------------------------------------------------------

// Runs the reduction of `op` over the input's geometry and returns the
// (Op::kFields, splits, C) workspace of partials.
template <typename Op>
at::Tensor launch_reduce(const Op& op, const ChannelGeometry& g, const at::TensorOptions& acc_options,
                         cudaStream_t stream) {
  using acc_t = typename Op::acc_t;
  at::Tensor partials;
  if (g.layout == Layout::Planar) {
    static const int per_sm = blocks_per_sm(planar_reduce_kernel<Op>);
    TORCH_CHECK(g.C <= std::numeric_limits<int32_t>::max(), "torchnorm: too many channels (", g.C, ")");
    int tx = 1;  // smallest power of two >= S, at most kThreads
    while (tx < kThreads && tx < g.S) tx *= 2;
    const int ty = kThreads / tx;
    // Blocks per channel so that C * per_channel is about one wave; split the
    // planes first, then each plane's positions.
    const int64_t per_channel = std::min<int64_t>(ceil_div(wave_blocks(per_sm), g.C), 16384);
    const int64_t n_splits = std::min(ceil_div(g.N, ty), per_channel);
    const int64_t s_splits = std::min(ceil_div(g.S, tx), ceil_div(per_channel, n_splits));
    // n_splits * s_splits < 2 * per_channel <= 32768: fits gridDim.y.
    const dim3 block(tx, ty);
    const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(n_splits * s_splits));
    partials = at::empty({Op::kFields, int64_t(grid.y), g.C}, acc_options);
    planar_reduce_kernel<Op><<<grid, block, 0, stream>>>(
        op, g.N, g.C, g.S, static_cast<unsigned>(s_splits), partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    static const int per_sm = blocks_per_sm(rowwise_reduce_kernel<Op>);
    const int64_t R = g.N * g.S;
    int bx = 1;  // smallest power of two >= C, at most a warp
    while (bx < kWarp && bx < g.C) bx *= 2;
    const int by = kThreads / bx;
    const int64_t col_tiles = ceil_div(g.C, bx);
    TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), "torchnorm: too many channels (", g.C, ")");
    const int64_t row_splits =
        std::max<int64_t>(1, std::min({ceil_div(R, by), ceil_div(wave_blocks(per_sm), col_tiles), int64_t(65535)}));
    const dim3 block(bx, by);
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_splits));
    partials = at::empty({Op::kFields, row_splits, g.C}, acc_options);
    rowwise_reduce_kernel<Op><<<grid, block, 0, stream>>>(op, R, g.C, partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return partials;
}

dim3 finalize_grid(const dim3& block, int64_t C) {
  return dim3(static_cast<unsigned>(ceil_div(C, block.x)));
}

// Geometry of the flat element-wise view: element e is in channel (e / S) % C.
int64_t flat_spatial(const ChannelGeometry& g) {
  return g.layout == Layout::Planar ? g.S : 1;
}

template <typename scalar_t>
void launch_forward_elementwise(const ForwardPlan& p, const acc_type_of<scalar_t>* mean,
                                const acc_type_of<scalar_t>* scale, const acc_type_of<scalar_t>* shift,
                                double negative_slope, cudaStream_t stream) {
  using acc_t = acc_type_of<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t numel = p.x.numel();
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const scalar_t* residual = p.residual.defined() ? p.residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = p.out.mutable_data_ptr<scalar_t>();
  const int64_t S = flat_spatial(p.g);
  const acc_t slope = static_cast<acc_t>(negative_slope);
  const bool vectorize =
      is_aligned16(x) && is_aligned16(out) && (residual == nullptr || is_aligned16(residual));
  if (vectorize) {
    const bool packed = packed_channels<coef_chunk<scalar_t, kVec>(), acc_t>(p.g, {mean, scale, shift});
    launch_elementwise<forward_elementwise_kernel<scalar_t, kVec>, kVec, kThreads>(
        numel, stream, x, residual, out, mean, scale, shift, numel, S, p.g.C, packed, p.activation, slope);
  } else {
    launch_elementwise<forward_elementwise_kernel<scalar_t, 1>, 1, kThreads>(
        numel, stream, x, residual, out, mean, scale, shift, numel, S, p.g.C, /*packed=*/false, p.activation, slope);
  }
}

// grad_input and/or grad_residual (those the plan has) from the backward's
// (6, C) coefficients (BackwardCoef); res is the residual when the
// activation needs z, else null.
template <typename scalar_t>
void launch_backward_elementwise(const BackwardPlan& p, const scalar_t* res, const acc_type_of<scalar_t>* coef_ptr,
                                 acc_type_of<scalar_t> slope, cudaStream_t stream) {
  using acc_t = acc_type_of<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const ChannelGeometry& g = p.g;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = p.grad_out.const_data_ptr<scalar_t>();
  scalar_t* gi = p.grad_input.numel() > 0 ? p.grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gr = p.grad_residual.numel() > 0 ? p.grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t numel = p.x.numel();
  const int64_t S = flat_spatial(g);
  const bool vectorize = is_aligned16(x) && is_aligned16(dy) && (res == nullptr || is_aligned16(res)) &&
      (gi == nullptr || is_aligned16(gi)) && (gr == nullptr || is_aligned16(gr));
  if (vectorize) {
    // Every row of coef is aligned when coef is and C % G == 0.
    const bool packed = packed_channels<coef_chunk<scalar_t, kVec>(), acc_t>(g, {coef_ptr});
    launch_elementwise<backward_elementwise_kernel<scalar_t, kVec>, kVec, kThreads>(
        numel, stream, x, dy, res, gi, gr, coef_ptr, numel, S, g.C, packed, p.activation, slope);
  } else {
    launch_elementwise<backward_elementwise_kernel<scalar_t, 1>, 1, kThreads>(
        numel, stream, x, dy, res, gi, gr, coef_ptr, numel, S, g.C, /*packed=*/false, p.activation, slope);
  }
}

}  // namespace
}  // namespace torchnorm
