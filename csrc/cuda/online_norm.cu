// CUDA kernels of Online Normalization (Chiley et al. 2019): the ops
// online_norm and online_norm_backward. Schemas and semantics are in
// csrc/registration.cpp; the CPU kernels, which these mirror step for step,
// in csrc/cpu/online_norm.cpp.
//
// Why this structure. The published kernel walks the samples one by one for
// each channel (a block per channel, a loop over n inside it) and takes each
// sample's variance as E[x^2] - E[x]^2. But the only sequential part of the
// op is the per-channel recurrence over the samples, and it needs just two
// numbers per (sample, channel): the sample's mean and variance over its
// positions (forward), or four means (backward). So each direction is three
// launches (four when a plane's reduction is split over several blocks):
//
//   1. plane moments  per (sample, channel) plane of S contiguous positions,
//                     all N * C planes in parallel: one block per plane (or
//                     `splits` blocks per plane, merged by plane_finalize_kernel,
//                     when there are too few planes to fill the GPU), or one
//                     thread per plane when planes are tiny (S <= 32, e.g. an
//                     (N, C) input). Forward: mean and biased variance,
//                     robustly: each thread takes batches of values two-pass
//                     and merges them with Chan's formula (common/welford.h),
//                     the block merges its threads in a fixed shared-memory
//                     tree; never E[x^2] - E[x]^2. Backward: the means of
//                     dy * y, y^2, dy and y with y = (x - mean) * rstd
//                     recomputed, summed in acc_t the same way (per thread,
//                     then the fixed tree).
//   2. recurrence     one thread per channel walks n = 0 .. N-1 with
//                     common/online_norm_math.h (online_state_update, or
//                     online_backward_step): a few flops per (sample,
//                     channel), reading the state once and writing it back in
//                     place once. The forward writes the (N, C) mean and rstd
//                     each sample is normalized with (the state before it);
//                     the backward writes dx's (N, C) coefficients. Both
//                     recurrences are linear (the forward's in (mu, var +
//                     mu^2), the backward's in (u, v)), so a parallel scan
//                     over the samples would be possible; at O(N) flops per
//                     channel next to the O(N * C * S) element passes it is not
//                     worth its cost.
//   3. element-wise   forward y = (x - mean[n, c]) * rstd[n, c]; backward dx =
//                     online_input_grad(k[n, c], dy, y), y recomputed. 16-byte
//                     vectors when aligned, walked from the tensor's end so
//                     that what pass 1 left in L2 is read from there first
//                     (as group_norm.cu).
//
// Deterministic: every reduction is a fixed tree or a fixed serial order (no
// atomics), so a given GPU gives the same bits on every run (the number of
// blocks per plane depends on the GPU's size). Element offsets are int64.
// Half and bfloat16 inputs are converted to float before any arithmetic;
// float64 computes in double. Input (and grad_output) is taken as contiguous
// (N, C, S): a channels-last tensor is copied first, as on the CPU, and the
// outputs are contiguous.
//
// Host side, as the CPU kernels: the shared checks first (common/
// online_norm_plan.h: shapes, dtypes, the state's overlap, at least one
// position per sample); mean and rstd (N, C) in the accumulation dtype; the
// state (mu, var, u, v: float32 or float64 (C,), any stride) is read as acc_t
// and written back in place, mu before var and u before v. Empty tensors:
// N * C == 0 returns empty outputs and leaves the state as it is.
//
// Layer scaling (layer_scale / layer_rstd, the error compensation "ls") adds
// no pass over the data: the forward's recurrence also writes each plane's
// mean square of the affine output (from the plane's mean and variance), a
// one-thread-per-sample kernel turns them into the sample's scale, which
// multiplies the element-wise pass's per-plane scale and shift; the
// backward's one-thread-per-sample kernel turns the planes' means of dy * y
// and dy into those of the affine output's gradient before the control
// process, whose coefficients then take the scaling's derivative along
// (common/online_norm_math.h).
//
// Launches: online_norm: moments (1, +1 finalize when split) + recurrence (1)
// (+ layer scale (1)) + normalize (1, when the input has elements);
// online_norm_backward: the same, with grad moments, the control process and
// grad_input.
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
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

#include "common/batch_norm_math.h"
#include "common/input_checks.h"
#include "common/online_norm_math.h"
#include "common/online_norm_plan.h"
#include "common/welford.h"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

using at::Tensor;

constexpr int kThreads = 256;            // most threads per block, for every kernel here
constexpr int kUnroll = 4;               // independent loads per thread per iteration of a reduction loop
constexpr int kMaxSplits = 64;           // most blocks per plane (their partials are merged serially)
constexpr int64_t kSerialPositions = 32;  // planes this small get a thread each, not a block
constexpr int kRecurrenceThreads = 128;  // channels per block of the recurrence kernels

// The partial-workspace accessors of kernel_helpers.cuh (MeanM2), next to this
// file's own overloads (GradSums) below, so that unqualified calls see both.
using torchnorm::load_partial;
using torchnorm::merge;
using torchnorm::store_partial;

