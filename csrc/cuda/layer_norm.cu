// CUDA kernels of torchnorm's row norms: layer_norm, rms_norm and
// layer_norm_backward (RMSNorm's backward too). Argument checks, shapes and
// output allocation are done by plan_row_norm / plan_row_norm_backward
// (common/sample_norm_plan.h); the per-element math comes from common/
// (batch_norm_math.h, sample_norm_math.h), so the CPU and CUDA kernels compute
// the same functions; vector loads, ChannelParam, the row-group sums and the
// block reductions from kernel_helpers.cuh.
//
// The input is M rows of D contiguous elements; each row is normalized on its
// own, with per-element (length D) weight and bias.
//
// Forward, cached rows (the common case: D up to 16K elements, 8K for
//   double, 4K for unaligned rows): a group of threads per row (a power of
//   two, 1 ... 512, the fewest whose registers hold the row, 32 elements a
//   thread) loads the row once into registers (adding the residual and
//   writing s = x + residual on the way), takes the mean and the centred sum
//   of squares in two passes over the registers (an exact two-pass variance,
//   no E[x^2] - E[x]^2), and writes the output: 1 read and 1 write of the
//   row (2 and 2 with a residual). Short rows share a 256-thread block (a
//   warp or less per row: shuffles only); long rows get up to 512 threads
//   and one shared-memory step. 16-byte loads and stores throughout.
// Forward, uncached rows (longer): one 512-thread block per row, batches of
//   values merged with Chan's formula over global memory, then a second pass
//   that re-reads the row (s from `sum` when a residual was added).
//
// Backward, cached rows (D up to 8K elements, 4K for double or unaligned
//   rows, 2K for unaligned double): the row's x and dy are cached in
//   registers (16 elements a thread), the row sums sum(g) and sum(g * xc),
//   g = dy * w, are reduced as in the forward, and dx written. grad_weight /
//   grad_bias are accumulated in registers across the rows a block visits
//   (the grid is one wave of blocks that loop over the rows; a thread always
//   owns the same columns), written as one partial row per block to a float
//   workspace, and summed over the blocks by column_sum_kernel: x and dy are
//   read once, and the sums are deterministic (fixed order, no atomics).
// Backward, uncached rows: one block per row for dx (two passes over global
//   memory), and a column-tiled kernel for the parameter partials.
//
// Templates: per input dtype x {16-byte vectors, scalars} for the cached
// kernels; per dtype only for the fallbacks and the column sums (32 kernels).
// The parameter dtype (input dtype or float32), the residual, RMS-vs-LayerNorm
// and the output mask are run-time switches.
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
#include <tuple>

#include "common/batch_norm_math.h"
#include "common/sample_norm_plan.h"
#include "common/sample_norm_math.h"
#include "common/welford.h"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

constexpr int kRowThreads = 512;  // most threads on one row, and per block
constexpr int kLog2RowThreads = 9;
constexpr int kRowBlock = 256;  // block of the cached kernels when rows share a block
constexpr int kUnroll = 4;      // independent loads per thread per iteration of the uncached loops
constexpr int64_t kMaxGrid = int64_t(1) << 30;  // grid-stride loops cover the rest

// Packs each thread of a cached kernel keeps in registers. Forward: 32
// elements (16 for double), i.e. 8 16-byte packs of float32, 4 of half; 8
// scalars when unvectorized (each scalar costs a register and an address).
// Backward: 16 elements of x and of dy (8 for double or unvectorized, 4 for
// unvectorized double), plus register accumulators of grad_weight /
// grad_bias of the same size. Chosen so that the instantiations stay within
// their register bounds without spilling (ptxas -v, sm_80 and sm_90; the one
// exception, unvectorized float32 backward, spills ~70 bytes to L1).
template <typename scalar_t, int VEC>
constexpr int forward_cache_packs() {
  return VEC > 1 ? (sizeof(scalar_t) == 8 ? 16 : 32) / VEC : 8;
}

template <typename scalar_t, int VEC>
constexpr int backward_cache_packs() {
  if constexpr (VEC == 1) return sizeof(scalar_t) == 8 ? 4 : 8;
  return (sizeof(scalar_t) == 8 ? 8 : 16) / VEC;
}

