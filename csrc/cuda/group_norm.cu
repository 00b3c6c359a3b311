// CUDA kernels of torchnorm's GroupNorm and of InstanceNorm, which lives here
// too: the ops group_norm, group_norm_backward and instance_norm (GroupNorm
// with one group per channel, plus the running-statistics update; its
// backward is group_norm_backward). Argument checks, layouts and output
// allocation are done by plan_group_norm / plan_instance_norm /
// plan_group_norm_backward (common/sample_norm_plan.h); the per-element math
// comes from common/ (welford.h, batch_norm_math.h, sample_norm_math.h,
// activations.h); the element-wise walks, coefficient gathers and launch
// helpers from kernel_helpers.cuh, shared with batch_norm.cu.
//
// Geometry: (N, C, S) with C split into G groups of K = C / G channels; the
// statistics of (n, g) cover K * S elements. Planar layout: (N, C, S)
// contiguous, so a group is K * S contiguous elements and a channel plane S.
// Rowwise (channels_last): (N, S, C) contiguous, element (n, s, c) at
// (n * S + s) * C + c.
//
// Forward (2 reads of x, 1 write of out; the second read often from L2):
//   1. reduce    planar: each group's contiguous span, split over several
//                blocks when there are too few groups to fill the GPU
//                (segment_reduce_kernel, 16-byte loads); rowwise: per (n, c)
//                over the positions s, a warp reading consecutive channels
//                (column_reduce_kernel). Threads merge batches of values with
//                Chan's formula; each block writes one (count, mean, M2).
//   2. finalize  per (n, g): merge its partials (fixed order), write mean,
//                rstd (and the biased variance for InstanceNorm's running
//                statistics), and the per-(n, c) coefficients mean / scale =
//                weight * rstd / shift = bias of step 3.
//   3. normalize out = act((x - mean) * scale + shift) over the flat array
//                (forward_elementwise_kernel, 16-byte vectors), walked from
//                the end so that what step 1 left in L2 is read from there.
//
// Backward (2 reads of x and dy, 1 write of dx):
//   1. reduce    per (n, c): sum(dz) and sum(dz * xc), dz = dy * act'(z) with
//                z recomputed from x and the saved statistics (planar: one
//                segment per channel plane; rowwise: as the forward).
//   2. param_grad_kernel: grad_weight[c] = sum_n sum(dz * xc)[n, c] *
//                rstd[n, g], grad_bias[c] = sum_n sum(dz)[n, c], in a fixed
//                order (no atomics).
//      grad_finalize_kernel: per (n, g), sum_g = sum_c w[c] * sum(dz)[n, c]
//                and sum_g_xc likewise, then sample_backward_coefficients,
//                expanded to per-(n, c) coefficients.
//   3. dx = dz * w * rstd + xc * xc_coef + const_coef (backward_elementwise_kernel).
//
// Templates: reductions per input dtype x {16-byte vectors, scalars} x
// {statistics, gradient sums} plus the rowwise ones per dtype x op;
// element-wise kernels per dtype x {vector, scalar}; finalize kernels per
// dtype. The parameter dtype, the activation and the optional tensors are
// run-time switches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "common/activations.h"
#include "common/batch_norm_math.h"
#include "common/sample_norm_plan.h"
#include "common/sample_norm_math.h"
#include "common/welford.h"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

constexpr int kThreads = 256;  // most threads per block, for every kernel here
constexpr int kUnroll = 4;     // independent loads each thread issues per iteration of a reduction loop

// ---------------------------------------------------------------------------
// What the reduction kernels accumulate
// ---------------------------------------------------------------------------

// pre_activation / pre_activation_grad (z from the per-(n, c) coefficients,
// no residual) are in common/batch_norm_math.h; the element-wise walk
// (SampleWalker, gather_sample_channels) in kernel_helpers.cuh.

// Forward statistics: (count, mean, M2) of x.
template <typename scalar_t, int VEC>
struct StatsOp {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = MeanM2<acc_t>;
  using Loaded = Pack<scalar_t, VEC>;
  struct Context {};
  static constexpr int kFields = 3;

  const scalar_t* x;

  __device__ __forceinline__ Context context(int64_t) const { return {}; }
  // The VEC elements starting at element e (aligned when VEC > 1).
  __device__ __forceinline__ Loaded load(int64_t e) const { return load_pack<VEC>(x + e, 0); }
  // Adds the first n loaded packs.
  __device__ __forceinline__ void add(Acc& a, const Context&, const Loaded (&v)[kUnroll], int n) const {
    acc_t vals[kUnroll * VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) vals[u * VEC + k] = static_cast<acc_t>(v[u].v[k]);
    }
    add_batch<kUnroll * VEC>(a, vals, n * VEC);
  }
};

// Backward sums of one (n, c): sum(dz) and sum(dz * (x - mean)).
template <typename scalar_t, int VEC>
struct GradOp {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = SumPair<acc_t>;
  struct Loaded {
    Pack<scalar_t, VEC> x, dy;
  };
  struct Context {
    acc_t mean, scale, shift;
  };
  static constexpr int kFields = 2;