// ---------------------------------------------------------------------------
// What the plane reductions accumulate
// ---------------------------------------------------------------------------
//
// An Op of the plane reductions has: Acc (merged with `merge`, stored with
// store_partial / load_partial, kFields acc_t values), Loaded (what one load
// brings: VEC elements of each input), Context (per-plane values loaded once),
// context(plane), load(e) (the VEC elements from flat element e, aligned when
// VEC > 1), add(acc, ctx, loaded[kUnroll], n) (adds the first n loads) and
// finish(plane, total) (writes the plane's results from its total).

// Forward: (count, mean, M2) of x per plane; finish writes the plane's mean
// and biased variance (0 and 0 for an empty plane).
template <typename scalar_t, int VEC>
struct PlaneStatsOp {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = MeanM2<acc_t>;
  using Loaded = Pack<scalar_t, VEC>;
  struct Context {};
  static constexpr int kFields = 3;

  const scalar_t* x;
  acc_t* sample_mean;  // (N * C)
  acc_t* sample_var;   // (N * C)
  int64_t S;

  __device__ __forceinline__ Context context(int64_t) const { return {}; }
  __device__ __forceinline__ Loaded load(int64_t e) const { return load_pack<VEC>(x + e, 0); }
  // The n loads as one batch: its exact two-pass (mean, M2), merged with
  // Chan's formula (add_batch).
  __device__ __forceinline__ void add(Acc& a, const Context&, const Loaded (&v)[kUnroll], int n) const {
    acc_t vals[kUnroll * VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) vals[u * VEC + k] = static_cast<acc_t>(v[u].v[k]);
    }
    add_batch<kUnroll * VEC>(a, vals, n * VEC);
  }
  // The CPU divides M2 by the plane's size P (its count, exactly).
  __device__ __forceinline__ void finish(int64_t plane, const Acc& total) const {
    sample_mean[plane] = total.mean;  // 0 when the plane is empty (count 0)
    sample_var[plane] = S > 0 ? total.m2 / static_cast<acc_t>(S) : acc_t(0);
  }
};

// Backward: per plane the sums of dy * y, y^2, dy and y.
template <typename acc_t>
struct GradSums {
  acc_t dy_y = acc_t(0);
  acc_t y2 = acc_t(0);
  acc_t dy = acc_t(0);
  acc_t y = acc_t(0);
};

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> merge(const GradSums<acc_t>& a, const GradSums<acc_t>& b) {
  GradSums<acc_t> r;
  r.dy_y = a.dy_y + b.dy_y;
  r.y2 = a.y2 + b.y2;
  r.dy = a.dy + b.dy;
  r.y = a.y + b.y;
  return r;
}

template <typename acc_t>
__device__ __forceinline__ void store_partial(acc_t* ws, int64_t field_stride, int64_t i, const GradSums<acc_t>& a) {
  ws[i] = a.dy_y;
  ws[field_stride + i] = a.y2;
  ws[2 * field_stride + i] = a.dy;
  ws[3 * field_stride + i] = a.y;
}

template <typename acc_t>
__device__ __forceinline__ void load_partial(const acc_t* ws, int64_t field_stride, int64_t i, GradSums<acc_t>& a) {
  a.dy_y = ws[i];
  a.y2 = ws[field_stride + i];
  a.dy = ws[2 * field_stride + i];
  a.y = ws[3 * field_stride + i];
}

// The rows of the backward's (4, N * C) moments: the means over each plane of
// dy * y, y^2, dy and y (online_backward_step's arguments, in its order).
enum GradMoment : int { kMeanDyY = 0, kMeanY2, kMeanDy, kMeanY, kNumGradMoments };

// Backward: y = (x - mean) * rstd recomputed as the forward computed it (and
// as the CPU's backward does); finish writes the four sums times 1 / S (0
// for an empty plane), as the CPU.
template <typename scalar_t, int VEC>
struct PlaneGradOp {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = GradSums<acc_t>;
  struct Loaded {
    Pack<scalar_t, VEC> x, dy;
  };
  struct Context {
    acc_t mean, rstd;
  };
  static constexpr int kFields = 4;

  const scalar_t* x;
  const scalar_t* dy;
  const acc_t* mean;  // (N * C), acc dtype, contiguous
  const acc_t* rstd;  // (N * C)
  acc_t* moments;     // (kNumGradMoments, N * C)
  int64_t planes;     // N * C
  int64_t S;

  __device__ __forceinline__ Context context(int64_t plane) const { return {mean[plane], rstd[plane]}; }
  __device__ __forceinline__ Loaded load(int64_t e) const {
    return {load_pack<VEC>(x + e, 0), load_pack<VEC>(dy + e, 0)};
  }
  __device__ __forceinline__ void add(Acc& a, const Context& ctx, const Loaded (&v)[kUnroll], int n) const {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < n) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t y = (static_cast<acc_t>(v[u].x.v[k]) - ctx.mean) * ctx.rstd;
          const acc_t g = static_cast<acc_t>(v[u].dy.v[k]);
          a.dy_y += g * y;
          a.y2 += y * y;
          a.dy += g;
          a.y += y;
        }
      }
    }
  }
  __device__ __forceinline__ void finish(int64_t plane, const Acc& total) const {
    const acc_t inv = S > 0 ? acc_t(1) / static_cast<acc_t>(S) : acc_t(0);
    moments[kMeanDyY * planes + plane] = total.dy_y * inv;
    moments[kMeanY2 * planes + plane] = total.y2 * inv;
    moments[kMeanDy * planes + plane] = total.dy * inv;
    moments[kMeanY * planes + plane] = total.y * inv;
  }
};

