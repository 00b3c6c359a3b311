// CUDA kernels of torchnorm's BatchNorm ops: batch_norm_train, batch_norm_eval,
// batch_norm_apply (normalize with given mean and rstd) and
// batch_norm_backward. Argument checks, layout classification and output
// allocation are done by plan_forward / plan_apply / plan_backward
// (common/batch_norm_plan.h); the per-element math comes from common/
// (welford.h, batch_norm_math.h, activations.h), so the CPU and CUDA kernels
// compute the same functions; the element-wise walks, coefficient gathers and
// launch helpers from kernel_helpers.cuh, shared with group_norm.cu.
//
// Memory traffic (n = N*C*S elements; per-channel data is O(C) and ignored):
//
//   batch_norm_train: 2 reads of x, 1 write of out (+1 read of residual).
//     1. reduce    read x once. Each thread runs Welford over its elements,
//                  a block Chan-combines its threads into one partial
//                  (count, mean, M2) per channel, written to a workspace.
//     2. finalize  per channel: combine the partials, write mean / rstd,
//                  update the running statistics, and precompute the
//                  normalize coefficients (scale = weight*rstd, shift = bias).
//     3. normalize read x (+ residual), write out = act((x-mean)*scale+shift+r).
//     Reading x once would need it kept on chip between 1 and 3 (a persistent
//     cooperative kernel); x is re-read instead (from L2 when it fits there).
//
//   batch_norm_eval, batch_norm_apply: 1 read of x (+ residual), 1 write of
//     out, after a tiny per-channel kernel that turns the running statistics
//     (or the given mean and rstd) into coefficients.
//
//   batch_norm_backward: reduce pass reads x and dy (+ residual when an
//     activation needs the pre-activation z) for sum(dz) and sum(dz*(x-mean));
//     finalize writes grad_weight / grad_bias and the grad_input coefficients;
//     an element-wise pass reads x, dy (+ residual) and writes grad_input
//     and/or grad_residual. The reduce pass runs only when something needs the
//     sums (grad_weight, grad_bias, or grad_input in training), so an eval-mode
//     grad_input costs a single pass.
//
// Layouts (ChannelGeometry): Planar = (N, C, S) contiguous, Rowwise = (R, C)
// with R = N*S rows (channels_last or 2-D input). The reductions have one
// kernel per layout; the element-wise kernels treat both as a flat array whose
// element e is in channel (e / S) % C (Rowwise is the case S = 1).
//
// Templates: reductions per input dtype x layout x {statistics, gradient
// sums}, element-wise kernels per dtype x {16-byte vector, scalar} x
// {forward, backward}, finalize kernels per dtype (44 kernels in all). The
// parameter dtype (input dtype or float32), the activation and the optional
// tensors are run-time switches: parameters are read once per channel per
// block or thread, and the activation switch is uniform across a launch.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "common/activations.h"
#include "common/batch_norm_plan.h"
#include "common/batch_norm_math.h"
#include "common/sync_batch_norm_math.h"
#include "common/sync_batch_norm_plan.h"
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

// Training forward: batch mean / rstd, running statistics, and the normalize
// coefficients. `count` is N*S, exact, rather than the partials' summed count
// (a float count stops being exact above 2^24).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,
    int64_t splits,
    int64_t C,
    acc_type_of<scalar_t> count,
    acc_type_of<scalar_t> eps,
    acc_type_of<scalar_t> momentum,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    ChannelParam<scalar_t> running_mean,
    ChannelParam<scalar_t> running_var,
    acc_type_of<scalar_t>* __restrict__ mean_out,
    acc_type_of<scalar_t>* __restrict__ rstd_out,
    acc_type_of<scalar_t>* __restrict__ scale_out,
    acc_type_of<scalar_t>* __restrict__ shift_out) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const MeanM2<acc_t> total = combine_partials<MeanM2<acc_t>>(partials, splits, C, c);
  if (threadIdx.y != 0 || c >= C) return;

  const acc_t rstd = rstd_from_var(total.m2 / count, eps);  // biased variance normalizes
  mean_out[c] = total.mean;
  rstd_out[c] = rstd;
  const auto fc = forward_coefficients(rstd, weight.load(c, acc_t(1)), bias.load(c, acc_t(0)));
  scale_out[c] = fc.scale;
  shift_out[c] = fc.shift;
  if (running_mean.present()) {
    acc_t rm = running_mean.load(c, acc_t(0));
    acc_t rv = running_var.load(c, acc_t(1));
    update_running_stats(rm, rv, total.mean, total.m2, count, momentum);
    running_mean.store(c, rm);
    running_var.store(c, rv);
  }
}