  const scalar_t* x;
  const scalar_t* dy;
  const acc_t* mean;  // (N, G)
  const acc_t* rstd;  // (N, G)
  ChannelParam<scalar_t> weight, bias;
  int64_t C, G, K;
  Activation act;
  acc_t slope;

  // nc = n * C + c
  __device__ __forceinline__ Context context(int64_t nc) const {
    const int64_t n = nc / C;
    const int64_t c = nc - n * C;
    const int64_t ng = n * G + c / K;
    const auto fc = forward_coefficients(rstd[ng], weight.load(c, acc_t(1)), bias.load(c, acc_t(0)));
    return {mean[ng], fc.scale, fc.shift};
  }
  __device__ __forceinline__ Loaded load(int64_t e) const {
    return {load_pack<VEC>(x + e, 0), load_pack<VEC>(dy + e, 0)};
  }
  __device__ __forceinline__ void add(Acc& a, const Context& ctx, const Loaded (&v)[kUnroll], int n) const {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < n) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t xc = static_cast<acc_t>(v[u].x.v[k]) - ctx.mean;
          const acc_t dz =
              pre_activation_grad(act, slope, static_cast<acc_t>(v[u].dy.v[k]), xc, ctx.scale, ctx.shift);
          a.dz += dz;
          a.dz_xc += dz * xc;
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------
// Reduction kernels
// ---------------------------------------------------------------------------

// Planar: nseg contiguous segments of L elements (a group for the
// statistics, a channel plane for the gradient sums), each split over
// `splits` blocks: grid = nseg * splits, block = a power of two <= kThreads.
// Block b covers the packs [split * per, (split + 1) * per) of segment
// b / splits and writes partial b.
template <typename Op, int VEC>
__global__ void __launch_bounds__(kThreads) segment_reduce_kernel(
    Op op, int64_t L, unsigned splits, typename Op::acc_t* __restrict__ partials, int64_t field_stride) {
  using Acc = typename Op::Acc;
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(Acc)];

  const int64_t seg = blockIdx.x / splits;
  const int64_t split = blockIdx.x % splits;
  const int64_t npacks = L / VEC;
  const int64_t per = (npacks + splits - 1) / splits;
  const int64_t begin = split * per;
  const int64_t end = std::min(npacks, begin + per);
  const int64_t base = seg * L;
  const int64_t step = blockDim.x;

  const auto ctx = op.context(seg);
  Acc acc;
  for (int64_t i = begin + threadIdx.x; i < end; i += kUnroll * step) {
    // All loads first, then the dependent accumulation, so kUnroll loads per
    // thread are in flight. The valid u are a prefix.
    typename Op::Loaded v[kUnroll] = {};
    int n = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * step;
      if (j < end) {
        v[u] = op.load(base + j * VEC);
        n = u + 1;
      }
    }
    op.add(acc, ctx, v, n);
  }
  const Acc total = block_tree_reduce(reinterpret_cast<Acc*>(smem), acc, threadIdx.x, 0, blockDim.x, 1);
  if (threadIdx.x == 0) store_partial(partials, field_stride, blockIdx.x, total);
}

// Rowwise (N, S, C): one accumulator per (n, c) over the positions s.
// grid = (N * col_tiles, splits), block = (bx, by) with bx a power of two <=
// 32 and bx * by = kThreads. Thread (tx, ty) of block (n * col_tiles + t, y)
// owns channel c = t * bx + tx of sample n and positions s = y * by + ty
// (step splits * by): a warp reads consecutive channels of one position, or
// whole consecutive positions when C < 32, so loads are coalesced. Writes
// partial (n * splits + y) * C + c.
template <typename Op>
__global__ void __launch_bounds__(kThreads) column_reduce_kernel(
    Op op, int64_t S, int64_t C, unsigned col_tiles, typename Op::acc_t* __restrict__ partials,
    int64_t field_stride) {
  using Acc = typename Op::Acc;
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(Acc)];

  const int64_t n = blockIdx.x / col_tiles;
  const int64_t c = int64_t(blockIdx.x % col_tiles) * blockDim.x + threadIdx.x;
  Acc acc;
  if (c < C) {
    const auto ctx = op.context(n * C + c);
    const int64_t s_step = int64_t(gridDim.y) * blockDim.y;
    const int64_t base = n * S * C + c;
    for (int64_t s = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; s < S; s += kUnroll * s_step) {
      typename Op::Loaded v[kUnroll] = {};
      int cnt = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t t = s + u * s_step;
        if (t < S) {
          v[u] = op.load(base + t * C);
          cnt = u + 1;
        }
      }
      op.add(acc, ctx, v, cnt);
    }
  }
  // Every thread takes part in the tree (it synchronizes), idle columns with
  // an empty accumulator.
  const Acc total =
      block_tree_reduce(reinterpret_cast<Acc*>(smem), acc, threadIdx.y, threadIdx.x, blockDim.y, blockDim.x);
  if (threadIdx.y == 0 && c < C) {
    store_partial(partials, field_stride, (n * gridDim.y + blockIdx.y) * C + c, total);
  }
}