// ---------------------------------------------------------------------------
// Plane reduction kernels
// ---------------------------------------------------------------------------

// `planes` contiguous planes of S elements (S % VEC == 0 and x 16-byte
// aligned when VEC > 1), each split over `splits` blocks: grid = planes *
// splits, block = a power of two in [32, kThreads]. Block b covers the packs
// [split * per, (split + 1) * per) of plane b / splits. Its threads' totals
// are merged by a fixed tree; with one block per plane it writes the plane's
// results itself, else its partial at split * planes + plane of a
// (kFields, splits * planes) workspace.
template <typename Op, int VEC>
__global__ void __launch_bounds__(kThreads) plane_reduce_kernel(
    Op op, int64_t planes, int64_t S, unsigned splits, typename Op::acc_t* __restrict__ partials) {
  using Acc = typename Op::Acc;
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(Acc)];

  const int64_t plane = blockIdx.x / splits;
  const int64_t split = blockIdx.x % splits;
  const int64_t npacks = S / VEC;
  const int64_t per = (npacks + splits - 1) / splits;
  const int64_t begin = split * per;
  const int64_t end = std::min(npacks, begin + per);
  const int64_t base = plane * S;
  const int64_t step = blockDim.x;

  const auto ctx = op.context(plane);
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
  // Every thread reaches the tree's barriers (no early return above).
  const Acc total = block_tree_reduce(reinterpret_cast<Acc*>(smem), acc, threadIdx.x, 0, blockDim.x, 1);
  if (threadIdx.x == 0) {
    if (splits == 1) {
      op.finish(plane, total);
    } else {
      store_partial(partials, int64_t(splits) * planes, split * planes + plane, total);
    }
  }
}

// The results of each plane from its `splits` partials, merged in split order
// by one thread per plane (splits <= kMaxSplits).
template <typename Op>
__global__ void __launch_bounds__(kThreads) plane_finalize_kernel(
    Op op, int64_t planes, int64_t splits, const typename Op::acc_t* __restrict__ partials) {
  using Acc = typename Op::Acc;
  const int64_t plane = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (plane >= planes) return;
  Acc acc;
  for (int64_t s = 0; s < splits; ++s) {
    Acc part;
    load_partial(partials, splits * planes, s * planes + plane, part);
    acc = merge(acc, part);
  }
  op.finish(plane, acc);
}

// Tiny planes (S <= kSerialPositions, including S == 0): one thread per plane
// walks its S elements in batches of kUnroll (VEC = 1 ops). A block per plane
// would leave most of its threads idle and pay a tree of barriers for a few
// values.
template <typename Op>
__global__ void __launch_bounds__(kThreads) plane_serial_kernel(Op op, int64_t planes, int64_t S) {
  using Acc = typename Op::Acc;
  const int64_t plane = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (plane >= planes) return;
  const auto ctx = op.context(plane);
  const int64_t base = plane * S;
  Acc acc;
  for (int64_t i = 0; i < S; i += kUnroll) {
    typename Op::Loaded v[kUnroll] = {};
    int n = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u < S) {
        v[u] = op.load(base + i + u);
        n = u + 1;
      }
    }
    op.add(acc, ctx, v, n);
  }
  op.finish(plane, acc);
}

// ---------------------------------------------------------------------------
// The per-channel recurrences (one thread per channel, samples in order)
// ---------------------------------------------------------------------------

// Forward: for each sample n, mean[n, c] = mu and rstd[n, c] = 1 / sqrt(var +
// eps) with the state before the sample, then online_state_update with the
// sample's mean and variance; the final mu, var go back to the state. With
// plane_mean_square (layer scaling) also each plane's mean of the affine
// output's square (weight and bias (C,) acc_t, given then).
template <typename acc_t>
__global__ void __launch_bounds__(kRecurrenceThreads) forward_recurrence_kernel(
    const acc_t* __restrict__ sample_mean,  // (N, C)
    const acc_t* __restrict__ sample_var,   // (N, C)
    int64_t N,
    int64_t C,
    StateRef mu_state,
    StateRef var_state,
    acc_t alpha_fwd,
    acc_t eps,
    acc_t* __restrict__ mean,  // (N, C)
    acc_t* __restrict__ rstd,
    const acc_t* __restrict__ weight,           // (C,), with plane_mean_square
    const acc_t* __restrict__ bias,             // (C,), with plane_mean_square
    acc_t* __restrict__ plane_mean_square) {    // (N, C) or null
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t mu = mu_state.load<acc_t>(c);
  acc_t var = var_state.load<acc_t>(c);
#pragma unroll 4
  for (int64_t n = 0; n < N; ++n) {
    const int64_t i = n * C + c;
    mean[i] = mu;
    rstd[i] = rstd_from_var(var, eps);  // acc_t(1) / sqrt(var + eps), as the CPU
    if (plane_mean_square != nullptr) {
      plane_mean_square[i] = layer_scale_plane_mean_square(sample_mean[i], sample_var[i], mu, rstd[i], weight[c],
                                                            bias[c]);
    }
    online_state_update(mu, var, sample_mean[i], sample_var[i], alpha_fwd);
  }
  mu_state.store(c, mu);
  var_state.store(c, var);
}