// Blocks of kRowThreads the forward kernel must fit per SM: 2 (<= 64
// registers) for the vectorized kernels; the scalar ones need more registers
// per cached element and get 1.
template <int VEC>
constexpr int forward_min_blocks() {
  return VEC > 1 ? 2 : 1;
}

// log2 of the threads per row of a cached kernel: the fewest (a power of two)
// whose caches of cache_packs packs each hold the row's npacks packs. Above
// kLog2RowThreads the row is not cached.
int log2_threads_per_row(int64_t npacks, int cache_packs) {
  int l = 0;
  while ((int64_t(cache_packs) << l) < npacks) ++l;
  return l;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// Cached rows. block = max(tpr, kRowBlock) threads with tpr = 1 << log2_tpr
// threads per row, so a block holds blockDim.x / tpr rows; thread `lane` of a
// row owns its packs lane, lane + tpr, ... (consecutive threads read
// consecutive 16-byte packs). The grid loops over groups of rows.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kRowThreads, forward_min_blocks<VEC>()) row_forward_cached_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ residual,  // nullable
    scalar_t* __restrict__ sum,             // s = x + residual, written when residual is given
    scalar_t* __restrict__ out,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    acc_type_of<scalar_t>* __restrict__ mean_out,  // nullable (RMSNorm)
    acc_type_of<scalar_t>* __restrict__ rstd_out,
    int64_t M,
    int D,
    int log2_tpr,
    acc_type_of<scalar_t> eps,
    bool rms) {
  using acc_t = acc_type_of<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  constexpr int kPacks = forward_cache_packs<scalar_t, VEC>();
  __shared__ acc_t red[1][kMaxBlockWarps];

  const int tpr = 1 << log2_tpr;
  const int rows_per_block = blockDim.x >> log2_tpr;
  const int lane = threadIdx.x & (tpr - 1);
  const int npacks = D / VEC;
  const acc_t count = static_cast<acc_t>(D);
  const bool has_residual = residual != nullptr;

  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < M;
       first += int64_t(gridDim.x) * rows_per_block) {
    // Every thread runs every iteration (the reductions may synchronize the
    // block); the threads of a row past M load nothing and store nothing.
    const int64_t row = first + (threadIdx.x >> log2_tpr);
    const bool row_ok = row < M;
    const int64_t base = row * D;

    PackT s[kPacks] = {};
    if (has_residual) {
      // s is rounded to the input dtype, as it is returned: the statistics
      // are those of the tensor the backward will be handed.
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        const int p = k * tpr + lane;
        if (row_ok && p < npacks) {
          const PackT xk = load_pack<VEC>(x + base, p);
          const PackT rk = load_pack<VEC>(residual + base, p);
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            s[k].v[v] = static_cast<scalar_t>(static_cast<acc_t>(xk.v[v]) + static_cast<acc_t>(rk.v[v]));
          }
          store_pack<VEC>(sum + base, p, s[k]);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        const int p = k * tpr + lane;
        if (row_ok && p < npacks) s[k] = load_pack<VEC>(x + base, p);
      }
    }

    acc_t mean = acc_t(0);
    if (!rms) {
      acc_t t[1] = {acc_t(0)};
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        const int p = k * tpr + lane;
        if (row_ok && p < npacks) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) t[0] += static_cast<acc_t>(s[k].v[v]);
        }
      }
      group_allreduce_sum<1>(t, log2_tpr, red);
      mean = t[0] / count;
    }
    acc_t q[1] = {acc_t(0)};  // sum of squared deviations (RMSNorm: of squares)
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int p = k * tpr + lane;
      if (row_ok && p < npacks) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc_t d = static_cast<acc_t>(s[k].v[v]) - mean;
          q[0] += d * d;
        }
      }
    }
    group_allreduce_sum<1>(q, log2_tpr, red);
    const acc_t rstd = rstd_from_var(q[0] / count, eps);
    if (row_ok && lane == 0) {
      if (mean_out != nullptr) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }

#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int p = k * tpr + lane;
      if (row_ok && p < npacks) {
        acc_t w[VEC], b[VEC];
        weight.template load_vec<VEC>(int64_t(p) * VEC, acc_t(1), w);
        bias.template load_vec<VEC>(int64_t(p) * VEC, acc_t(0), b);
        PackT o;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const auto fc = forward_coefficients(rstd, w[v], b[v]);
          o.v[v] = static_cast<scalar_t>(pre_activation(static_cast<acc_t>(s[k].v[v]) - mean, fc.scale, fc.shift));
        }
        store_pack<VEC>(out + base, p, o);
      }
    }
  }
}