// Eval forward: coefficients from given statistics. coef is (3, C): mean,
// scale, shift. `stats` is the running variance (batch_norm_eval), or rstd
// itself when stats_are_rstd (batch_norm_apply).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) eval_coefficients_kernel(
    int64_t C,
    acc_type_of<scalar_t> eps,
    bool stats_are_rstd,
    ChannelParam<scalar_t> running_mean,
    ChannelParam<scalar_t> stats,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    acc_type_of<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t given = stats.load(c, acc_t(1));
  const acc_t rstd = stats_are_rstd ? given : rstd_from_var(given, eps);
  const auto fc = forward_coefficients(rstd, weight.load(c, acc_t(1)), bias.load(c, acc_t(0)));
  coef[c] = running_mean.load(c, acc_t(0));
  coef[C + c] = fc.scale;
  coef[2 * C + c] = fc.shift;
}

// Layout of the backward's (6, C) coefficient workspace: mean, scale, shift
// (to recompute z), then grad_input's dz_coef, xc_coef, const_coef.
enum BackwardCoef : int { kMean = 0, kScale, kShift, kDzCoef, kXcCoef, kConstCoef };

// Backward: grad_weight / grad_bias (when wanted) and the coefficients of the
// element-wise pass (coef, laid out as BackwardCoef). With splits == 0 (no reduction
// was needed) the sums are zero, which only the unused training terms read.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,
    int64_t splits,
    int64_t C,
    acc_type_of<scalar_t> count,
    bool training,
    ChannelParam<scalar_t> mean,
    ChannelParam<scalar_t> rstd,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    ChannelParam<scalar_t> grad_weight,
    ChannelParam<scalar_t> grad_bias,
    acc_type_of<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const SumPair<acc_t> sums = combine_partials<SumPair<acc_t>>(partials, splits, C, c);
  if (threadIdx.y != 0 || c >= C) return;

  const acc_t m = mean.load(c, acc_t(0));
  const acc_t r = rstd.load(c, acc_t(1));
  const acc_t w = weight.load(c, acc_t(1));
  if (grad_weight.present()) grad_weight.store(c, sums.dz_xc * r);
  if (grad_bias.present()) grad_bias.store(c, sums.dz);
  const auto fc = forward_coefficients(r, w, bias.load(c, acc_t(0)));
  const auto bc = backward_coefficients(training, r, w, sums.dz, sums.dz_xc, count);
  coef[kMean * C + c] = m;
  coef[kScale * C + c] = fc.scale;
  coef[kShift * C + c] = fc.shift;
  coef[kDzCoef * C + c] = bc.dz_coef;
  coef[kXcCoef * C + c] = bc.xc_coef;
  coef[kConstCoef * C + c] = bc.const_coef;
}


// ---------------------------------------------------------------------------
// SyncBatchNorm's per-rank pieces (docs/sync_batch_norm.md); per-channel math
// from common/sync_batch_norm_math.h, as the CPU kernels.
// ---------------------------------------------------------------------------

// batch_norm_stats: the float64 (3, C) [count; mean; M2] total of a
// reduction's partials, with the exact count.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) stats_total_kernel(
    const acc_t* __restrict__ partials, int64_t splits, int64_t C, int64_t count, double* __restrict__ out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const MeanM2<acc_t> total = combine_partials<MeanM2<acc_t>>(partials, splits, C, c);
  if (threadIdx.y != 0 || c >= C) return;
  out[c] = static_cast<double>(count);
  out[C + c] = static_cast<double>(total.mean);
  out[2 * C + c] = static_cast<double>(total.m2);
}