// Layer scaling, one thread per sample, channels summed in order (as the
// CPU): layer_rstd[n] = 1 / sqrt(mean over c of plane_mean_square + eps).
template <typename acc_t>
__global__ void __launch_bounds__(kRecurrenceThreads) layer_scale_kernel(
    const acc_t* __restrict__ plane_mean_square,  // (N, C)
    int64_t N,
    int64_t C,
    acc_t eps,
    acc_t* __restrict__ layer_rstd) {  // (N,)
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  acc_t sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += plane_mean_square[n * C + c];
  layer_rstd[n] = rstd_from_var(sum / static_cast<acc_t>(C > 1 ? C : 1), eps);
}

// The rows of the backward's (3, N * C) coefficients of dx.
enum GradCoef : int { kCoefDy = 0, kCoefY, kCoefConst, kNumGradCoef };

// Layer scaling's backward, one thread per sample, channels summed in order
// (as the CPU): the sample's t from its planes' means of dy * z, then each
// plane's means of dy * y and dy replaced, in place, by those of the affine
// output's gradient r dy - t z.
template <typename acc_t>
__global__ void __launch_bounds__(kRecurrenceThreads) layer_scale_grad_kernel(
    acc_t* __restrict__ moments,            // (kNumGradMoments, N * C)
    int64_t N,
    int64_t C,
    const acc_t* __restrict__ weight,       // (C,)
    const acc_t* __restrict__ bias,         // (C,)
    const acc_t* __restrict__ layer_rstd,   // (N,)
    acc_t* __restrict__ layer_t) {          // (N,)
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t NC = N * C;
  acc_t sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t i = n * C + c;
    sum += layer_scale_plane_grad_dot(moments[kMeanDyY * NC + i], moments[kMeanDy * NC + i], weight[c], bias[c]);
  }
  const acc_t r = layer_rstd[n];
  const acc_t t = layer_scale_grad_t(r, sum / static_cast<acc_t>(C > 1 ? C : 1));
  layer_t[n] = t;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t i = n * C + c;
    layer_scale_grad_moments(moments[kMeanDyY * NC + i], moments[kMeanDy * NC + i], moments[kMeanY2 * NC + i],
                             moments[kMeanY * NC + i], r, t, weight[c], bias[c]);
  }
}

// Backward: the control process, for each sample n in order
// online_backward_step with u, v before the sample (which it updates) and the
// sample's saved rstd; dx's coefficients to coef (with layer_rstd given, on
// the incoming gradient through layer scaling: layer_scale_input_grad); the
// final u, v back to the state.
template <typename acc_t>
__global__ void __launch_bounds__(kRecurrenceThreads) backward_recurrence_kernel(
    const acc_t* __restrict__ moments,  // (kNumGradMoments, N * C)
    const acc_t* __restrict__ rstd,     // (N, C)
    int64_t N,
    int64_t C,
    int64_t S,
    const acc_t* __restrict__ weight,  // (C,)
    StateRef u_state,
    StateRef v_state,
    acc_t alpha_bkw,
    acc_t* __restrict__ coef,              // (kNumGradCoef, N * C)
    acc_t* __restrict__ grad_weight,       // (C,): sum dy y
    acc_t* __restrict__ grad_bias,         // (C,): sum dy
    const acc_t* __restrict__ bias,        // (C,), with layer_rstd
    const acc_t* __restrict__ layer_rstd,  // (N,) or null
    const acc_t* __restrict__ layer_t) {   // (N,), with layer_rstd
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t NC = N * C;
  acc_t u = u_state.load<acc_t>(c);
  acc_t v = v_state.load<acc_t>(c);
  acc_t sum_dy_y = 0, sum_dy = 0;
#pragma unroll 4
  for (int64_t n = 0; n < N; ++n) {
    const int64_t i = n * C + c;
    OnlineGradCoefficients<acc_t> k =
        online_backward_step(u, v, moments[kMeanDyY * NC + i], moments[kMeanY2 * NC + i],
                             moments[kMeanDy * NC + i], moments[kMeanY * NC + i], rstd[i], weight[c], alpha_bkw);
    if (layer_rstd != nullptr) k = layer_scale_input_grad(k, layer_rstd[n], layer_t[n], weight[c], bias[c]);
    coef[kCoefDy * NC + i] = k.dy;
    coef[kCoefY * NC + i] = k.y;
    coef[kCoefConst * NC + i] = k.constant;
    sum_dy_y += moments[kMeanDyY * NC + i];
    sum_dy += moments[kMeanDy * NC + i];
  }
  grad_weight[c] = sum_dy_y * static_cast<acc_t>(S);
  grad_bias[c] = sum_dy * static_cast<acc_t>(S);
  u_state.store(c, u);
  v_state.store(c, v);
}