// Rows too long to cache: one block per row (grid-stride over rows). Pass 1
// reads x (+ residual, writing s) and merges per-thread batches with Chan's
// formula (RMSNorm: sums squares); pass 2 re-reads s, from `sum` when a
// residual was added (each thread reads back only what it wrote), and writes
// the output.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads) row_forward_uncached_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ residual,  // nullable
    scalar_t* sum,                          // written, then read back: not __restrict__
    scalar_t* __restrict__ out,
    ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> bias,
    acc_type_of<scalar_t>* __restrict__ mean_out,  // nullable (RMSNorm)
    acc_type_of<scalar_t>* __restrict__ rstd_out,
    int64_t M,
    int64_t D,
    acc_type_of<scalar_t> eps,
    bool rms) {
  using acc_t = acc_type_of<scalar_t>;
  __shared__ __align__(16) unsigned char smem[kRowThreads * sizeof(MeanM2<acc_t>)];
  auto* sm = reinterpret_cast<MeanM2<acc_t>*>(smem);
  const int64_t step = blockDim.x;
  const bool has_residual = residual != nullptr;

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t base = row * D;
    MeanM2<acc_t> acc;
    for (int64_t i = threadIdx.x; i < D; i += kUnroll * step) {
      scalar_t xv[kUnroll] = {}, rv[kUnroll] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = i + u * step;
        if (j < D) {
          xv[u] = x[base + j];
          if (has_residual) rv[u] = residual[base + j];
        }
      }
      acc_t v[kUnroll];
      int n = 0;  // the valid u are a prefix
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = i + u * step;
        v[u] = acc_t(0);
        if (j < D) {
          scalar_t s = xv[u];
          if (has_residual) {
            s = static_cast<scalar_t>(static_cast<acc_t>(xv[u]) + static_cast<acc_t>(rv[u]));
            sum[base + j] = s;
          }
          v[u] = static_cast<acc_t>(s);
          n = u + 1;
        }
      }
      if (rms) {
        // Uncentred: mean stays 0, so Chan's merge below just adds the m2s.
        acc.count += static_cast<acc_t>(n);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) acc.m2 += v[u] * v[u];
      } else {
        add_batch<kUnroll>(acc, v, n);
      }
    }
    const MeanM2<acc_t> total = block_tree_reduce(sm, acc, threadIdx.x, 0, blockDim.x, 1);
    __syncthreads();  // all have read the total before the next row's tree overwrites it
    const acc_t mean = rms ? acc_t(0) : total.mean;
    const acc_t rstd = rstd_from_var(total.m2 / static_cast<acc_t>(D), eps);
    if (threadIdx.x == 0) {
      if (mean_out != nullptr) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    const scalar_t* src = has_residual ? sum : x;
    for (int64_t i = threadIdx.x; i < D; i += step) {
      const auto fc = forward_coefficients(rstd, weight.load(i, acc_t(1)), bias.load(i, acc_t(0)));
      out[base + i] =
          static_cast<scalar_t>(pre_activation(static_cast<acc_t>(src[base + i]) - mean, fc.scale, fc.shift));
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// Cached rows; thread layout as row_forward_cached_kernel. Per row, with
// g = dy * w and xc = x - mean (RMSNorm: x):
//   dx = g * dz_coef + xc * xc_coef + const_coef (+ grad_sum),
// coefficients from sample_backward_coefficients over the row's sum(g) and
// sum(g * xc). When `partials` is given the grid is at most one wave, and
// each thread accumulates dy * xc * rstd and dy for its own columns over all
// the rows its block visits; the rows of a block are then added in a fixed
// order and written as partials[0][blockIdx.x][:] (grad_weight) and
// partials[1][blockIdx.x][:] (grad_bias).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kRowThreads) row_backward_cached_kernel(
    const scalar_t* __restrict__ dy,
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ grad_sum,  // nullable
    const acc_type_of<scalar_t>* __restrict__ mean,  // nullable (RMSNorm)
    const acc_type_of<scalar_t>* __restrict__ rstd,
    ChannelParam<scalar_t> weight,
    scalar_t* __restrict__ dx,                         // nullable (not wanted)
    acc_type_of<scalar_t>* __restrict__ partials,      // nullable: (2, gridDim.x, D)
    int64_t M,
    int D,
    int log2_tpr) {
  using acc_t = acc_type_of<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  constexpr int kPacks = backward_cache_packs<scalar_t, VEC>();
  __shared__ acc_t red[2][kMaxBlockWarps];
  __shared__ acc_t slot_sm[kRowBlock * VEC];

  const int tpr = 1 << log2_tpr;
  const int rows_per_block = blockDim.x >> log2_tpr;
  const int lane = threadIdx.x & (tpr - 1);
  const int npacks = D / VEC;
  const acc_t count = static_cast<acc_t>(D);
  const bool rms = mean == nullptr;
  const bool want_params = partials != nullptr;

  acc_t gw[kPacks][VEC], gb[kPacks][VEC];
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      gw[k][v] = acc_t(0);
      gb[k][v] = acc_t(0);
    }
  }

  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < M;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t row = first + (threadIdx.x >> log2_tpr);
    const bool row_ok = row < M;
    const int64_t base = row * D;

    PackT xv[kPacks] = {}, gv[kPacks] = {};
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int p = k * tpr + lane;
      if (row_ok && p < npacks) {
        xv[k] = load_pack<VEC>(x + base, p);
        gv[k] = load_pack<VEC>(dy + base, p);
      }
    }
    const acc_t m = (row_ok && !rms) ? mean[row] : acc_t(0);
    const acc_t r = row_ok ? rstd[row] : acc_t(0);

    acc_t sums[2] = {acc_t(0), acc_t(0)};  // sum(g), sum(g * xc)
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int p = k * tpr + lane;
      if (row_ok && p < npacks) {
        acc_t w[VEC];
        weight.template load_vec<VEC>(int64_t(p) * VEC, acc_t(1), w);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc_t xc = static_cast<acc_t>(xv[k].v[v]) - m;
          const acc_t g = static_cast<acc_t>(gv[k].v[v]) * w[v];
          sums[0] += g;
          sums[1] += g * xc;
        }
      }
    }
    group_allreduce_sum<2>(sums, log2_tpr, red);

    if (dx != nullptr) {
      const auto coef = sample_backward_coefficients<acc_t>(!rms, r, sums[0], sums[1], count);
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        const int p = k * tpr + lane;
        if (row_ok && p < npacks) {
          acc_t w[VEC];
          weight.template load_vec<VEC>(int64_t(p) * VEC, acc_t(1), w);
          PackT gs{};
          if (grad_sum != nullptr) gs = load_pack<VEC>(grad_sum + base, p);
          PackT o;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const acc_t xc = static_cast<acc_t>(xv[k].v[v]) - m;
            const acc_t g = static_cast<acc_t>(gv[k].v[v]) * w[v];
            acc_t d = g * coef.dz_coef + xc * coef.xc_coef + coef.const_coef;
            if (grad_sum != nullptr) d += static_cast<acc_t>(gs.v[v]);
            o.v[v] = static_cast<scalar_t>(d);
          }
          store_pack<VEC>(dx + base, p, o);
        }
      }
    }

    if (want_params) {
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        const int p = k * tpr + lane;
        if (row_ok && p < npacks) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const acc_t xc = static_cast<acc_t>(xv[k].v[v]) - m;
            const acc_t d = static_cast<acc_t>(gv[k].v[v]);
            gw[k][v] += d * xc * r;
            gb[k][v] += d;
          }
        }
      }
    }
  }

  if (!want_params) return;  // uniform across the grid
  acc_t* part_w = partials + int64_t(blockIdx.x) * D;
  acc_t* part_b = partials + (int64_t(gridDim.x) + blockIdx.x) * D;
  if (rows_per_block == 1) {
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int p = k * tpr + lane;
      if (p < npacks) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          part_w[int64_t(p) * VEC + v] = gw[k][v];
          part_b[int64_t(p) * VEC + v] = gb[k][v];
        }
      }
    }
    return;
  }
  // Several rows per block (blockDim.x == kRowBlock): add the row slots'
  // accumulators of each column, slot 0 first, through shared memory.
  const int slot = threadIdx.x >> log2_tpr;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int p = k * tpr + lane;