// Where the partials of group (n, g) are. Each group has E entries j:
//  - planar: contiguous, entry j at ng * E + j. For the gradient sums (one
//    segment per channel plane, P partials each) entry j is partial j % P of
//    channel g * K + j / P; for the statistics (one segment per group) E = P.
//  - rowwise: entry j is partial p = j / K of channel c = g * K + j % K, at
//    (n * P + p) * C + c.
struct GroupPartials {
  int64_t C, G, K;
  int64_t P;  // partials per reduced segment or (n, c)
  int64_t E;  // entries per group
  bool planar;

  __device__ __forceinline__ int64_t index(int64_t ng, int64_t j) const {
    if (planar) return ng * E + j;
    const int64_t n = ng / G;
    const int64_t g = ng - n * G;
    const int64_t p = j / K;
    return (n * P + p) * C + g * K + (j - p * K);
  }
  // Channel (within the sample) of entry j (not for the planar statistics).
  __device__ __forceinline__ int64_t channel(int64_t ng, int64_t j) const {
    const int64_t g = ng % G;
    return g * K + (planar ? j / P : j % K);
  }
};

// ---------------------------------------------------------------------------
// Finalize kernels: block = (bx, by), bx * by = kThreads, grid = ceil(NG / bx);
// threadIdx.x picks the group, threadIdx.y strides over its entries, which a
// fixed tree then merges. All the block's threads then write the per-(n, c)
// coefficients of its bx groups (nc = ng * K + k: consecutive threads write
// consecutive channels).
// ---------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,
    int64_t field_stride,
    GroupPartials gp,
    int64_t NG,
    acc_type_of<scalar_t> count,
    acc_type_of<scalar_t> eps,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    acc_type_of<scalar_t>* __restrict__ mean_out,
    acc_type_of<scalar_t>* __restrict__ rstd_out,
    acc_type_of<scalar_t>* __restrict__ var_out,  // nullable
    acc_type_of<scalar_t>* __restrict__ coef) {   // (3, NG * K): mean, scale, shift
  using acc_t = acc_type_of<scalar_t>;
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(MeanM2<acc_t>)];
  __shared__ acc_t group_stats[kThreads][2];  // mean, rstd of the block's groups

  const int64_t first = int64_t(blockIdx.x) * blockDim.x;
  const int64_t ng = first + threadIdx.x;
  MeanM2<acc_t> acc;
  if (ng < NG) {
    for (int64_t j = threadIdx.y; j < gp.E; j += blockDim.y) {
      MeanM2<acc_t> part;
      load_partial(partials, field_stride, gp.index(ng, j), part);
      acc = combine(acc, part);
    }
  }
  const MeanM2<acc_t> total = block_tree_reduce(reinterpret_cast<MeanM2<acc_t>*>(smem), acc, threadIdx.y,
                                                threadIdx.x, blockDim.y, blockDim.x);
  if (threadIdx.y == 0) {
    // `count` is K * S, exact, rather than the partials' summed count.
    const acc_t var = total.m2 / count;
    const acc_t rstd = rstd_from_var(var, eps);
    group_stats[threadIdx.x][0] = total.mean;
    group_stats[threadIdx.x][1] = rstd;
    if (ng < NG) {
      mean_out[ng] = total.mean;
      rstd_out[ng] = rstd;
      if (var_out != nullptr) var_out[ng] = var;
    }
  }
  __syncthreads();

  const int64_t K = gp.K;
  const int64_t NC = NG * K;
  const int64_t n_entries = std::min<int64_t>(blockDim.x, NG - first) * K;
  for (int64_t i = threadIdx.y * blockDim.x + threadIdx.x; i < n_entries; i += blockDim.x * blockDim.y) {
    const int64_t lg = i / K;
    const int64_t k = i - lg * K;
    const int64_t group = first + lg;
    const int64_t c = (group % gp.G) * K + k;
    const int64_t nc = group * K + k;
    const acc_t rstd = group_stats[lg][1];
    const auto fc = forward_coefficients(rstd, weight.load(c, acc_t(1)), bias.load(c, acc_t(0)));
    coef[nc] = group_stats[lg][0];
    coef[NC + nc] = fc.scale;
    coef[2 * NC + nc] = fc.shift;
  }
}