// ---------------------------------------------------------------------------
// Element-wise kernels
// ---------------------------------------------------------------------------
//
// The (N, C, S) tensor as a flat array of numel elements; element e is in
// plane e / S, whose per-(n, c) values are at index n * C + c = e / S. A
// thread takes a VEC-element vector per step, walking from the end (see
// SampleWalker, kernel_helpers.cuh: planar geometry, Q = S positions, P = C
// channels), and fetches the per-plane values G elements at a time
// (gather_sample_channels: one broadcast load unless the G elements cross a
// plane boundary). A tail of < VEC elements is done one per thread.

// out = (x - mean) * scale + shift (scale = rstd * weight, shift = bias).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) normalize_kernel(
    const scalar_t* __restrict__ x,
    scalar_t* __restrict__ out,
    const acc_type_of<scalar_t>* __restrict__ mean,   // (N * C)
    const acc_type_of<scalar_t>* __restrict__ rstd,   // (N * C): the scale
    const acc_type_of<scalar_t>* __restrict__ shift,  // (N * C)
    int64_t numel,
    int64_t C,
    int64_t S) {
  using acc_t = acc_type_of<scalar_t>;
  constexpr int G = coef_chunk<scalar_t, VEC>();
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / VEC;

  SampleWalker walk(std::max<int64_t>(nvec - 1 - tid, 0) * VEC, nthreads * VEC, S, C);
  for (int64_t j = nvec - 1 - tid; j >= 0; j -= nthreads) {
    const Pack<scalar_t, VEC> xv = load_pack<VEC>(x, j);
    Pack<scalar_t, VEC> ov;
    int64_t q = walk.q, p = walk.p, n = walk.n;  // (position, channel, sample) of element k0
#pragma unroll
    for (int k0 = 0; k0 < VEC; k0 += G) {
      acc_t m[G], r[G], b[G];
      gather_sample_channels<G>(mean, q, p, n, S, C, C, /*planar=*/true, /*packed=*/false, m);
      gather_sample_channels<G>(rstd, q, p, n, S, C, C, /*planar=*/true, /*packed=*/false, r);
      gather_sample_channels<G>(shift, q, p, n, S, C, C, /*planar=*/true, /*packed=*/false, b);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        ov.v[k0 + k] = static_cast<scalar_t>(pre_activation(static_cast<acc_t>(xv.v[k0 + k]) - m[k], r[k], b[k]));
      }
      if (k0 + G < VEC) {
#pragma unroll
        for (int k = 0; k < G; ++k) next_position(q, p, n, S, C);
      }
    }
    store_pack<VEC>(out, j, ov);
    walk.retreat();
  }

  if constexpr (VEC > 1) {
    const int64_t e = nvec * VEC + tid;
    if (e < numel) {
      const int64_t i = e / S;
      out[e] = static_cast<scalar_t>(pre_activation(static_cast<acc_t>(x[e]) - mean[i], rstd[i], shift[i]));
    }
  }
}