#pragma unroll
    for (int field = 0; field < 2; ++field) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) slot_sm[threadIdx.x * VEC + v] = field == 0 ? gw[k][v] : gb[k][v];
      __syncthreads();
      if (slot == 0 && p < npacks) {
        acc_t* dst = field == 0 ? part_w : part_b;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          acc_t t = slot_sm[lane * VEC + v];
          for (int j = 1; j < rows_per_block; ++j) t += slot_sm[((j << log2_tpr) + lane) * VEC + v];
          dst[int64_t(p) * VEC + v] = t;
        }
      }
      __syncthreads();
    }
  }
}

template <typename acc_t>
struct ColumnSums {
  acc_t weight = acc_t(0);  // sum of dy * xc * rstd
  acc_t bias = acc_t(0);    // sum of dy
};

template <typename acc_t>
__device__ __forceinline__ ColumnSums<acc_t> merge(const ColumnSums<acc_t>& a, const ColumnSums<acc_t>& b) {
  ColumnSums<acc_t> r;
  r.weight = a.weight + b.weight;
  r.bias = a.bias + b.bias;
  return r;
}

// dx of rows too long to cache: one block per row, two passes over global
// memory (the sums, then dx).
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads) row_backward_uncached_kernel(
    const scalar_t* __restrict__ dy,
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ grad_sum,           // nullable
    const acc_type_of<scalar_t>* __restrict__ mean,  // nullable (RMSNorm)
    const acc_type_of<scalar_t>* __restrict__ rstd,
    ChannelParam<scalar_t> weight,
    scalar_t* __restrict__ dx,
    int64_t M,
    int64_t D) {
  using acc_t = acc_type_of<scalar_t>;
  __shared__ __align__(16) unsigned char smem[kRowThreads * sizeof(SumPair<acc_t>)];
  auto* sm = reinterpret_cast<SumPair<acc_t>*>(smem);
  const int64_t step = blockDim.x;
  const bool rms = mean == nullptr;
  const acc_t count = static_cast<acc_t>(D);

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t base = row * D;
    const acc_t m = rms ? acc_t(0) : mean[row];
    const acc_t r = rstd[row];
    SumPair<acc_t> acc;  // dz: sum(g), dz_xc: sum(g * xc)
    for (int64_t i = threadIdx.x; i < D; i += kUnroll * step) {
      scalar_t xv[kUnroll] = {}, gv[kUnroll] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = i + u * step;
        if (j < D) {
          xv[u] = x[base + j];
          gv[u] = dy[base + j];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = i + u * step;
        if (j < D) {
          const acc_t g = static_cast<acc_t>(gv[u]) * weight.load(j, acc_t(1));
          acc.dz += g;
          acc.dz_xc += g * (static_cast<acc_t>(xv[u]) - m);
        }
      }
    }
    const SumPair<acc_t> total = block_tree_reduce(sm, acc, threadIdx.x, 0, blockDim.x, 1);
    __syncthreads();  // all have read the total before the next row's tree overwrites it
    const auto coef = sample_backward_coefficients<acc_t>(!rms, r, total.dz, total.dz_xc, count);
    for (int64_t i = threadIdx.x; i < D; i += step) {
      const acc_t xc = static_cast<acc_t>(x[base + i]) - m;
      const acc_t g = static_cast<acc_t>(dy[base + i]) * weight.load(i, acc_t(1));
      acc_t d = g * coef.dz_coef + xc * coef.xc_coef + coef.const_coef;
      if (grad_sum != nullptr) d += static_cast<acc_t>(grad_sum[base + i]);
      dx[base + i] = static_cast<scalar_t>(d);
    }
  }
}