// Layout of the backward's (6, N * C) coefficient workspace: mean, scale,
// shift (to recompute z), then dx's dz_coef (= weight * rstd), xc_coef and
// const_coef.
enum BackwardCoef : int { kMean = 0, kScale, kShift, kDzCoef, kXcCoef, kConstCoef, kNumCoef };

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,  // (2, ...): sum(dz), sum(dz * xc) per (n, c) partial
    int64_t field_stride,
    GroupPartials gp,
    int64_t NG,
    acc_type_of<scalar_t> count,
    const acc_type_of<scalar_t>* __restrict__ mean,
    const acc_type_of<scalar_t>* __restrict__ rstd,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    acc_type_of<scalar_t>* __restrict__ coef) {  // (kNumCoef, NG * K)
  using acc_t = acc_type_of<scalar_t>;
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(SumPair<acc_t>)];
  __shared__ acc_t group_coef[kThreads][5];  // mean, rstd, dz_coef, xc_coef, const_coef

  const int64_t first = int64_t(blockIdx.x) * blockDim.x;
  const int64_t ng = first + threadIdx.x;
  // sum_g = sum_c w[c] * sum(dz)[n, c], sum_g_xc = sum_c w[c] * sum(dz * xc)[n, c]
  SumPair<acc_t> acc;
  if (ng < NG) {
    for (int64_t j = threadIdx.y; j < gp.E; j += blockDim.y) {
      SumPair<acc_t> part;
      load_partial(partials, field_stride, gp.index(ng, j), part);
      const acc_t w = weight.load(gp.channel(ng, j), acc_t(1));
      acc.dz += w * part.dz;
      acc.dz_xc += w * part.dz_xc;
    }
  }
  const SumPair<acc_t> total = block_tree_reduce(reinterpret_cast<SumPair<acc_t>*>(smem), acc, threadIdx.y,
                                                 threadIdx.x, blockDim.y, blockDim.x);
  if (threadIdx.y == 0 && ng < NG) {
    const acc_t r = rstd[ng];
    const auto k = sample_backward_coefficients<acc_t>(true, r, total.dz, total.dz_xc, count);
    group_coef[threadIdx.x][0] = mean[ng];
    group_coef[threadIdx.x][1] = r;
    group_coef[threadIdx.x][2] = k.dz_coef;
    group_coef[threadIdx.x][3] = k.xc_coef;
    group_coef[threadIdx.x][4] = k.const_coef;
  }
  __syncthreads();

  const int64_t K = gp.K;
  const int64_t NC = NG * K;
  const int64_t n_entries = std::min<int64_t>(blockDim.x, NG - first) * K;
  for (int64_t i = threadIdx.y * blockDim.x + threadIdx.x; i < n_entries; i += blockDim.x * blockDim.y) {
    const int64_t lg = i / K;
    const int64_t kk = i - lg * K;
    const int64_t group = first + lg;
    const int64_t c = (group % gp.G) * K + kk;
    const int64_t nc = group * K + kk;
    const acc_t w = weight.load(c, acc_t(1));
    const auto fc = forward_coefficients(group_coef[lg][1], w, bias.load(c, acc_t(0)));
    coef[kMean * NC + nc] = group_coef[lg][0];
    coef[kScale * NC + nc] = fc.scale;
    coef[kShift * NC + nc] = fc.shift;
    coef[kDzCoef * NC + nc] = w * group_coef[lg][2];
    coef[kXcCoef * NC + nc] = group_coef[lg][3];
    coef[kConstCoef * NC + nc] = group_coef[lg][4];
  }
}

// grad_weight[c] = sum_n rstd[n, g] * sum(dz * xc)[n, c], grad_bias[c] =
// sum_n sum(dz)[n, c], from the per-(n, c) partials (P per (n, c); planar at
// nc * P + p, rowwise at (n * P + p) * C + c). block = (32, 8), grid =
// ceil(C / 32): a thread per channel along x, the (n, p) entries along y,
// merged in a fixed tree.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) param_grad_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,
    int64_t field_stride,
    int64_t N,
    int64_t C,
    int64_t G,
    int64_t K,
    int64_t P,
    bool planar,
    const acc_type_of<scalar_t>* __restrict__ rstd,
    ChannelParam<scalar_t> grad_weight,  // absent when not wanted
    ChannelParam<scalar_t> grad_bias) {
  using acc_t = acc_type_of<scalar_t>;
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(SumPair<acc_t>)];
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  SumPair<acc_t> acc;  // dz: grad_bias, dz_xc: grad_weight
  if (c < C) {
    const int64_t g = c / K;
    for (int64_t j = threadIdx.y; j < N * P; j += blockDim.y) {
      const int64_t n = j / P;
      const int64_t p = j - n * P;
      SumPair<acc_t> part;
      load_partial(partials, field_stride, planar ? (n * C + c) * P + p : (n * P + p) * C + c, part);
      acc.dz += part.dz;
      acc.dz_xc += part.dz_xc * rstd[n * G + g];
    }
  }
  const SumPair<acc_t> total = block_tree_reduce(reinterpret_cast<SumPair<acc_t>*>(smem), acc, threadIdx.y,
                                                 threadIdx.x, blockDim.y, blockDim.x);
  if (threadIdx.y == 0 && c < C) {
    if (grad_weight.present()) grad_weight.store(c, total.dz_xc);
    if (grad_bias.present()) grad_bias.store(c, total.dz);
  }
}