// dx = online_input_grad(k, dy, y), y = (x - mean) * rstd.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) input_grad_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ dy,
    scalar_t* __restrict__ dx,
    const acc_type_of<scalar_t>* __restrict__ mean,  // (N * C)
    const acc_type_of<scalar_t>* __restrict__ rstd,  // (N * C)
    const acc_type_of<scalar_t>* __restrict__ coef,  // (kNumGradCoef, N * C)
    int64_t NC,
    int64_t numel,
    int64_t C,
    int64_t S) {
  using acc_t = acc_type_of<scalar_t>;
  constexpr int G = coef_chunk<scalar_t, VEC>();
  const acc_t* k_dy = coef + kCoefDy * NC;
  const acc_t* k_y = coef + kCoefY * NC;
  const acc_t* k_const = coef + kCoefConst * NC;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / VEC;

  SampleWalker walk(std::max<int64_t>(nvec - 1 - tid, 0) * VEC, nthreads * VEC, S, C);
  for (int64_t j = nvec - 1 - tid; j >= 0; j -= nthreads) {
    const Pack<scalar_t, VEC> xv = load_pack<VEC>(x, j);
    const Pack<scalar_t, VEC> dyv = load_pack<VEC>(dy, j);
    Pack<scalar_t, VEC> ov;
    int64_t q = walk.q, p = walk.p, n = walk.n;  // (position, channel, sample) of element k0
#pragma unroll
    for (int k0 = 0; k0 < VEC; k0 += G) {
      // One array at a time, so that at most 16 bytes of per-plane values
      // are live besides y: y from mean and rstd, then the coefficients.
      acc_t y[G], a[G], b[G], cst[G];
      gather_sample_channels<G>(mean, q, p, n, S, C, C, /*planar=*/true, /*packed=*/false, a);
      gather_sample_channels<G>(rstd, q, p, n, S, C, C, /*planar=*/true, /*packed=*/false, b);
#pragma unroll
      for (int k = 0; k < G; ++k) y[k] = (static_cast<acc_t>(xv.v[k0 + k]) - a[k]) * b[k];
      gather_sample_channels<G>(k_dy, q, p, n, S, C, C, /*planar=*/true, /*packed=*/false, a);
      gather_sample_channels<G>(k_y, q, p, n, S, C, C, /*planar=*/true, /*packed=*/false, b);
      gather_sample_channels<G>(k_const, q, p, n, S, C, C, /*planar=*/true, /*packed=*/false, cst);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const OnlineGradCoefficients<acc_t> kk{a[k], b[k], cst[k]};
        ov.v[k0 + k] = static_cast<scalar_t>(online_input_grad(kk, static_cast<acc_t>(dyv.v[k0 + k]), y[k]));
      }
      if (k0 + G < VEC) {
#pragma unroll
        for (int k = 0; k < G; ++k) next_position(q, p, n, S, C);
      }
    }
    store_pack<VEC>(dx, j, ov);
    walk.retreat();
  }

  if constexpr (VEC > 1) {
    const int64_t e = nvec * VEC + tid;
    if (e < numel) {
      const int64_t i = e / S;
      const acc_t y = (static_cast<acc_t>(x[e]) - mean[i]) * rstd[i];
      const OnlineGradCoefficients<acc_t> kk{k_dy[i], k_y[i], k_const[i]};
      dx[e] = static_cast<scalar_t>(online_input_grad(kk, static_cast<acc_t>(dy[e]), y));
    }
  }
}

// ---------------------------------------------------------------------------
// Host side: launches
// ---------------------------------------------------------------------------