// batch_norm_gather_stats: one thread per channel merges the W partials in
// order (W is the world size: small), as the CPU kernel. running_mean and
// running_var (acc_t, nullable) are updated in place.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) gather_stats_kernel(
    const acc_t* __restrict__ table, int64_t W, int64_t C, acc_t eps, acc_t momentum, acc_t* running_mean,
    acc_t* running_var, acc_t* __restrict__ mean, acc_t* __restrict__ rstd, acc_t* __restrict__ count) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const bool update = running_mean != nullptr;
  acc_t rm = update ? running_mean[c] : acc_t(0), rv = update ? running_var[c] : acc_t(1);
  const MergedChannel<acc_t> m = finish_merged(merge_partials(table, W, C, c), eps, update, momentum, rm, rv);
  mean[c] = m.mean;
  rstd[c] = m.rstd;
  count[c] = m.count;
  if (update) {
    running_mean[c] = rm;
    running_var[c] = rv;
  }
}

// batch_norm_backward_elemt: the (6, C) BackwardCoef workspace from the
// global statistics and gradient means.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) elemt_coefficients_kernel(
    int64_t C, ChannelParam<scalar_t> mean, ChannelParam<scalar_t> rstd, ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias, ChannelParam<scalar_t> mean_dz, ChannelParam<scalar_t> mean_dz_xhat,
    acc_type_of<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t r = rstd.load(c, acc_t(1));
  const acc_t w = weight.load(c, acc_t(1));
  const auto fc = forward_coefficients(r, w, bias.load(c, acc_t(0)));
  const auto bc = global_backward_coefficients(r, w, mean_dz.load(c, acc_t(0)), mean_dz_xhat.load(c, acc_t(0)));
  coef[kMean * C + c] = mean.load(c, acc_t(0));
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

// grad_input and / or grad_residual (those p allocated) from the (6, C)
// BackwardCoef workspace coef; res is the residual when the activation needs
// z, else nullptr.
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

// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    double momentum,
    double eps,
    c10::string_view activation,
    double negative_slope,
    const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  const ForwardPlan p = plan_forward("torchnorm.batch_norm_train", input, weight, bias, running_mean, running_var,
                                     residual, /*training=*/true, eps, std::string(activation));
  const ChannelGeometry& g = p.g;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  const int64_t count = g.count_per_channel();
  if (count == 0) {
    // Empty batch: no statistics to take, running stats stay as they are.
    return {p.out, at::zeros({g.C}, acc_options), at::zeros({g.C}, acc_options)};
  }
  at::Tensor mean = at::empty({g.C}, acc_options);
  at::Tensor rstd = at::empty({g.C}, acc_options);
  at::Tensor coef = at::empty({2, g.C}, acc_options);  // scale, shift

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_train", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    StatsOp<scalar_t> op{p.x.const_data_ptr<scalar_t>()};
    const at::Tensor partials = launch_reduce(op, g, acc_options, stream);

    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    const dim3 block = finalize_block(partials.size(1), kThreads);
    stats_finalize_kernel<scalar_t><<<finalize_grid(block, g.C), block, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), partials.size(1), g.C, static_cast<acc_t>(count),
        static_cast<acc_t>(eps), static_cast<acc_t>(momentum), channel_param<scalar_t>(weight, false),
        channel_param<scalar_t>(bias, false), channel_param<scalar_t>(running_mean, true),
        channel_param<scalar_t>(running_var, true), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(),
        coef_ptr, coef_ptr + g.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    launch_forward_elementwise<scalar_t>(p, mean.const_data_ptr<acc_t>(), coef_ptr, coef_ptr + g.C, negative_slope,
                                         stream);
  });
  return {p.out, mean, rstd};
}