// Parameter-gradient partials of uncached rows. block = (32, 8), grid =
// (ceil(D / 32), splits): thread (tx, ty) owns column d = blockIdx.x*32 + tx
// (a warp reads 32 consecutive columns of one row) and rows blockIdx.y*8 + ty
// (step splits*8); the block's 8 row-threads are added in a fixed tree and
// written to partials[field][blockIdx.y][d].
template <typename scalar_t>
__global__ void __launch_bounds__(256) row_param_partials_kernel(
    const scalar_t* __restrict__ dy,
    const scalar_t* __restrict__ x,
    const acc_type_of<scalar_t>* __restrict__ mean,  // nullable (RMSNorm)
    const acc_type_of<scalar_t>* __restrict__ rstd,
    int64_t M,
    int64_t D,
    acc_type_of<scalar_t>* __restrict__ partials) {
  using acc_t = acc_type_of<scalar_t>;
  __shared__ __align__(16) unsigned char smem[256 * sizeof(ColumnSums<acc_t>)];
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r_step = int64_t(gridDim.y) * blockDim.y;
  ColumnSums<acc_t> acc;
  if (d < D) {
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += kUnroll * r_step) {
      scalar_t xv[kUnroll] = {}, gv[kUnroll] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + u * r_step;
        if (row < M) {
          xv[u] = x[row * D + d];
          gv[u] = dy[row * D + d];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + u * r_step;
        if (row < M) {
          const acc_t m = mean != nullptr ? mean[row] : acc_t(0);
          const acc_t g = static_cast<acc_t>(gv[u]);
          acc.weight += g * (static_cast<acc_t>(xv[u]) - m) * rstd[row];
          acc.bias += g;
        }
      }
    }
  }
  const ColumnSums<acc_t> total = block_tree_reduce(reinterpret_cast<ColumnSums<acc_t>*>(smem), acc, threadIdx.y,
                                                    threadIdx.x, blockDim.y, blockDim.x);
  if (threadIdx.y == 0 && d < D) {
    partials[int64_t(blockIdx.y) * D + d] = total.weight;
    partials[(int64_t(gridDim.y) + blockIdx.y) * D + d] = total.bias;
  }
}