// Runs the reduction of `op` (a VEC = 1 op when S <= kSerialPositions) over
// `planes` planes of S elements; the results land where op.finish writes
// them. Tiny planes: a thread each. Otherwise a block per plane, small planes
// getting small blocks (down to a warp); when there are too few planes to
// keep about two waves of threads busy, each plane is split over up to
// kMaxSplits blocks (each still given at least kUnroll packs per thread),
// whose partials plane_finalize_kernel merges.
template <typename Op, int VEC>
void launch_plane_reduce(const char* op_name, const Op& op, int64_t planes, int64_t S,
                         const at::TensorOptions& acc_options, cudaStream_t stream) {
  using acc_t = typename Op::acc_t;
  if constexpr (VEC == 1) {
    if (S <= kSerialPositions) {
      plane_serial_kernel<Op><<<static_cast<unsigned>(ceil_div(planes, kThreads)), kThreads, 0, stream>>>(op, planes,
                                                                                                            S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  } else {
    TORCH_INTERNAL_ASSERT(S > kSerialPositions && S % VEC == 0);
  }
  static const int per_sm = blocks_per_sm(plane_reduce_kernel<Op, VEC>, kThreads);
  const int64_t npacks = S / VEC;
  int threads = 32;
  while (threads < kThreads && int64_t(threads) * kUnroll < npacks) threads *= 2;
  const int64_t target_threads = 2 * wave_blocks(per_sm) * kThreads;
  const int64_t splits = std::max<int64_t>(
      1, std::min({ceil_div(target_threads, planes * threads), ceil_div(npacks, int64_t(threads) * kUnroll),
                   int64_t(kMaxSplits)}));
  const int64_t blocks = planes * splits;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op_name, ": too many (sample, channel) planes (", planes,
              ")");
  Tensor partials;
  acc_t* partials_ptr = nullptr;
  if (splits > 1) {
    partials = at::empty({Op::kFields, blocks}, acc_options);
    partials_ptr = partials.mutable_data_ptr<acc_t>();
  }
  plane_reduce_kernel<Op, VEC><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      op, planes, S, static_cast<unsigned>(splits), partials_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    plane_finalize_kernel<Op><<<static_cast<unsigned>(ceil_div(planes, kThreads)), kThreads, 0, stream>>>(
        op, planes, splits, partials_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The vector width of a plane reduction: 16-byte loads when every plane
// starts 16-byte aligned (S % kVec == 0 and aligned data) and planes are
// large enough for the block kernel.
template <typename scalar_t>
bool vector_planes(int64_t S, std::initializer_list<const void*> data) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (S <= kSerialPositions || S % kVec != 0) return false;
  for (const void* p : data) {
    if (!is_aligned16(p)) return false;
  }
  return true;
}

unsigned recurrence_grid(int64_t C) {
  return static_cast<unsigned>(ceil_div(C, kRecurrenceThreads));
}

// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

// weight and bias as contiguous (C,) acc_t values (1 and 0 when absent).
Tensor channel_acc(const std::optional<Tensor>& t, int64_t C, double fill, const at::TensorOptions& acc_options) {
  return t ? t->to(acc_options.dtype()).contiguous() : at::full({C}, fill, acc_options);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> online_norm_cuda(const Tensor& input, const std::optional<Tensor>& weight,
                                                            const std::optional<Tensor>& bias, const Tensor& mu,
                                                            const Tensor& var, const Tensor& u, const Tensor& v,
                                                            double alpha_fwd, double alpha_bkw, double eps,
                                                            bool layer_scale) {
  constexpr const char* op = "torchnorm.online_norm";
  check_online_norm(op, input, weight, bias, mu, var, u, v, alpha_fwd, alpha_bkw, eps);
  // After the check, which puts the state on the input's device: the input is
  // a CUDA tensor (a CPU input with CUDA state fails the check).
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = N * C > 0 ? x.numel() / (N * C) : 0;
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  Tensor out = at::empty_like(x);
  Tensor mean = at::empty({N, C}, acc_options), rstd = at::empty({N, C}, acc_options);
  Tensor layer_rstd = at::empty({layer_scale ? N : 0}, acc_options);
  // No sample or no channel: the state stays as it is (and r = 1 / sqrt(eps)
  // for the samples of no channel, as the CPU).
  if (N * C == 0) return {out, mean, rstd, layer_scale ? layer_rstd.fill_(1.0 / std::sqrt(eps)) : layer_rstd};
  const int64_t NC = N * C;
  // The parameters as (C,) acc_t values, read per channel by the layer
  // scaling's kernels.
  const Tensor weight_acc = layer_scale ? channel_acc(weight, C, 1.0, acc_options) : Tensor();
  const Tensor bias_acc = layer_scale ? channel_acc(bias, C, 0.0, acc_options) : Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "online_norm_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();

    // 1. Each sample's mean and biased variance per channel.
    Tensor sample = at::empty({2, NC}, acc_options);
    acc_t* sample_mean = sample.mutable_data_ptr<acc_t>();
    acc_t* sample_var = sample_mean + NC;
    if (vector_planes<scalar_t>(S, {xp})) {
      launch_plane_reduce<PlaneStatsOp<scalar_t, kVec>, kVec>(op, {xp, sample_mean, sample_var, S}, NC, S,
                                                              acc_options, stream);
    } else {
      launch_plane_reduce<PlaneStatsOp<scalar_t, 1>, 1>(op, {xp, sample_mean, sample_var, S}, NC, S, acc_options,
                                                        stream);
    }

    // 2. The recurrence over the samples, channel by channel (with layer
    //    scaling also each plane's mean square of the affine output, then
    //    each sample's scale).
    acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
    acc_t* rstd_p = rstd.mutable_data_ptr<acc_t>();
    Tensor plane_mean_square = layer_scale ? at::empty({NC}, acc_options) : Tensor();
    acc_t* plane_ms_p = layer_scale ? plane_mean_square.mutable_data_ptr<acc_t>() : nullptr;
    forward_recurrence_kernel<acc_t><<<recurrence_grid(C), kRecurrenceThreads, 0, stream>>>(
        sample_mean, sample_var, N, C, state_ref(mu), state_ref(var), static_cast<acc_t>(alpha_fwd),
        static_cast<acc_t>(eps), mean_p, rstd_p, layer_scale ? weight_acc.const_data_ptr<acc_t>() : nullptr,
        layer_scale ? bias_acc.const_data_ptr<acc_t>() : nullptr, plane_ms_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (layer_scale) {
      layer_scale_kernel<acc_t><<<recurrence_grid(N), kRecurrenceThreads, 0, stream>>>(
          plane_ms_p, N, C, static_cast<acc_t>(eps), layer_rstd.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // 3. out = ((x - mean) * rstd * weight + bias) * r with each sample's
    //    statistics (r = 1 without layer scaling): per (sample, channel) scale
    //    and shift, a few ATen ops on (N, C) values.
    const int64_t numel = x.numel();
    if (numel == 0) return;  // S == 0
    Tensor scale = weight ? rstd * weight->to(acc_type).view({1, C}) : rstd;
    Tensor shift = bias ? bias->to(acc_type).view({1, C}).expand({N, C}).contiguous() : at::zeros_like(rstd);
    if (layer_scale) {
      scale = scale * layer_rstd.view({N, 1});
      shift = shift * layer_rstd.view({N, 1});
    }
    const acc_t* scale_p = scale.const_data_ptr<acc_t>();
    const acc_t* shift_p = shift.const_data_ptr<acc_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    if (is_aligned16(xp) && is_aligned16(outp)) {
      launch_elementwise<normalize_kernel<scalar_t, kVec>, kVec, kThreads>(numel, stream, xp, outp, mean_p, scale_p,
                                                                           shift_p, numel, C, S);
    } else {
      launch_elementwise<normalize_kernel<scalar_t, 1>, 1, kThreads>(numel, stream, xp, outp, mean_p, scale_p,
                                                                     shift_p, numel, C, S);
    }
  });
  return {out, mean, rstd, layer_rstd};
}

std::tuple<Tensor, Tensor, Tensor> online_norm_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                                             const std::optional<Tensor>& weight, const Tensor& mean,
                                                             const Tensor& rstd, const Tensor& u, const Tensor& v,
                                                             double alpha_bkw, std::array<bool, 3> output_mask,
                                                             const std::optional<Tensor>& bias,
                                                             const std::optional<Tensor>& layer_rstd) {
  constexpr const char* op = "torchnorm.online_norm_backward";
  check_online_norm_backward(op, grad_output, input, weight, mean, rstd, u, v, alpha_bkw, bias, layer_rstd);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous(), dy = grad_output.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = N * C > 0 ? x.numel() / (N * C) : 0;
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  Tensor grad_input = at::empty_like(x);
  Tensor grad_weight = at::zeros({C}, acc_options), grad_bias = at::zeros({C}, acc_options);
  const auto param_type = parameter_type(input, weight);
  auto result = [&] {
    return std::make_tuple(output_mask[0] ? grad_input : empty_placeholder(input, input.scalar_type()),
                           output_mask[1] ? grad_weight.to(param_type) : empty_placeholder(input, param_type),
                           output_mask[2] ? grad_bias.to(param_type) : empty_placeholder(input, param_type));
  };
  if (N * C == 0) return result();  // no sample or no channel: the state stays as it is
  const int64_t NC = N * C;
  const Tensor weight_acc = channel_acc(weight, C, 1.0, acc_options);
  const bool layer_scale = layer_rstd.has_value();
  const Tensor bias_acc = layer_scale ? channel_acc(bias, C, 0.0, acc_options) : Tensor();
  const Tensor layer_rstd_acc = layer_scale ? layer_rstd->to(acc_type).contiguous() : Tensor();
  // The saved statistics in the accumulation dtype (a no-op for the forward's
  // own mean and rstd).
  const Tensor mean_acc = mean.to(acc_type).contiguous(), rstd_acc = rstd.to(acc_type).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "online_norm_backward_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const acc_t* m = mean_acc.const_data_ptr<acc_t>();
    const acc_t* r = rstd_acc.const_data_ptr<acc_t>();

    // 1. Per (sample, channel): the means of dy * y, y^2, dy and y.
    Tensor moments = at::empty({kNumGradMoments, NC}, acc_options);
    acc_t* moments_p = moments.mutable_data_ptr<acc_t>();
    if (vector_planes<scalar_t>(S, {xp, dyp})) {
      launch_plane_reduce<PlaneGradOp<scalar_t, kVec>, kVec>(op, {xp, dyp, m, r, moments_p, NC, S}, NC, S,
                                                             acc_options, stream);
    } else {
      launch_plane_reduce<PlaneGradOp<scalar_t, 1>, 1>(op, {xp, dyp, m, r, moments_p, NC, S}, NC, S, acc_options,
                                                       stream);
    }

    // 1b. Layer scaling: dy was the gradient of the scaled output; the means
    //     become those of the affine output's gradient, per sample.
    const acc_t* w = weight_acc.const_data_ptr<acc_t>();
    const acc_t* b = layer_scale ? bias_acc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* lr = layer_scale ? layer_rstd_acc.const_data_ptr<acc_t>() : nullptr;
    Tensor layer_t = layer_scale ? at::empty({N}, acc_options) : Tensor();
    acc_t* lt = layer_scale ? layer_t.mutable_data_ptr<acc_t>() : nullptr;
    if (layer_scale) {
      layer_scale_grad_kernel<acc_t><<<recurrence_grid(N), kRecurrenceThreads, 0, stream>>>(moments_p, N, C, w, b,
                                                                                              lr, lt);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // 2. The control process over the samples, channel by channel.
    Tensor coef = at::empty({kNumGradCoef, NC}, acc_options);
    acc_t* coef_p = coef.mutable_data_ptr<acc_t>();
    backward_recurrence_kernel<acc_t><<<recurrence_grid(C), kRecurrenceThreads, 0, stream>>>(
        moments_p, r, N, C, S, w, state_ref(u), state_ref(v), static_cast<acc_t>(alpha_bkw), coef_p,
        grad_weight.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>(), b, lr, lt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 3. dx = dy * k_dy + y * k_y + k_const.
    const int64_t numel = x.numel();
    if (numel == 0) return;  // S == 0
    scalar_t* dxp = grad_input.mutable_data_ptr<scalar_t>();
    if (is_aligned16(xp) && is_aligned16(dyp) && is_aligned16(dxp)) {
      launch_elementwise<input_grad_kernel<scalar_t, kVec>, kVec, kThreads>(numel, stream, xp, dyp, dxp, m, r,
                                                                            coef_p, NC, numel, C, S);
    } else {
      launch_elementwise<input_grad_kernel<scalar_t, 1>, 1, kThreads>(numel, stream, xp, dyp, dxp, m, r, coef_p, NC,
                                                                      numel, C, S);
    }
  });
  return result();
}

}  // namespace
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  m.impl("online_norm", TORCH_FN(torchnorm::online_norm_cuda));
  m.impl("online_norm_backward", TORCH_FN(torchnorm::online_norm_backward_cuda));
}