// ---------------------------------------------------------------------------
// Element-wise kernels
// ---------------------------------------------------------------------------

// out = act((x - mean) * scale + shift). The vector loop covers numel / VEC
// whole vectors; a tail of < VEC elements is done one per thread.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) forward_elementwise_kernel(
    const scalar_t* __restrict__ x,
    scalar_t* __restrict__ out,
    const acc_type_of<scalar_t>* __restrict__ coef,  // (3, N * C): mean, scale, shift
    int64_t NC,
    int64_t numel,
    int64_t C,
    int64_t S,
    bool planar,
    bool packed,
    Activation act,
    acc_type_of<scalar_t> slope) {
  using acc_t = acc_type_of<scalar_t>;
  constexpr int G = coef_chunk<scalar_t, VEC>();
  const acc_t* mean = coef;
  const acc_t* scale = coef + NC;
  const acc_t* shift = coef + 2 * NC;
  const int64_t Q = planar ? S : C;
  const int64_t P = planar ? C : S;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / VEC;

  // Vector j = nvec - 1 - tid, then j -= nthreads (see SampleWalker).
  SampleWalker walk(std::max<int64_t>(nvec - 1 - tid, 0) * VEC, nthreads * VEC, Q, P);
  for (int64_t j = nvec - 1 - tid; j >= 0; j -= nthreads) {
    const Pack<scalar_t, VEC> xv = load_pack<VEC>(x, j);
    Pack<scalar_t, VEC> ov;
    int64_t q = walk.q, p = walk.p, n = walk.n;  // position of element k0
#pragma unroll
    for (int k0 = 0; k0 < VEC; k0 += G) {
      acc_t xc[G], sc[G], sh[G];
      gather_sample_channels<G>(mean, q, p, n, Q, P, C, planar, packed, sh);
#pragma unroll
      for (int k = 0; k < G; ++k) xc[k] = static_cast<acc_t>(xv.v[k0 + k]) - sh[k];
      gather_sample_channels<G>(scale, q, p, n, Q, P, C, planar, packed, sc);
      gather_sample_channels<G>(shift, q, p, n, Q, P, C, planar, packed, sh);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        ov.v[k0 + k] = static_cast<scalar_t>(activation_forward(act, pre_activation(xc[k], sc[k], sh[k]), slope));
      }
      if (k0 + G < VEC) {
#pragma unroll
        for (int k = 0; k < G; ++k) next_position(q, p, n, Q, P);
      }
    }
    store_pack<VEC>(out, j, ov);
    walk.retreat();
  }

  if constexpr (VEC > 1) {
    const int64_t e = nvec * VEC + tid;
    if (e < numel) {
      const int64_t nc = nc_of(e, C, S, planar);
      const acc_t z = pre_activation(static_cast<acc_t>(x[e]) - mean[nc], scale[nc], shift[nc]);
      out[e] = static_cast<scalar_t>(activation_forward(act, z, slope));
    }
  }
}