// grad_weight[d] = sum_j partials[0][j][d], grad_bias[d] = sum_j
// partials[1][j][d], in the parameters' dtype. block = (32, 32), grid =
// ceil(D / 32): 32 columns per block, 32 threads along the partial rows,
// added in a fixed tree.
template <typename scalar_t>
__global__ void __launch_bounds__(1024) column_sum_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials,
    int64_t rows,
    int64_t D,
    ChannelParam<scalar_t> grad_weight,  // absent when not wanted
    ChannelParam<scalar_t> grad_bias) {
  using acc_t = acc_type_of<scalar_t>;
  __shared__ __align__(16) unsigned char smem[1024 * sizeof(ColumnSums<acc_t>)];
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ColumnSums<acc_t> acc;
  if (d < D) {
    for (int64_t j = threadIdx.y; j < rows; j += blockDim.y) {
      acc.weight += partials[j * D + d];
      acc.bias += partials[(rows + j) * D + d];
    }
  }
  const ColumnSums<acc_t> total = block_tree_reduce(reinterpret_cast<ColumnSums<acc_t>*>(smem), acc, threadIdx.y,
                                                    threadIdx.x, blockDim.y, blockDim.x);
  if (threadIdx.y == 0 && d < D) {
    if (grad_weight.present()) grad_weight.store(d, total.weight);
    if (grad_bias.present()) grad_bias.store(d, total.bias);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

template <typename scalar_t>
bool aligned_or_absent(const scalar_t* p) {
  return p == nullptr || is_aligned16(p);
}

template <typename scalar_t>
bool aligned_or_absent(const ChannelParam<scalar_t>& p) {
  return p.ptr == nullptr || (p.stride == 1 && is_aligned16(p.ptr));
}

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = acc_type_of<scalar_t>;
  const scalar_t* x;
  const scalar_t* residual;  // nullable
  scalar_t* sum;             // nullable unless residual
  scalar_t* out;
  ChannelParam<scalar_t> weight, bias;
  acc_t* mean;  // nullable (RMSNorm)
  acc_t* rstd;
  int64_t M, D;
  acc_t eps;
  bool rms;
};

template <typename scalar_t, int VEC>
void launch_row_forward(const ForwardArgs<scalar_t>& a, cudaStream_t stream) {
  const int l = log2_threads_per_row(a.D / VEC, forward_cache_packs<scalar_t, VEC>());
  if (l <= kLog2RowThreads) {
    const int tpr = 1 << l;
    const int threads = std::max(tpr, kRowBlock);
    const int64_t blocks = std::min(ceil_div(a.M, threads / tpr), kMaxGrid);
    row_forward_cached_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        a.x, a.residual, a.sum, a.out, a.weight, a.bias, a.mean, a.rstd, a.M, static_cast<int>(a.D), l, a.eps,
        a.rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t blocks = std::min(a.M, kMaxGrid);
    row_forward_uncached_kernel<scalar_t><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
        a.x, a.residual, a.sum, a.out, a.weight, a.bias, a.mean, a.rstd, a.M, a.D, a.eps, a.rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void row_norm_forward(const RowNormPlan& p, double eps) {
  if (p.M == 0) {
    // Nothing to normalize. D == 0 still has statistics (one per row): those
    // of nothing, mean 0 and variance 0, as the CPU GroupNorm writes them.
    if (p.mean.numel() > 0) p.mean.zero_();
    if (p.rstd.numel() > 0) p.rstd.fill_(1.0 / std::sqrt(eps));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.row_norm_forward", [&] {
    using acc_t = acc_type_of<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    ForwardArgs<scalar_t> a;
    a.x = p.x.const_data_ptr<scalar_t>();
    a.residual = p.residual.defined() ? p.residual.const_data_ptr<scalar_t>() : nullptr;
    a.sum = p.residual.defined() ? p.sum.mutable_data_ptr<scalar_t>() : nullptr;
    a.out = p.out.mutable_data_ptr<scalar_t>();
    a.weight = channel_param<scalar_t>(p.weight, false);
    a.bias = channel_param<scalar_t>(p.bias, false);
    a.mean = p.rms ? nullptr : p.mean.mutable_data_ptr<acc_t>();
    a.rstd = p.rstd.mutable_data_ptr<acc_t>();
    a.M = p.M;
    a.D = p.D;
    a.eps = static_cast<acc_t>(eps);
    a.rms = p.rms;
    const bool vectorize = p.D % kVec == 0 && is_aligned16(a.x) && is_aligned16(a.out) &&
        aligned_or_absent(a.residual) && aligned_or_absent<scalar_t>(a.sum) && aligned_or_absent(a.weight) &&
        aligned_or_absent(a.bias);
    if (vectorize) {
      launch_row_forward<scalar_t, kVec>(a, stream);
    } else {
      launch_row_forward<scalar_t, 1>(a, stream);
    }
  });
}

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type_of<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* grad_sum;  // nullable
  const acc_t* mean;         // nullable (RMSNorm)
  const acc_t* rstd;
  ChannelParam<scalar_t> weight;
  scalar_t* dx;  // nullable
  ChannelParam<scalar_t> grad_weight, grad_bias;  // absent when not wanted
  int64_t M, D;
};

template <typename scalar_t>
void launch_column_sum(const BackwardArgs<scalar_t>& a, const at::Tensor& partials, cudaStream_t stream) {
  const dim3 block(32, 32);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.D, 32)));
  column_sum_kernel<scalar_t><<<grid, block, 0, stream>>>(
      partials.const_data_ptr<acc_type_of<scalar_t>>(), partials.size(1), a.D, a.grad_weight, a.grad_bias);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_row_backward(const BackwardArgs<scalar_t>& a, const at::TensorOptions& acc_options,
                         cudaStream_t stream) {
  using acc_t = acc_type_of<scalar_t>;
  const bool want_params = a.grad_weight.ptr != nullptr || a.grad_bias.ptr != nullptr;
  const int l = log2_threads_per_row(a.D / VEC, backward_cache_packs<scalar_t, VEC>());
  if (l <= kLog2RowThreads) {
    const int tpr = 1 << l;
    const int threads = std::max(tpr, kRowBlock);
    int64_t blocks = ceil_div(a.M, threads / tpr);
    at::Tensor partials;
    if (want_params) {
      // One wave: each block's register accumulators cover as many rows as
      // possible, and the partials stay one row per resident block.
      static const std::array<int, 2> per_sm = {
          blocks_per_sm(row_backward_cached_kernel<scalar_t, VEC>, kRowBlock),
          blocks_per_sm(row_backward_cached_kernel<scalar_t, VEC>, kRowThreads)};
      blocks = std::min(blocks, wave_blocks(per_sm[threads == kRowThreads ? 1 : 0]));
      partials = at::empty({2, blocks, a.D}, acc_options);
    }
    blocks = std::min(blocks, kMaxGrid);
    row_backward_cached_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        a.dy, a.x, a.grad_sum, a.mean, a.rstd, a.weight, a.dx,
        want_params ? partials.mutable_data_ptr<acc_t>() : nullptr, a.M, static_cast<int>(a.D), l);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (want_params) launch_column_sum(a, partials, stream);
    return;
  }
  if (a.dx != nullptr) {
    const int64_t blocks = std::min(a.M, kMaxGrid);
    row_backward_uncached_kernel<scalar_t><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
        a.dy, a.x, a.grad_sum, a.mean, a.rstd, a.weight, a.dx, a.M, a.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (want_params) {
    static const int per_sm = blocks_per_sm(row_param_partials_kernel<scalar_t>, 256);
    const int64_t col_tiles = ceil_div(a.D, 32);
    TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), "torchnorm: normalized size too large (", a.D, ")");
    const int64_t splits =
        std::max<int64_t>(1, std::min({ceil_div(a.M, 8), ceil_div(wave_blocks(per_sm), col_tiles), int64_t(65535)}));
    at::Tensor partials = at::empty({2, splits, a.D}, acc_options);
    row_param_partials_kernel<scalar_t>
        <<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits)), dim3(32, 8), 0, stream>>>(
            a.dy, a.x, a.mean, a.rstd, a.M, a.D, partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_column_sum(a, partials, stream);
  }
}

// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_cuda(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  const RowNormPlan p =
      plan_row_norm("torchnorm.layer_norm", input, normalized_shape, weight, bias, residual, eps, /*rms=*/false);
  row_norm_forward(p, eps);
  return {p.out, p.sum, p.mean, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_cuda(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    std::optional<double> eps_or_none,
    const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  const double eps = rms_norm_eps(input, eps_or_none);
  const RowNormPlan p =
      plan_row_norm("torchnorm.rms_norm", input, normalized_shape, weight, std::nullopt, residual, eps, /*rms=*/true);
  row_norm_forward(p, eps);
  return {p.out, p.sum, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_output,
    const std::optional<at::Tensor>& grad_sum,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    std::array<bool, 3> output_mask) {
  c10::cuda::CUDAGuard guard(input.device());
  const RowNormBackwardPlan p =
      plan_row_norm_backward(grad_output, grad_sum, input, normalized_shape, mean, rstd, weight, output_mask);
  const auto result = [&] { return std::make_tuple(p.grad_input, p.grad_weight, p.grad_bias); };
  const bool want_input = output_mask[0], want_weight = output_mask[1], want_bias = output_mask[2];
  if (p.M == 0) {
    // No rows: the parameter gradients are empty sums (and empty when D == 0).
    if (want_weight) p.grad_weight.zero_();
    if (want_bias) p.grad_bias.zero_();
    return result();
  }
  if (!(want_input || want_weight || want_bias)) return result();
  const auto acc_options = p.x.options().dtype(accumulate_type(p.x.scalar_type()));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "torchnorm.layer_norm_backward", [&] {
    using acc_t = acc_type_of<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    BackwardArgs<scalar_t> a;
    a.dy = p.grad_out.const_data_ptr<scalar_t>();
    a.x = p.x.const_data_ptr<scalar_t>();
    a.grad_sum = (want_input && p.grad_sum.defined()) ? p.grad_sum.const_data_ptr<scalar_t>() : nullptr;
    a.mean = p.rms ? nullptr : p.mean.const_data_ptr<acc_t>();
    a.rstd = p.rstd.const_data_ptr<acc_t>();
    a.weight = channel_param<scalar_t>(p.weight, false);
    a.dx = want_input ? p.grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    a.grad_weight = want_weight ? channel_param<scalar_t>(p.grad_weight.view({-1}), true) : ChannelParam<scalar_t>{};
    a.grad_bias = want_bias ? channel_param<scalar_t>(p.grad_bias.view({-1}), true) : ChannelParam<scalar_t>{};
    a.M = p.M;
    a.D = p.D;
    const bool vectorize = p.D % kVec == 0 && is_aligned16(a.dy) && is_aligned16(a.x) &&
        aligned_or_absent(a.grad_sum) && aligned_or_absent<scalar_t>(a.dx) && aligned_or_absent(a.weight);
    if (vectorize) {
      launch_row_backward<scalar_t, kVec>(a, acc_options, stream);
    } else {
      launch_row_backward<scalar_t, 1>(a, acc_options, stream);
    }
  });
  return result();
}

}  // namespace
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  m.impl("layer_norm", TORCH_FN(torchnorm::layer_norm_cuda));
  m.impl("rms_norm", TORCH_FN(torchnorm::rms_norm_cuda));
  m.impl("layer_norm_backward", TORCH_FN(torchnorm::layer_norm_backward_cuda));
}