// act((x - mean) * rstd * weight + bias + residual) into p.out; `stats` is a
// variance, or rstd when stats_are_rstd (see eval_coefficients_kernel).
at::Tensor normalize_with_statistics(const ForwardPlan& p, const at::Tensor& mean, const at::Tensor& stats,
                                     bool stats_are_rstd, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, double eps, double negative_slope) {
  if (p.x.numel() == 0) return p.out;
  const ChannelGeometry& g = p.g;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  at::Tensor coef = at::empty({3, g.C}, acc_options);  // mean, scale, shift

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_eval", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    eval_coefficients_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(g.C, kThreads)), kThreads, 0, stream>>>(
        g.C, static_cast<acc_t>(eps), stats_are_rstd, channel_param<scalar_t>(mean, false),
        channel_param<scalar_t>(stats, false), channel_param<scalar_t>(weight, false),
        channel_param<scalar_t>(bias, false), coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_forward_elementwise<scalar_t>(p, coef_ptr, coef_ptr + g.C, coef_ptr + 2 * g.C, negative_slope, stream);
  });
  return p.out;
}

at::Tensor batch_norm_eval_cuda(
    const at::Tensor& input,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    c10::string_view activation,
    double negative_slope,
    const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  const ForwardPlan p = plan_forward("torchnorm.batch_norm_eval", input, weight, bias, running_mean, running_var,
                                     residual, /*training=*/false, eps, std::string(activation));
  return normalize_with_statistics(p, running_mean, running_var, /*stats_are_rstd=*/false, weight, bias, eps,
                                   negative_slope);
}