// dx = dz * dz_coef + (x - mean) * xc_coef + const_coef, dz = dy * act'(z).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) backward_elementwise_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ dy,
    scalar_t* __restrict__ dx,
    const acc_type_of<scalar_t>* __restrict__ coef,  // (kNumCoef, N * C)
    int64_t NC,
    int64_t numel,
    int64_t C,
    int64_t S,
    bool planar,
    bool packed,
    Activation act,
    acc_type_of<scalar_t> slope) {
  using acc_t = acc_type_of<scalar_t>;
  constexpr int G = coef_chunk<scalar_t, VEC>();
  const int64_t Q = planar ? S : C;
  const int64_t P = planar ? C : S;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / VEC;
  const bool needs_z = act != Activation::None;

  // Vector j = nvec - 1 - tid, then j -= nthreads (see SampleWalker).
  SampleWalker walk(std::max<int64_t>(nvec - 1 - tid, 0) * VEC, nthreads * VEC, Q, P);
  for (int64_t j = nvec - 1 - tid; j >= 0; j -= nthreads) {
    const Pack<scalar_t, VEC> xv = load_pack<VEC>(x, j);
    const Pack<scalar_t, VEC> dyv = load_pack<VEC>(dy, j);
    Pack<scalar_t, VEC> ov;
    int64_t q = walk.q, p = walk.p, n = walk.n;  // position of element k0
#pragma unroll
    for (int k0 = 0; k0 < VEC; k0 += G) {
      // One coefficient array at a time, so that at most 16 bytes of
      // coefficients are live: xc, then dz (scale / shift only to recompute
      // z), then dx = dz * dz_coef + xc * xc_coef + const_coef.
      acc_t xc[G], dz[G], c[G];
      gather_sample_channels<G>(coef + kMean * NC, q, p, n, Q, P, C, planar, packed, c);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        xc[k] = static_cast<acc_t>(xv.v[k0 + k]) - c[k];
        dz[k] = static_cast<acc_t>(dyv.v[k0 + k]);
      }
      if (needs_z) {
        acc_t sc[G];
        gather_sample_channels<G>(coef + kScale * NC, q, p, n, Q, P, C, planar, packed, sc);
        gather_sample_channels<G>(coef + kShift * NC, q, p, n, Q, P, C, planar, packed, c);
#pragma unroll
        for (int k = 0; k < G; ++k) dz[k] = pre_activation_grad(act, slope, dz[k], xc[k], sc[k], c[k]);
      }
      gather_sample_channels<G>(coef + kDzCoef * NC, q, p, n, Q, P, C, planar, packed, c);
#pragma unroll
      for (int k = 0; k < G; ++k) dz[k] *= c[k];
      gather_sample_channels<G>(coef + kXcCoef * NC, q, p, n, Q, P, C, planar, packed, c);
#pragma unroll
      for (int k = 0; k < G; ++k) dz[k] += xc[k] * c[k];
      gather_sample_channels<G>(coef + kConstCoef * NC, q, p, n, Q, P, C, planar, packed, c);
#pragma unroll
      for (int k = 0; k < G; ++k) ov.v[k0 + k] = static_cast<scalar_t>(dz[k] + c[k]);
      if (k0 + G < VEC) {
#pragma unroll
        for (int k = 0; k < G; ++k) next_position(q, p, n, Q, P);
      }
    }
    store_pack<VEC>(dx, j, ov);
    walk.retreat();
  }

  if constexpr (VEC > 1) {
    const int64_t e = nvec * VEC + tid;
    if (e < numel) {
      const int64_t nc = nc_of(e, C, S, planar);
      const acc_t xc = static_cast<acc_t>(x[e]) - coef[kMean * NC + nc];
      const acc_t dz = pre_activation_grad(act, slope, static_cast<acc_t>(dy[e]), xc, coef[kScale * NC + nc],
                                           coef[kShift * NC + nc]);
      dx[e] = static_cast<scalar_t>(dz * coef[kDzCoef * NC + nc] + xc * coef[kXcCoef * NC + nc] +
                                    coef[kConstCoef * NC + nc]);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side: launch configuration
// ---------------------------------------------------------------------------

// Runs the planar reduction of `op` over nseg segments of L elements; returns
// the (Op::kFields, nseg * splits) partials and sets splits. Small segments
// get small blocks (down to a warp); when there are too few segments to keep
// about two waves of threads busy, each segment is split over several blocks
// (each still given at least kUnroll packs per thread).
template <typename Op, int VEC>
at::Tensor launch_segment_reduce(const Op& op, int64_t nseg, int64_t L, const at::TensorOptions& acc_options,
                                 cudaStream_t stream, int64_t& splits) {
  using acc_t = typename Op::acc_t;
  static const int per_sm = blocks_per_sm(segment_reduce_kernel<Op, VEC>, kThreads);
  const int64_t npacks = L / VEC;
  int threads = 32;
  while (threads < kThreads && int64_t(threads) * kUnroll < npacks) threads *= 2;
  const int64_t target_threads = 2 * wave_blocks(per_sm) * kThreads;
  splits = std::max<int64_t>(
      1, std::min({ceil_div(target_threads, nseg * threads), ceil_div(npacks, int64_t(threads) * kUnroll),
                   int64_t(4096)}));
  const int64_t blocks = nseg * splits;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "torchnorm: too many groups (", nseg, ")");
  at::Tensor partials = at::empty({Op::kFields, blocks}, acc_options);
  segment_reduce_kernel<Op, VEC><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      op, L, static_cast<unsigned>(splits), partials.mutable_data_ptr<acc_t>(), blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

// Runs the rowwise reduction of `op` over (N, S, C); returns the
// (Op::kFields, N * splits * C) partials and sets splits (partials per (n, c)).
template <typename Op>
at::Tensor launch_column_reduce(const Op& op, const GroupNormGeometry& g, const at::TensorOptions& acc_options,
                                cudaStream_t stream, int64_t& splits) {
  using acc_t = typename Op::acc_t;
  static const int per_sm = blocks_per_sm(column_reduce_kernel<Op>, kThreads);
  int bx = 1;  // smallest power of two >= C, at most a warp
  while (bx < 32 && bx < g.C) bx *= 2;
  const int by = kThreads / bx;
  const int64_t col_tiles = ceil_div(g.C, bx);
  const int64_t x_blocks = g.N * col_tiles;
  TORCH_CHECK(x_blocks <= std::numeric_limits<int32_t>::max(), "torchnorm: input too large (N=", g.N, ", C=", g.C,
              ")");
  splits = std::max<int64_t>(1, std::min({ceil_div(2 * wave_blocks(per_sm), x_blocks),
                                          ceil_div(g.S, int64_t(by) * kUnroll), int64_t(65535)}));
  const int64_t field_stride = g.N * splits * g.C;
  at::Tensor partials = at::empty({Op::kFields, field_stride}, acc_options);
  column_reduce_kernel<Op>
      <<<dim3(static_cast<unsigned>(x_blocks), static_cast<unsigned>(splits)), dim3(bx, by), 0, stream>>>(
          op, g.S, g.C, static_cast<unsigned>(col_tiles), partials.mutable_data_ptr<acc_t>(), field_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

void group_norm_forward(const GroupNormPlan& p, double eps, double negative_slope) {
  const GroupNormGeometry& g = p.g;
  if (g.N == 0) return;  // every output is empty
  const int64_t K = g.channels_per_group();
  const int64_t count = g.count_per_group();
  if (count == 0) {
    // Groups without elements (C == 0 or S == 0; out is empty): statistics of
    // nothing, mean 0 and variance 0, as the CPU kernels write them.
    p.mean.zero_();
    p.rstd.fill_(1.0 / std::sqrt(eps));
    if (p.var.defined()) p.var.zero_();
    return;
  }
  const bool planar = g.layout == Layout::Planar;
  const int64_t NG = g.N * g.G;
  const int64_t NC = g.N * g.C;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));
  at::Tensor coef = at::empty({3, NC}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.group_norm", [&] {
    using acc_t = acc_type_of<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    scalar_t* out = p.out.mutable_data_ptr<scalar_t>();

    // 1. Partial statistics.
    at::Tensor partials;
    int64_t splits = 1;
    GroupPartials gp{g.C, g.G, K, 1, 1, planar};
    if (planar) {
      if (count % kVec == 0 && is_aligned16(x)) {
        partials = launch_segment_reduce<StatsOp<scalar_t, kVec>, kVec>(StatsOp<scalar_t, kVec>{x}, NG, count,
                                                                         acc_options, stream, splits);
      } else {
        partials = launch_segment_reduce<StatsOp<scalar_t, 1>, 1>(StatsOp<scalar_t, 1>{x}, NG, count, acc_options,
                                                                   stream, splits);
      }
      gp.P = splits;
      gp.E = splits;
    } else {
      partials = launch_column_reduce(StatsOp<scalar_t, 1>{x}, g, acc_options, stream, splits);
      gp.P = splits;
      gp.E = K * splits;
    }

    // 2. Statistics and per-(n, c) coefficients.
    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    const dim3 block = finalize_block(gp.E, kThreads);
    stats_finalize_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(NG, block.x)), block, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), partials.size(1), gp, NG, static_cast<acc_t>(count),
        static_cast<acc_t>(eps), channel_param<scalar_t>(p.weight, false), channel_param<scalar_t>(p.bias, false),
        p.mean.mutable_data_ptr<acc_t>(), p.rstd.mutable_data_ptr<acc_t>(),
        p.var.defined() ? p.var.mutable_data_ptr<acc_t>() : nullptr, coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 3. Normalize.
    const int64_t numel = p.x.numel();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    if (is_aligned16(x) && is_aligned16(out)) {
      const bool packed = packed_channels<coef_chunk<scalar_t, kVec>(), acc_t>(g, {coef_ptr});
      launch_elementwise<forward_elementwise_kernel<scalar_t, kVec>, kVec, kThreads>(
          numel, stream, x, out, coef_ptr, NC, numel, g.C, g.S, planar, packed, p.activation, slope);
    } else {
      launch_elementwise<forward_elementwise_kernel<scalar_t, 1>, 1, kThreads>(
          numel, stream, x, out, coef_ptr, NC, numel, g.C, g.S, planar, /*packed=*/false, p.activation, slope);
    }
  });
}

// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cuda(
    const at::Tensor& input,
    int64_t num_groups,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    c10::string_view activation,
    double negative_slope) {
  c10::cuda::CUDAGuard guard(input.device());
  const GroupNormPlan p = plan_group_norm("torchnorm.group_norm", input, num_groups, weight, bias, eps,
                                          std::string(activation), /*want_var=*/false);
  group_norm_forward(p, eps, negative_slope);
  return {p.out, p.mean, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    double momentum,
    double eps) {
  c10::cuda::CUDAGuard guard(input.device());
  const GroupNormPlan p = plan_instance_norm(input, weight, bias, running_mean, running_var, eps);
  group_norm_forward(p, eps, /*negative_slope=*/0.0);
  update_instance_running_stats(p, running_mean, running_var, momentum);
  return {p.out, p.mean, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    int64_t num_groups,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    c10::string_view activation,
    double negative_slope,
    std::array<bool, 3> output_mask) {
  c10::cuda::CUDAGuard guard(input.device());
  const GroupNormBackwardPlan p = plan_group_norm_backward(grad_output, input, num_groups, mean, rstd, weight, bias,
                                                           std::string(activation), output_mask);
  const auto result = [&] { return std::make_tuple(p.grad_input, p.grad_weight, p.grad_bias); };
  const bool want_input = output_mask[0], want_weight = output_mask[1], want_bias = output_mask[2];
  const GroupNormGeometry& g = p.g;
  const int64_t K = g.channels_per_group();
  const int64_t count = g.count_per_group();
  if (g.N == 0 || count == 0) {
    // Nothing reduced: the parameter gradients are empty sums, grad_input is empty.
    if (want_weight) p.grad_weight.zero_();
    if (want_bias) p.grad_bias.zero_();
    return result();
  }
  if (!(want_input || want_weight || want_bias)) return result();
  const bool planar = g.layout == Layout::Planar;
  const int64_t NG = g.N * g.G;
  const int64_t NC = g.N * g.C;
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.group_norm_backward", [&] {
    using acc_t = acc_type_of<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    const scalar_t* dy = p.grad_out.const_data_ptr<scalar_t>();
    const acc_t* mean_ptr = p.mean.const_data_ptr<acc_t>();
    const acc_t* rstd_ptr = p.rstd.const_data_ptr<acc_t>();
    const auto weight_p = channel_param<scalar_t>(p.weight, false);
    const auto bias_p = channel_param<scalar_t>(p.bias, false);
    const acc_t slope = static_cast<acc_t>(negative_slope);

    // 1. Per-(n, c) partial sums of dz and dz * xc.
    at::Tensor partials;
    int64_t splits = 1;
    if (planar) {
      if (g.S % kVec == 0 && is_aligned16(x) && is_aligned16(dy)) {
        using Op = GradOp<scalar_t, kVec>;
        const Op op{x, dy, mean_ptr, rstd_ptr, weight_p, bias_p, g.C, g.G, K, p.activation, slope};
        partials = launch_segment_reduce<Op, kVec>(op, NC, g.S, acc_options, stream, splits);
      } else {
        using Op = GradOp<scalar_t, 1>;
        const Op op{x, dy, mean_ptr, rstd_ptr, weight_p, bias_p, g.C, g.G, K, p.activation, slope};
        partials = launch_segment_reduce<Op, 1>(op, NC, g.S, acc_options, stream, splits);
      }
    } else {
      using Op = GradOp<scalar_t, 1>;
      const Op op{x, dy, mean_ptr, rstd_ptr, weight_p, bias_p, g.C, g.G, K, p.activation, slope};
      partials = launch_column_reduce(op, g, acc_options, stream, splits);
    }
    const acc_t* partials_ptr = partials.const_data_ptr<acc_t>();
    const int64_t field_stride = partials.size(1);

    // 2a. grad_weight, grad_bias.
    if (want_weight || want_bias) {
      param_grad_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(g.C, 32)), dim3(32, kThreads / 32), 0, stream>>>(
          partials_ptr, field_stride, g.N, g.C, g.G, K, splits, planar, rstd_ptr,
          want_weight ? channel_param<scalar_t>(p.grad_weight, true) : ChannelParam<scalar_t>{},
          want_bias ? channel_param<scalar_t>(p.grad_bias, true) : ChannelParam<scalar_t>{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!want_input) return;

    // 2b. Per-(n, c) coefficients of grad_input.
    const GroupPartials gp{g.C, g.G, K, splits, K * splits, planar};
    at::Tensor coef = at::empty({kNumCoef, NC}, acc_options);
    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    const dim3 block = finalize_block(gp.E, kThreads);
    grad_finalize_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(NG, block.x)), block, 0, stream>>>(
        partials_ptr, field_stride, gp, NG, static_cast<acc_t>(count), mean_ptr, rstd_ptr, weight_p, bias_p,
        coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 3. grad_input.
    scalar_t* dx = p.grad_input.mutable_data_ptr<scalar_t>();
    const int64_t numel = p.x.numel();
    if (is_aligned16(x) && is_aligned16(dy) && is_aligned16(dx)) {
      // Every row of coef is aligned when coef is and C % G == 0.
      const bool packed = packed_channels<coef_chunk<scalar_t, kVec>(), acc_t>(g, {coef_ptr});
      launch_elementwise<backward_elementwise_kernel<scalar_t, kVec>, kVec, kThreads>(
          numel, stream, x, dy, dx, coef_ptr, NC, numel, g.C, g.S, planar, packed, p.activation, slope);
    } else {
      launch_elementwise<backward_elementwise_kernel<scalar_t, 1>, 1, kThreads>(
          numel, stream, x, dy, dx, coef_ptr, NC, numel, g.C, g.S, planar, /*packed=*/false, p.activation, slope);
    }
  });
  return result();
}

}  // namespace
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  m.impl("group_norm", TORCH_FN(torchnorm::group_norm_cuda));
  m.impl("group_norm_backward", TORCH_FN(torchnorm::group_norm_backward_cuda));
  m.impl("instance_norm", TORCH_FN(torchnorm::instance_norm_cuda));
}