at::Tensor batch_norm_apply_cuda(
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    c10::string_view activation,
    double negative_slope,
    const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  const ForwardPlan p = plan_apply(input, mean, rstd, weight, bias, residual, std::string(activation));
  return normalize_with_statistics(p, mean, rstd, /*stats_are_rstd=*/true, weight, bias, 0.0, negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    bool training,
    c10::string_view activation,
    double negative_slope,
    std::array<bool, 4> output_mask) {
  c10::cuda::CUDAGuard guard(input.device());
  BackwardPlan p = plan_backward(grad_output, input, weight, bias, residual, mean, rstd, std::string(activation),
                                 output_mask);
  const ChannelGeometry& g = p.g;
  const bool want_input = output_mask[0], want_weight = output_mask[1], want_bias = output_mask[2],
             want_residual = output_mask[3];
  const auto result = [&] { return std::make_tuple(p.grad_input, p.grad_weight, p.grad_bias, p.grad_residual); };
  const int64_t count = g.count_per_channel();
  if (count == 0) {
    // Sums over an empty batch are zero; grad_input / grad_residual are empty.
    if (want_weight) p.grad_weight.zero_();
    if (want_bias) p.grad_bias.zero_();
    return result();
  }
  if (!(want_input || want_weight || want_bias || want_residual)) return result();

  const bool need_sums = want_weight || want_bias || (training && want_input);
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  at::Tensor coef = at::empty({6, g.C}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_backward", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    const scalar_t* dy = p.grad_out.const_data_ptr<scalar_t>();
    // The residual only matters through z, which only an activation looks at.
    const scalar_t* res = (p.activation != Activation::None && p.residual.defined())
        ? p.residual.const_data_ptr<scalar_t>()
        : nullptr;
    const auto mean_p = channel_param<scalar_t>(mean, false);
    const auto rstd_p = channel_param<scalar_t>(rstd, false);
    const auto weight_p = channel_param<scalar_t>(weight, false);
    const auto bias_p = channel_param<scalar_t>(bias, false);
    const acc_t slope = static_cast<acc_t>(negative_slope);

    at::Tensor partials;
    if (need_sums) {
      GradOp<scalar_t> op{x, dy, res, mean_p, rstd_p, weight_p, bias_p, p.activation, slope};
      partials = launch_reduce(op, g, acc_options, stream);
    }
    const int64_t splits = partials.defined() ? partials.size(1) : 0;
    const acc_t* partials_ptr = partials.defined() ? partials.const_data_ptr<acc_t>() : nullptr;

    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    const dim3 block = finalize_block(splits, kThreads);
    grad_finalize_kernel<scalar_t><<<finalize_grid(block, g.C), block, 0, stream>>>(
        partials_ptr, splits, g.C, static_cast<acc_t>(count), training, mean_p, rstd_p, weight_p, bias_p,
        want_weight ? channel_param<scalar_t>(p.grad_weight, true) : ChannelParam<scalar_t>{},
        want_bias ? channel_param<scalar_t>(p.grad_bias, true) : ChannelParam<scalar_t>{}, coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (want_input || want_residual) launch_backward_elementwise<scalar_t>(p, res, coef_ptr, slope, stream);
  });
  return result();
}


at::Tensor batch_norm_stats_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var,
                                 const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  StatsPlan p = plan_stats(input, weight, bias, running_mean, running_var, residual);
  const int64_t count = p.g.count_per_channel();
  if (count == 0) return p.stats;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_stats", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor partials = launch_reduce(StatsOp<scalar_t>{p.x.const_data_ptr<scalar_t>()}, p.g, acc_options,
                                              stream);
    const dim3 block = finalize_block(partials.size(1), kThreads);
    stats_total_kernel<acc_t><<<finalize_grid(block, p.g.C), block, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), partials.size(1), p.g.C, count, p.stats.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p.stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_gather_stats_cuda(
    const at::Tensor& stats, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor table = plan_gather_stats(stats, running_mean, running_var, eps);
  const int64_t W = table.size(0), C = table.size(2);
  at::Tensor mean = at::empty({C}, table.options()), rstd = at::empty_like(mean), count = at::empty_like(mean);
  // The kernel updates acc-typed contiguous running statistics: the buffers
  // themselves when they are, else copies written back below.
  at::Tensor rm, rv;
  if (running_mean) {
    rm = running_mean->to(table.scalar_type()).contiguous();
    rv = running_var->to(table.scalar_type()).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "torchnorm.batch_norm_gather_stats", [&] {
    using acc_t = scalar_t;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    gather_stats_kernel<acc_t><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
        table.const_data_ptr<acc_t>(), W, C, static_cast<acc_t>(eps), static_cast<acc_t>(momentum),
        rm.defined() ? rm.mutable_data_ptr<acc_t>() : nullptr, rv.defined() ? rv.mutable_data_ptr<acc_t>() : nullptr,
        mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), count.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (running_mean) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {mean, rstd, count};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const at::Tensor& mean_dz,
    const at::Tensor& mean_dz_xhat,
    c10::string_view activation,
    double negative_slope,
    std::array<bool, 2> output_mask) {
  c10::cuda::CUDAGuard guard(input.device());
  BackwardPlan p = plan_backward_elemt(grad_output, input, weight, bias, residual, mean, rstd, mean_dz,
                                       mean_dz_xhat, std::string(activation), output_mask);
  if (p.x.numel() == 0 || !(output_mask[0] || output_mask[1])) return {p.grad_input, p.grad_residual};
  const int64_t C = p.g.C;
  at::Tensor coef = at::empty({6, C}, p.x.options().dtype(accumulate_type(p.x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.batch_norm_backward_elemt",
                                  [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    elemt_coefficients_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
        C, channel_param<scalar_t>(mean, false), channel_param<scalar_t>(rstd, false),
        channel_param<scalar_t>(weight, false), channel_param<scalar_t>(bias, false),
        channel_param<scalar_t>(mean_dz, false), channel_param<scalar_t>(mean_dz_xhat, false), coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const scalar_t* res = (p.activation != Activation::None && p.residual.defined())
        ? p.residual.const_data_ptr<scalar_t>()
        : nullptr;
    launch_backward_elementwise<scalar_t>(p, res, coef_ptr, static_cast<acc_t>(negative_slope), stream);
  });
  return {p.grad_input, p.grad_residual};
}

}  // namespace
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  m.impl("batch_norm_train", TORCH_FN(torchnorm::batch_norm_train_cuda));
  m.impl("batch_norm_eval", TORCH_FN(torchnorm::batch_norm_eval_cuda));
  m.impl("batch_norm_apply", TORCH_FN(torchnorm::batch_norm_apply_cuda));
  m.impl("batch_norm_backward", TORCH_FN(torchnorm::batch_norm_backward_cuda));
  m.impl("batch_norm_stats", TORCH_FN(torchnorm::batch_norm_stats_cuda));
  m.impl("batch_norm_gather_stats", TORCH_FN(torchnorm::batch_norm_gather_stats_cuda));
  m.impl("batch_norm_backward_elemt", TORCH_FN(torchnorm::batch_norm_backward_elemt_cuda));
}
