// CUDA kernels of torchnorm's sequence norms: masked_batch_norm and
// masked_batch_norm_backward (BatchNorm over the valid rows of an (R, C)
// input), and _bn_lstm_step and _bn_lstm_step_backward (one fused BN-LSTM
// step and its gradients, called once per time step by bn_lstm_layer and its
// backward). Schemas and semantics are in csrc/registration.cpp.
//
// What is shared with the CPU kernels: the argument checks, the running row
// of (L, C) statistics, the (mean, rstd) that normalize and the running-
// statistics update (common/sequence_norm_plan.h, ATen ops on the current
// stream, no host synchronization); the per-element math (common/
// lstm_math.h, common/batch_norm_math.h). The kernels here only compute the
// column moments of the valid rows and the element-wise passes.
//
// Every kernel works on row-major (rows, columns) matrices the same way: a
// block of (bx, by) threads, bx a power of two <= 32, owns bx consecutive
// columns (threadIdx.x: a warp reads consecutive columns of a row, or whole
// consecutive rows when there are few columns: coalesced either way), and
// its threadIdx.y rows step over the rows with a grid-stride loop
// (row_loop_kernel and the two vectorized element-wise kernels). A thread
// keeps the same columns for all its rows, so their per-column coefficients
// are loaded once into registers. Reductions over the rows are written as
// one partial per (block row, column) and combined by a finalize kernel in
// a fixed order: no atomics, the same bits on every run on a given GPU.
// Variances are Welford per thread and Chan merges (common/welford.h),
// never E[x^2] - E[x]^2, so |mean| >> std keeps its precision.
//
// Launches (not counting the ATen ops of normalizing_stats /
// update_running_stats, and the contiguous copies of inputs that are not):
//   masked_batch_norm, training:  moments (1) + finalize (1) + normalize (1)
//   masked_batch_norm, eval:      normalize (1)
//   masked_batch_norm_backward:   sums (1, when anything needs them) +
//                                 finalize (1) + grad_input (1, when wanted)
//   _bn_lstm_step, training: 5
//     1. moments of input_gates' and hidden_gates' valid rows, one launch
//        over both matrices' 8H columns;       2. their finalize;
//     3. gates and cell update (cy; hy = 0 and cy = cx on invalid rows),
//        with the Welford partials of the stored cy in the same pass;
//     4. finalize of the cell moments;
//     5. h on valid rows, and stats.
//   _bn_lstm_step, eval: 1 (3 and 5 fused: the cell statistics are known).
//   _bn_lstm_step_backward: 5
//     1. BN_c sums over valid rows of dz and dz * (cy - mean_c);
//     2. their finalize: grad_params' BN_c part (+=), BN_c's input-gradient
//        coefficients, the valid-row count;
//     3. per (row, unit): dc = grad_cy + BN_c's input gradient, the cell
//        gradients, grad_cx, the four pre-activation gradients da (kept in an
//        acc-dtype (N, 4H) scratch), and in the same pass the partials of
//        sum da, sum da * (gx - mean_ih), sum da * (gh - mean_hh);
//     4. their finalize: grad_params' gate part (+=), the coefficients of
//        both gate BNs' input gradients;
//     5. grad_input_gates and grad_hidden_gates.
// The gates are recomputed from input_gates and hidden_gates wherever they
// are needed (forward pass 5, backward passes 1 and 3), not saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common/batch_norm_math.h"
#include "common/input_checks.h"
#include "common/lstm_math.h"
#include "common/sequence_norm_plan.h"
#include "common/welford.h"
#include "kernel_helpers.cuh"

namespace torchnorm {
namespace {

constexpr int kThreads = 256;  // threads per block, for every kernel here
constexpr int kWarp = 32;

// The partial-workspace accessors of kernel_helpers.cuh (MeanM2), next to this
// file's own overloads (SumN) below, so that unqualified calls see both.
using torchnorm::load_partial;
using torchnorm::merge;
using torchnorm::store_partial;

// ---------------------------------------------------------------------------
// Accumulators
// ---------------------------------------------------------------------------

// N independent column sums (gradient sums and, where needed, the valid-row
// count: a float count is exact up to 2^24 rows, double up to 2^53).
template <typename acc_t, int N>
struct SumN {
  acc_t v[N] = {};
};

// Fields of the SumN<acc_t, 3> of a BatchNorm backward: sum(dz),
// sum(dz * (x - mean)) and the number of rows summed.
enum GradSum : int { kSumDz = 0, kSumDzXc = 1, kSumCount = 2 };

template <typename acc_t, int N>
__device__ __forceinline__ SumN<acc_t, N> merge(const SumN<acc_t, N>& a, const SumN<acc_t, N>& b) {
  SumN<acc_t, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}

// As the MeanM2 overloads: a (N, ...) workspace, one field after the other.
template <typename acc_t, int N>
__device__ __forceinline__ void store_partial(acc_t* ws, int64_t field_stride, int64_t i, const SumN<acc_t, N>& a) {
#pragma unroll
  for (int f = 0; f < N; ++f) ws[f * field_stride + i] = a.v[f];
}

template <typename acc_t, int N>
__device__ __forceinline__ void load_partial(const acc_t* ws, int64_t field_stride, int64_t i, SumN<acc_t, N>& a) {
#pragma unroll
  for (int f = 0; f < N; ++f) a.v[f] = ws[f * field_stride + i];
}

// The accumulator of a pass that reduces nothing.
struct NoSums {};

// ---------------------------------------------------------------------------
// Per-element helpers over common/'s formulas
// ---------------------------------------------------------------------------

// common/batch_norm_math.h's input_grad with one column's coefficients.
template <typename acc_t>
__device__ __forceinline__ acc_t bn_input_grad(acc_t dz, acc_t xc, const BackwardCoefficients<acc_t>& bc) {
  return input_grad(dz, xc, bc.dz_coef, bc.xc_coef, bc.const_coef);
}

// h = sigmoid(a_o) * tanh(z), z the BN_c output (as the CPU's pass 2).
template <typename acc_t>
__device__ __forceinline__ acc_t lstm_hidden(acc_t gate_o, acc_t z) {
  return gate_o * ElementMath<acc_t>::tanh(z);
}

// The count backward_coefficients divides by: the valid rows, at least 1 (as
// the CPU kernels; without a valid row the coefficients are never applied).
template <typename acc_t>
__device__ __forceinline__ acc_t coefficient_count(acc_t valid_rows) {
  return valid_rows > acc_t(1) ? valid_rows : acc_t(1);
}

// ---------------------------------------------------------------------------
// The row loop
// ---------------------------------------------------------------------------

// row_loop_kernel<Op> runs an Op over a (rows, cols) problem. Thread (tx, ty)
// of block (bx, by) owns column c = blockIdx.x * bx + tx (the Op's notion of
// column: a matrix column, or a hidden unit j standing for the gate columns
// k * H + j) and the rows blockIdx.y * by + ty + i * gridDim.y * by. Per
// thread: column(c) once (per-column coefficients into registers), then for
// each of its rows load(col, r) and valid_row(acc, col, r, loaded) on valid
// rows, invalid_row(col, r) on the others. Loads of kUnroll rows are issued
// before their use, so a reduction keeps that many in flight. A reducing Op
// (kReduces) then has the block's threads of each column combined
// (block_tree_reduce, fixed order) and the block's partial stored with
// op.store at partial row blockIdx.y. Finally every thread calls
// op.epilogue(flat thread id, threads in the grid), for writes that do not
// follow the rows (the step's stats).
struct RowOpDefaults {
  static constexpr int kUnroll = 1;
  static constexpr int kPartialColumns = 1;  // partial-workspace columns per Op column

  template <typename Column>
  __device__ __forceinline__ void invalid_row(const Column&, int64_t) const {}

  __device__ __forceinline__ void epilogue(int64_t, int64_t) const {}

  // The block's partial of column c, at (field, split, c) of a (fields,
  // splits, cols) workspace.
  template <typename acc_t, typename Acc>
  __device__ __forceinline__ void store(acc_t* ws, int64_t splits, int64_t split, int64_t cols, int64_t c,
                                        const Acc& total) const {
    store_partial(ws, splits * cols, split * cols + c, total);
  }
};

__device__ __forceinline__ bool row_valid(const bool* __restrict__ valid, int64_t r) {
  return valid == nullptr || valid[r];
}

template <typename Op>
__global__ void __launch_bounds__(kThreads) row_loop_kernel(
    Op op, const bool* __restrict__ valid, int64_t rows, int64_t cols, typename Op::acc_t* __restrict__ partials) {
  using Acc = typename Op::Acc;
  constexpr int U = Op::kUnroll;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  Acc acc{};
  if (c < cols) {
    const typename Op::Column col = op.column(c);
    const int64_t r_step = int64_t(gridDim.y) * blockDim.y;
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += U * r_step) {
      typename Op::Loaded v[U] = {};
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t ru = r + u * r_step;
        ok[u] = ru < rows && row_valid(valid, ru);
        if (ok[u]) v[u] = op.load(col, ru);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t ru = r + u * r_step;
        if (ok[u]) {
          op.valid_row(acc, col, ru, v[u]);
        } else if (ru < rows) {
          op.invalid_row(col, ru);
        }
      }
    }
  }
  if constexpr (Op::kReduces) {
    // partials is the same for the whole grid, so either every thread of the
    // block reaches the tree's barriers or none does.
    if (partials != nullptr) {
      __shared__ __align__(16) unsigned char smem[kThreads * sizeof(Acc)];
      const Acc total =
          block_tree_reduce(reinterpret_cast<Acc*>(smem), acc, threadIdx.y, threadIdx.x, blockDim.y, blockDim.x);
      if (threadIdx.y == 0 && c < cols) op.store(partials, int64_t(gridDim.y), int64_t(blockIdx.y), cols, c, total);
    }
  }
  const int64_t block = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  op.epilogue(block * kThreads + threadIdx.y * blockDim.x + threadIdx.x, int64_t(gridDim.x) * gridDim.y * kThreads);
}

struct RowGrid {
  dim3 grid, block;
};

// bx = the smallest power of two >= units (at most a warp), by = kThreads /
// bx; row splits so that the grid is about one wave of `wave` blocks (at
// least 1, so that an epilogue runs even without rows).
RowGrid row_grid(int64_t units, int64_t rows, int64_t wave) {
  TORCH_INTERNAL_ASSERT(units > 0);
  int bx = 1;
  while (bx < kWarp && bx < units) bx *= 2;
  const int by = kThreads / bx;
  const int64_t tiles = ceil_div(units, bx);
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(), "torchnorm: too many columns (", units, ")");
  const int64_t splits = std::max<int64_t>(1, std::min({ceil_div(rows, by), ceil_div(wave, tiles), int64_t(65535)}));
  return {dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits)), dim3(bx, by)};
}

// The grid of `kernel` (whose occupancy is cached per kernel) over units x rows.
template <auto kernel>
RowGrid row_grid_for(int64_t units, int64_t rows) {
  static const int per_sm = blocks_per_sm(kernel, kThreads);
  return row_grid(units, rows, wave_blocks(per_sm));
}

// Runs `op` over rows x cols; returns the (Op::kFields, splits, cols *
// Op::kPartialColumns) partials when `reduce` (a reducing Op), else an
// undefined tensor.
template <typename Op>
at::Tensor run_rows(const Op& op, const bool* valid, int64_t rows, int64_t cols, bool reduce,
                    const at::TensorOptions& acc_options, cudaStream_t stream) {
  using acc_t = typename Op::acc_t;
  const RowGrid g = row_grid_for<row_loop_kernel<Op>>(cols, rows);
  at::Tensor partials;
  acc_t* partials_ptr = nullptr;
  if constexpr (Op::kReduces) {
    if (reduce) {
      partials = at::empty({Op::kFields, int64_t(g.grid.y), cols * Op::kPartialColumns}, acc_options);
      partials_ptr = partials.mutable_data_ptr<acc_t>();
    }
  } else {
    TORCH_INTERNAL_ASSERT(!reduce);
  }
  row_loop_kernel<Op><<<g.grid, g.block, 0, stream>>>(op, valid, rows, cols, partials_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

// ---------------------------------------------------------------------------
// Finalize kernels: one result per column from its partials
// ---------------------------------------------------------------------------

// block = finalize_block(splits): threadIdx.x picks the column, threadIdx.y
// strides over the splits; the total of column c, in order, lands in the
// threads with threadIdx.y == 0. (As batch_norm.cu's combine_partials.)
template <typename Acc, typename acc_t>
__device__ Acc combine_column_partials(const acc_t* __restrict__ partials, int64_t splits, int64_t cols, int64_t c) {
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(Acc)];
  Acc acc{};
  if (c < cols) {
    for (int64_t k = threadIdx.y; k < splits; k += blockDim.y) {
      Acc p;
      load_partial(partials, splits * cols, k * cols + c, p);
      acc = merge(acc, p);
    }
  }
  return block_tree_reduce(reinterpret_cast<Acc*>(smem), acc, threadIdx.y, threadIdx.x, blockDim.y, blockDim.x);
}

// Column moments: mean and biased variance (0 and 0 without a valid row), and
// the valid-row count (the same in every column; column 0's is written).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) moments_finalize_kernel(
    const acc_t* __restrict__ partials, int64_t splits, int64_t cols, acc_t* __restrict__ mean,
    acc_t* __restrict__ var, acc_t* __restrict__ count) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const MeanM2<acc_t> total = combine_column_partials<MeanM2<acc_t>>(partials, splits, cols, c);
  if (threadIdx.y != 0 || c >= cols) return;
  const bool any = total.count > acc_t(0);
  mean[c] = any ? total.mean : acc_t(0);
  var[c] = any ? total.m2 / total.count : acc_t(0);
  if (c == 0) *count = total.count;
}

// masked_batch_norm_backward: grad_weight and grad_bias (when wanted) and
// grad_input's coefficients, coef (3, C): dz_coef, xc_coef, const_coef.
// Without partials (splits == 0: nothing needed the sums) the sums are 0,
// which only the unused training terms would read.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) masked_grad_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials, int64_t splits, int64_t C, bool training,
    const acc_type_of<scalar_t>* __restrict__ rstd, ChannelParam<scalar_t> weight,
    ChannelParam<scalar_t> grad_weight, ChannelParam<scalar_t> grad_bias, acc_type_of<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const SumN<acc_t, 3> sums = combine_column_partials<SumN<acc_t, 3>>(partials, splits, C, c);
  if (threadIdx.y != 0 || c >= C) return;
  const acc_t r = rstd[c];
  if (grad_weight.present()) grad_weight.store(c, sums.v[kSumDzXc] * r);
  if (grad_bias.present()) grad_bias.store(c, sums.v[kSumDz]);
  const auto bc = backward_coefficients(training, r, weight.load(c, acc_t(1)), sums.v[kSumDz], sums.v[kSumDzXc],
                                        coefficient_count(sums.v[kSumCount]));
  coef[c] = bc.dz_coef;
  coef[C + c] = bc.xc_coef;
  coef[2 * C + c] = bc.const_coef;
}

// ---------------------------------------------------------------------------
// masked_batch_norm's passes
// ---------------------------------------------------------------------------

// Welford moments of the valid rows of a (R, C) `a` and, when given, of a
// second matrix `b` of the same shape as columns [C, 2C) (the two gate BNs of
// a BN-LSTM step in one launch). kUnroll rows of loads in flight per thread.
template <typename scalar_t>
struct MomentsOp : RowOpDefaults {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = MeanM2<acc_t>;
  using Loaded = acc_t;
  static constexpr bool kReduces = true;
  static constexpr int kFields = 3;
  static constexpr int kUnroll = 4;
  struct Column {
    const scalar_t* x;  // the column's element of row 0
  };

  const scalar_t* a;
  const scalar_t* b;  // nullable
  int64_t C;

  __device__ __forceinline__ Column column(int64_t c) const { return {c < C ? a + c : b + (c - C)}; }
  __device__ __forceinline__ Loaded load(const Column& col, int64_t r) const {
    return static_cast<acc_t>(col.x[r * C]);
  }
  __device__ __forceinline__ void valid_row(Acc& acc, const Column&, int64_t, Loaded x) const { welford_add(acc, x); }
};

// masked_batch_norm_backward's sums over the valid rows: sum(dy),
// sum(dy * (x - mean)) and the count.
template <typename scalar_t>
struct MaskedGradSumsOp : RowOpDefaults {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = SumN<acc_t, 3>;
  static constexpr bool kReduces = true;
  static constexpr int kFields = 3;
  static constexpr int kUnroll = 4;
  struct Column {
    int64_t c;
    acc_t mean;
  };
  struct Loaded {
    acc_t x, dy;
  };

  const scalar_t* x;
  const scalar_t* dy;
  const acc_t* mean;
  int64_t C;

  __device__ __forceinline__ Column column(int64_t c) const { return {c, mean[c]}; }
  __device__ __forceinline__ Loaded load(const Column& col, int64_t r) const {
    return {static_cast<acc_t>(x[r * C + col.c]), static_cast<acc_t>(dy[r * C + col.c])};
  }
  __device__ __forceinline__ void valid_row(Acc& acc, const Column& col, int64_t, const Loaded& v) const {
    const acc_t xc = v.x - col.mean;
    acc.v[kSumDz] += v.dy;
    acc.v[kSumDzXc] += v.dy * xc;
    acc.v[kSumCount] += acc_t(1);
  }
};

// The element-wise kernels of masked_batch_norm move VEC elements at a time
// (16-byte vectors when C % VEC == 0 and the tensors are aligned, else VEC =
// 1); thread (tx, ty) owns the VEC columns u * VEC ... of unit u =
// blockIdx.x * bx + tx, so its coefficients stay in registers.

// out = (x - mean) * (weight * rstd) + bias on valid rows, 0 on the others.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) masked_normalize_kernel(
    const scalar_t* __restrict__ x, const bool* __restrict__ valid, const acc_type_of<scalar_t>* __restrict__ mean,
    const acc_type_of<scalar_t>* __restrict__ rstd, ChannelParam<scalar_t> weight, ChannelParam<scalar_t> bias,
    int64_t R, int64_t C, scalar_t* __restrict__ out) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t units = C / VEC;
  const int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= units) return;  // no barrier below
  acc_t m[VEC], scale[VEC], shift[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int64_t c = u * VEC + k;
    const auto fc = forward_coefficients(rstd[c], weight.load(c, acc_t(1)), bias.load(c, acc_t(0)));
    m[k] = mean[c];
    scale[k] = fc.scale;
    shift[k] = fc.shift;
  }
  const int64_t r_step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < R; r += r_step) {
    Pack<scalar_t, VEC> o;
    if (row_valid(valid, r)) {
      const Pack<scalar_t, VEC> xv = load_pack<VEC>(x, r * units + u);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o.v[k] = static_cast<scalar_t>(pre_activation(static_cast<acc_t>(xv.v[k]) - m[k], scale[k], shift[k]));
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(acc_t(0));
    }
    store_pack<VEC>(out, r * units + u, o);
  }
}

// grad_input = dy * dz_coef + (x - mean) * xc_coef + const_coef on valid rows,
// 0 on the others; coef is (3, C) from masked_grad_finalize_kernel.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) masked_input_grad_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const bool* __restrict__ valid,
    const acc_type_of<scalar_t>* __restrict__ mean, const acc_type_of<scalar_t>* __restrict__ coef, int64_t R,
    int64_t C, scalar_t* __restrict__ grad_input) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t units = C / VEC;
  const int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= units) return;  // no barrier below
  acc_t m[VEC];
  BackwardCoefficients<acc_t> bc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int64_t c = u * VEC + k;
    m[k] = mean[c];
    bc[k] = {coef[c], coef[C + c], coef[2 * C + c]};
  }
  const int64_t r_step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < R; r += r_step) {
    Pack<scalar_t, VEC> g;
    if (row_valid(valid, r)) {
      const Pack<scalar_t, VEC> xv = load_pack<VEC>(x, r * units + u);
      const Pack<scalar_t, VEC> dyv = load_pack<VEC>(dy, r * units + u);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        g.v[k] = static_cast<scalar_t>(
            bn_input_grad(static_cast<acc_t>(dyv.v[k]), static_cast<acc_t>(xv.v[k]) - m[k], bc[k]));
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) g.v[k] = static_cast<scalar_t>(acc_t(0));
    }
    store_pack<VEC>(grad_input, r * units + u, g);
  }
}

// ---------------------------------------------------------------------------
// The BN-LSTM step's passes
// ---------------------------------------------------------------------------

// One gate column's constants: both BNs' centring and scale (weight * rstd;
// the gate BNs have no shift) and the bias.
template <typename acc_t>
struct GateColumn {
  acc_t mean_ih = acc_t(0), scale_ih = acc_t(0), mean_hh = acc_t(0), scale_hh = acc_t(0), bias = acc_t(0);

  __device__ __forceinline__ acc_t preact(acc_t gx, acc_t gh) const {
    return gate_pre_activation(gx - mean_ih, scale_ih, gh - mean_hh, scale_hh, bias);
  }
};

// One hidden unit's BN_c: z = (c - mean) * scale + shift.
template <typename acc_t>
struct CellColumn {
  acc_t mean = acc_t(0), scale = acc_t(0), shift = acc_t(0);

  __device__ __forceinline__ acc_t z(acc_t c) const { return pre_activation(c - mean, scale, shift); }
};

// The step's parameters and the statistics that normalize (acc-dtype device
// vectors: 4H for ih and hh, H for c; nullptr where not known yet).
template <typename scalar_t>
struct StepCoefficients {
  using acc_t = acc_type_of<scalar_t>;
  ChannelParam<scalar_t> bias, w_ih, w_hh, w_c, b_c;
  const acc_t* mean_ih = nullptr;
  const acc_t* rstd_ih = nullptr;
  const acc_t* mean_hh = nullptr;
  const acc_t* rstd_hh = nullptr;
  const acc_t* mean_c = nullptr;
  const acc_t* rstd_c = nullptr;
  int64_t H = 0;

  // Gate column k * H + j.
  __device__ __forceinline__ GateColumn<acc_t> gate(int64_t col) const {
    GateColumn<acc_t> g;
    g.mean_ih = mean_ih[col];
    g.scale_ih = forward_coefficients(rstd_ih[col], w_ih.load(col, acc_t(1)), acc_t(0)).scale;
    g.mean_hh = mean_hh[col];
    g.scale_hh = forward_coefficients(rstd_hh[col], w_hh.load(col, acc_t(1)), acc_t(0)).scale;
    g.bias = bias.load(col, acc_t(0));
    return g;
  }

  __device__ __forceinline__ CellColumn<acc_t> cell(int64_t j) const {
    const auto fc = forward_coefficients(rstd_c[j], w_c.load(j, acc_t(1)), b_c.load(j, acc_t(0)));
    CellColumn<acc_t> cc;
    cc.mean = mean_c[j];
    cc.scale = fc.scale;
    cc.shift = fc.shift;
    return cc;
  }
};

// Writes the step's stats (2, 9H) = [mean_ih | mean_hh | mean_c; rstd_ih |
// rstd_hh | rstd_c] from the grid's threads (an epilogue); nothing when out
// is nullptr.
template <typename acc_t>
struct StepStatsWriter {
  acc_t* out = nullptr;
  const acc_t* mean_ih = nullptr;
  const acc_t* mean_hh = nullptr;
  const acc_t* mean_c = nullptr;
  const acc_t* rstd_ih = nullptr;
  const acc_t* rstd_hh = nullptr;
  const acc_t* rstd_c = nullptr;
  int64_t H = 0;

  __device__ __forceinline__ void write(int64_t tid, int64_t nthreads) const {
    if (out == nullptr) return;
    const int64_t G = 4 * H, F = 9 * H;
    for (int64_t i = tid; i < F; i += nthreads) {
      if (i < G) {
        out[i] = mean_ih[i];
        out[F + i] = rstd_ih[i];
      } else if (i < 2 * G) {
        out[i] = mean_hh[i - G];
        out[F + i] = rstd_hh[i - G];
      } else {
        out[i] = mean_c[i - 2 * G];
        out[F + i] = rstd_c[i - 2 * G];
      }
    }
  }
};

// Forward pass over (row n, unit j): the four gates from the normalized gate
// inputs, c = lstm_cell, cy = c rounded to the input dtype; invalid rows get
// cy = cx and hy = 0. With `moments`, Welford partials of the stored cy
// (what the backward reads back, so both see the same c for half dtypes).
// With `hidden` (evaluation, where BN_c's statistics are known in advance)
// also h from the stored cy, and the stats epilogue.
template <typename scalar_t>
struct CellOp : RowOpDefaults {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = MeanM2<acc_t>;
  static constexpr bool kReduces = true;
  static constexpr int kFields = 3;
  struct Column {
    int64_t j;
    GateColumn<acc_t> gate[4];
    CellColumn<acc_t> cell;
  };
  struct Loaded {
    acc_t gx[4], gh[4], cx;
  };

  const scalar_t* gx;
  const scalar_t* gh;
  const scalar_t* cx;
  scalar_t* cy;
  scalar_t* hy;
  StepCoefficients<scalar_t> coef;
  StepStatsWriter<acc_t> stats;
  bool moments;
  bool hidden;

  __device__ __forceinline__ Column column(int64_t j) const {
    Column col{};
    col.j = j;
#pragma unroll
    for (int k = 0; k < 4; ++k) col.gate[k] = coef.gate(k * coef.H + j);
    if (hidden) col.cell = coef.cell(j);
    return col;
  }
  __device__ __forceinline__ Loaded load(const Column& col, int64_t r) const {
    const int64_t H = coef.H;
    const int64_t g = r * 4 * H + col.j;
    Loaded v;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v.gx[k] = static_cast<acc_t>(gx[g + k * H]);
      v.gh[k] = static_cast<acc_t>(gh[g + k * H]);
    }
    v.cx = static_cast<acc_t>(cx[r * H + col.j]);
    return v;
  }
  __device__ __forceinline__ void valid_row(Acc& acc, const Column& col, int64_t r, const Loaded& v) const {
    acc_t a[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) a[k] = col.gate[k].preact(v.gx[k], v.gh[k]);
    const LstmGates<acc_t> gates = lstm_gates(a[0], a[1], a[2], a[3]);
    const int64_t i = r * coef.H + col.j;
    const scalar_t c = static_cast<scalar_t>(lstm_cell(gates, v.cx));
    cy[i] = c;
    const acc_t c_stored = static_cast<acc_t>(c);
    if (moments) welford_add(acc, c_stored);
    if (hidden) hy[i] = static_cast<scalar_t>(lstm_hidden(gates.o, col.cell.z(c_stored)));
  }
  __device__ __forceinline__ void invalid_row(const Column& col, int64_t r) const {
    const int64_t i = r * coef.H + col.j;
    cy[i] = cx[i];
    hy[i] = static_cast<scalar_t>(acc_t(0));
  }
  __device__ __forceinline__ void epilogue(int64_t tid, int64_t nthreads) const { stats.write(tid, nthreads); }
};

// Training's second forward pass, once BN_c's statistics are known: h on the
// valid rows (a_o recomputed, c read back from cy), and the stats epilogue.
template <typename scalar_t>
struct HiddenOp : RowOpDefaults {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = NoSums;
  static constexpr bool kReduces = false;
  struct Column {
    int64_t j;
    GateColumn<acc_t> o;
    CellColumn<acc_t> cell;
  };
  struct Loaded {
    acc_t gx, gh, c;
  };

  const scalar_t* gx;
  const scalar_t* gh;
  const scalar_t* cy;
  scalar_t* hy;
  StepCoefficients<scalar_t> coef;
  StepStatsWriter<acc_t> stats;

  __device__ __forceinline__ Column column(int64_t j) const { return {j, coef.gate(3 * coef.H + j), coef.cell(j)}; }
  __device__ __forceinline__ Loaded load(const Column& col, int64_t r) const {
    const int64_t H = coef.H;
    return {static_cast<acc_t>(gx[r * 4 * H + 3 * H + col.j]), static_cast<acc_t>(gh[r * 4 * H + 3 * H + col.j]),
            static_cast<acc_t>(cy[r * H + col.j])};
  }
  __device__ __forceinline__ void valid_row(Acc&, const Column& col, int64_t r, const Loaded& v) const {
    const acc_t gate_o = sigmoid(col.o.preact(v.gx, v.gh));
    hy[r * coef.H + col.j] = static_cast<scalar_t>(lstm_hidden(gate_o, col.cell.z(v.c)));
  }
  __device__ __forceinline__ void epilogue(int64_t tid, int64_t nthreads) const { stats.write(tid, nthreads); }
};

// Backward pass 1, over (valid row n, unit j): dz at BN_c's output (from
// grad_hy through h = sigmoid(a_o) * tanh(z)); sums of dz, dz * (cy - mean_c)
// and the count.
template <typename scalar_t>
struct CellGradSumsOp : RowOpDefaults {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = SumN<acc_t, 3>;
  static constexpr bool kReduces = true;
  static constexpr int kFields = 3;
  struct Column {
    int64_t j;
    GateColumn<acc_t> o;
    CellColumn<acc_t> cell;
  };
  struct Loaded {
    acc_t gx, gh, c, dh;
  };

  const scalar_t* grad_hy;
  const scalar_t* gx;
  const scalar_t* gh;
  const scalar_t* cy;
  StepCoefficients<scalar_t> coef;

  __device__ __forceinline__ Column column(int64_t j) const { return {j, coef.gate(3 * coef.H + j), coef.cell(j)}; }
  __device__ __forceinline__ Loaded load(const Column& col, int64_t r) const {
    const int64_t H = coef.H;
    return {static_cast<acc_t>(gx[r * 4 * H + 3 * H + col.j]), static_cast<acc_t>(gh[r * 4 * H + 3 * H + col.j]),
            static_cast<acc_t>(cy[r * H + col.j]), static_cast<acc_t>(grad_hy[r * H + col.j])};
  }
  __device__ __forceinline__ void valid_row(Acc& acc, const Column& col, int64_t, const Loaded& v) const {
    const acc_t gate_o = sigmoid(col.o.preact(v.gx, v.gh));
    const acc_t tanh_z = ElementMath<acc_t>::tanh(col.cell.z(v.c));
    const LstmOutputGrads<acc_t> g = lstm_output_grads(v.dh, gate_o, tanh_z);
    acc.v[kSumDz] += g.dz;
    acc.v[kSumDzXc] += g.dz * (v.c - col.cell.mean);
    acc.v[kSumCount] += acc_t(1);
  }
};

// Backward pass 3, over (row n, unit j): on valid rows dc = grad_cy + BN_c's
// input gradient, the cell's gradients, grad_cx = dc_prev, the pre-activation
// gradients da of the four gates into the acc-dtype scratch (N, 4H), and the
// sums of da, da * (gx - mean_ih), da * (gh - mean_hh) per gate column; on
// invalid rows grad_cx = grad_cy. Accumulator field 3k + f is sum f of gate k;
// it is stored to the (3, splits, 4H) workspace at column k * H + j.
template <typename scalar_t>
struct GateGradsOp : RowOpDefaults {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = SumN<acc_t, 12>;
  static constexpr bool kReduces = true;
  static constexpr int kFields = 3;
  static constexpr int kPartialColumns = 4;
  struct Column {
    int64_t j;
    GateColumn<acc_t> gate[4];
    CellColumn<acc_t> cell;
    BackwardCoefficients<acc_t> bn_c;
  };
  struct Loaded {
    acc_t gx[4], gh[4], cx, c, dh, dc;
  };

  const scalar_t* grad_hy;
  const scalar_t* grad_cy;
  const scalar_t* gx;
  const scalar_t* gh;
  const scalar_t* cx;
  const scalar_t* cy;
  const acc_t* bn_c_coef;  // (3, H): BN_c's dz_coef, xc_coef, const_coef
  scalar_t* grad_cx;
  acc_t* da;  // (N, 4H)
  StepCoefficients<scalar_t> coef;

  __device__ __forceinline__ Column column(int64_t j) const {
    const int64_t H = coef.H;
    Column col{};
    col.j = j;
#pragma unroll
    for (int k = 0; k < 4; ++k) col.gate[k] = coef.gate(k * H + j);
    col.cell = coef.cell(j);
    col.bn_c = {bn_c_coef[j], bn_c_coef[H + j], bn_c_coef[2 * H + j]};
    return col;
  }
  __device__ __forceinline__ Loaded load(const Column& col, int64_t r) const {
    const int64_t H = coef.H;
    const int64_t g = r * 4 * H + col.j;
    const int64_t i = r * H + col.j;
    Loaded v;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v.gx[k] = static_cast<acc_t>(gx[g + k * H]);
      v.gh[k] = static_cast<acc_t>(gh[g + k * H]);
    }
    v.cx = static_cast<acc_t>(cx[i]);
    v.c = static_cast<acc_t>(cy[i]);
    v.dh = static_cast<acc_t>(grad_hy[i]);
    v.dc = static_cast<acc_t>(grad_cy[i]);
    return v;
  }
  __device__ __forceinline__ void valid_row(Acc& acc, const Column& col, int64_t r, const Loaded& v) const {
    const int64_t H = coef.H;
    acc_t a[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) a[k] = col.gate[k].preact(v.gx[k], v.gh[k]);
    const LstmGates<acc_t> gates = lstm_gates(a[0], a[1], a[2], a[3]);
    const acc_t tanh_z = ElementMath<acc_t>::tanh(col.cell.z(v.c));
    const LstmOutputGrads<acc_t> out = lstm_output_grads(v.dh, gates.o, tanh_z);
    const acc_t dc = v.dc + bn_input_grad(out.dz, v.c - col.cell.mean, col.bn_c);
    const LstmCellGrads<acc_t> cell = lstm_cell_grads(gates, dc, v.cx);
    grad_cx[r * H + col.j] = static_cast<scalar_t>(cell.dc_prev);
    const acc_t d[4] = {cell.da_i, cell.da_f, cell.da_g, out.da_o};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      da[r * 4 * H + k * H + col.j] = d[k];
      acc.v[3 * k + kSumDz] += d[k];
      acc.v[3 * k + 1] += d[k] * (v.gx[k] - col.gate[k].mean_ih);
      acc.v[3 * k + 2] += d[k] * (v.gh[k] - col.gate[k].mean_hh);
    }
  }
  __device__ __forceinline__ void invalid_row(const Column& col, int64_t r) const {
    const int64_t i = r * coef.H + col.j;
    grad_cx[i] = grad_cy[i];
  }
  __device__ __forceinline__ void store(acc_t* ws, int64_t splits, int64_t split, int64_t cols, int64_t j,
                                        const Acc& total) const {
    const int64_t G = 4 * cols;
#pragma unroll
    for (int f = 0; f < 3; ++f) {
#pragma unroll
      for (int k = 0; k < 4; ++k) ws[(f * splits + split) * G + k * cols + j] = total.v[3 * k + f];
    }
  }
};

// Backward pass 5, over (row n, gate column k): grad_input_gates and
// grad_hidden_gates from da with both gate BNs' coefficients (coef (6, 4H):
// ih's dz_coef, xc_coef, const_coef, then hh's); 0 on invalid rows.
template <typename scalar_t>
struct GateInputGradsOp : RowOpDefaults {
  using acc_t = acc_type_of<scalar_t>;
  using Acc = NoSums;
  static constexpr bool kReduces = false;
  struct Column {
    int64_t k;
    acc_t mean_ih, mean_hh;
    BackwardCoefficients<acc_t> ih, hh;
  };
  struct Loaded {
    acc_t da, gx, gh;
  };

  const acc_t* da;
  const scalar_t* gx;
  const scalar_t* gh;
  const acc_t* mean_ih;
  const acc_t* mean_hh;
  const acc_t* coef;
  scalar_t* grad_ig;
  scalar_t* grad_hg;
  int64_t G;

  __device__ __forceinline__ Column column(int64_t k) const {
    return {k, mean_ih[k], mean_hh[k], {coef[k], coef[G + k], coef[2 * G + k]},
            {coef[3 * G + k], coef[4 * G + k], coef[5 * G + k]}};
  }
  __device__ __forceinline__ Loaded load(const Column& col, int64_t r) const {
    const int64_t i = r * G + col.k;
    return {da[i], static_cast<acc_t>(gx[i]), static_cast<acc_t>(gh[i])};
  }
  __device__ __forceinline__ void valid_row(Acc&, const Column& col, int64_t r, const Loaded& v) const {
    const int64_t i = r * G + col.k;
    grad_ig[i] = static_cast<scalar_t>(bn_input_grad(v.da, v.gx - col.mean_ih, col.ih));
    grad_hg[i] = static_cast<scalar_t>(bn_input_grad(v.da, v.gh - col.mean_hh, col.hh));
  }
  __device__ __forceinline__ void invalid_row(const Column& col, int64_t r) const {
    const int64_t i = r * G + col.k;
    grad_ig[i] = static_cast<scalar_t>(acc_t(0));
    grad_hg[i] = static_cast<scalar_t>(acc_t(0));
  }
};

// Backward pass 2: BN_c's sums -> grad_params' [bn_c_weight | bn_c_bias]
// parts (+=), BN_c's input-gradient coefficients (3, H), and the valid-row
// count for pass 4.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cell_bn_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials, int64_t splits, int64_t H, bool training,
    const acc_type_of<scalar_t>* __restrict__ rstd_c, ChannelParam<scalar_t> w_c,
    acc_type_of<scalar_t>* __restrict__ grad_w_c, acc_type_of<scalar_t>* __restrict__ grad_b_c,
    acc_type_of<scalar_t>* __restrict__ bn_c_coef, acc_type_of<scalar_t>* __restrict__ count) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const SumN<acc_t, 3> sums = combine_column_partials<SumN<acc_t, 3>>(partials, splits, H, j);
  if (threadIdx.y != 0 || j >= H) return;
  const acc_t r = rstd_c[j];
  grad_w_c[j] += sums.v[kSumDzXc] * r;
  grad_b_c[j] += sums.v[kSumDz];
  const auto bc = backward_coefficients(training, r, w_c.load(j, acc_t(1)), sums.v[kSumDz], sums.v[kSumDzXc],
                                        coefficient_count(sums.v[kSumCount]));
  bn_c_coef[j] = bc.dz_coef;
  bn_c_coef[H + j] = bc.xc_coef;
  bn_c_coef[2 * H + j] = bc.const_coef;
  if (j == 0) *count = sums.v[kSumCount];
}

// Backward pass 4: the gate sums -> grad_params' [bias | bn_ih_weight |
// bn_hh_weight] parts (+=) and both gate BNs' input-gradient coefficients.
// Both BNs' output gradient is da (the gates add them).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gate_bn_finalize_kernel(
    const acc_type_of<scalar_t>* __restrict__ partials, int64_t splits, int64_t G, bool training,
    const acc_type_of<scalar_t>* __restrict__ count, const acc_type_of<scalar_t>* __restrict__ rstd_ih,
    const acc_type_of<scalar_t>* __restrict__ rstd_hh, ChannelParam<scalar_t> w_ih, ChannelParam<scalar_t> w_hh,
    acc_type_of<scalar_t>* __restrict__ grad_params, acc_type_of<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const SumN<acc_t, 3> sums = combine_column_partials<SumN<acc_t, 3>>(partials, splits, G, k);
  if (threadIdx.y != 0 || k >= G) return;
  const acc_t sum_da = sums.v[0], sum_da_xc_ih = sums.v[1], sum_da_xc_hh = sums.v[2];
  const acc_t r_ih = rstd_ih[k], r_hh = rstd_hh[k];
  grad_params[k] += sum_da;
  grad_params[G + k] += sum_da_xc_ih * r_ih;
  grad_params[2 * G + k] += sum_da_xc_hh * r_hh;
  const acc_t n = coefficient_count(*count);
  const auto ih = backward_coefficients(training, r_ih, w_ih.load(k, acc_t(1)), sum_da, sum_da_xc_ih, n);
  const auto hh = backward_coefficients(training, r_hh, w_hh.load(k, acc_t(1)), sum_da, sum_da_xc_hh, n);
  coef[k] = ih.dz_coef;
  coef[G + k] = ih.xc_coef;
  coef[2 * G + k] = ih.const_coef;
  coef[3 * G + k] = hh.dz_coef;
  coef[4 * G + k] = hh.xc_coef;
  coef[5 * G + k] = hh.const_coef;
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

dim3 finalize_grid(const dim3& block, int64_t cols) {
  const int64_t blocks = ceil_div(cols, block.x);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "torchnorm: too many columns (", cols, ")");
  return dim3(static_cast<unsigned>(blocks));
}

// ColumnMoments from MeanM2 partials (3, splits, cols).
template <typename acc_t>
ColumnMoments finalize_moments(const at::Tensor& partials, cudaStream_t stream) {
  const int64_t splits = partials.size(1), cols = partials.size(2);
  const auto acc_options = partials.options();
  ColumnMoments m{at::empty({cols}, acc_options), at::empty({cols}, acc_options), at::empty({}, acc_options)};
  const dim3 block = finalize_block(splits, kThreads);
  moments_finalize_kernel<acc_t><<<finalize_grid(block, cols), block, 0, stream>>>(
      partials.const_data_ptr<acc_t>(), splits, cols, m.mean.mutable_data_ptr<acc_t>(),
      m.var.mutable_data_ptr<acc_t>(), m.count.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return m;
}

// The column moments of the valid rows of the (R, C) contiguous `a`, and of
// `b` (same shape, when defined) as columns [C, 2C) of the result; C > 0.
template <typename scalar_t>
ColumnMoments valid_row_moments(const at::Tensor& a, const at::Tensor& b, const bool* valid, cudaStream_t stream) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t R = a.size(0), C = a.size(1);
  const auto acc_options = a.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  MomentsOp<scalar_t> op;
  op.a = a.const_data_ptr<scalar_t>();
  op.b = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
  op.C = C;
  const at::Tensor partials = run_rows(op, valid, R, (b.defined() ? 2 : 1) * C, /*reduce=*/true, acc_options, stream);
  return finalize_moments<acc_t>(partials, stream);
}

const bool* valid_ptr(const at::Tensor& mask) {
  return mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
}

// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_batch_norm_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& valid,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    int64_t step,
    bool training,
    double momentum,
    double eps) {
  constexpr const char* op = "torchnorm.masked_batch_norm";
  c10::cuda::CUDAGuard guard(input.device());
  check_masked_batch_norm(op, input, valid, weight, bias, running_mean, running_var, step, training);
  const at::Tensor x = input.contiguous();
  const at::Tensor mask = valid ? valid->contiguous() : at::Tensor();
  const int64_t R = x.size(0), C = x.size(1);
  const at::ScalarType acc = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean, rstd;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    std::optional<ColumnMoments> moments;
    if (training) {
      if (C > 0) {
        moments = valid_row_moments<scalar_t>(x, at::Tensor(), valid_ptr(mask), stream);
      } else {
        // No columns, no kernel: only the count, for the helpers.
        const at::Tensor count = mask.defined() ? mask.sum().to(acc) : at::full({}, double(R), acc_options);
        moments = ColumnMoments{at::empty({0}, acc_options), at::empty({0}, acc_options), count};
      }
    }
    std::tie(mean, rstd) = normalizing_stats(training, moments, running_mean, running_var, step, eps, acc);
    if (training) update_running_stats(running_mean, running_var, step, *moments, momentum);
    mean = mean.contiguous();
    rstd = rstd.contiguous();
    if (x.numel() == 0) return;

    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op_out = out.mutable_data_ptr<scalar_t>();
    const auto w = channel_param<scalar_t>(weight, false);
    const auto b = channel_param<scalar_t>(bias, false);
    if (C % kVec == 0 && is_aligned16(xp) && is_aligned16(op_out)) {
      const RowGrid g = row_grid_for<masked_normalize_kernel<scalar_t, kVec>>(C / kVec, R);
      masked_normalize_kernel<scalar_t, kVec><<<g.grid, g.block, 0, stream>>>(
          xp, valid_ptr(mask), mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), w, b, R, C, op_out);
    } else {
      const RowGrid g = row_grid_for<masked_normalize_kernel<scalar_t, 1>>(C, R);
      masked_normalize_kernel<scalar_t, 1><<<g.grid, g.block, 0, stream>>>(
          xp, valid_ptr(mask), mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), w, b, R, C, op_out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_batch_norm_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& valid,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    bool training,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "torchnorm.masked_batch_norm_backward";
  c10::cuda::CUDAGuard guard(input.device());
  check_masked_batch_norm_backward(op, grad_output, input, valid, weight, mean, rstd);
  const int64_t R = input.size(0), C = input.size(1);
  const at::ScalarType acc = accumulate_type(input.scalar_type());

  const bool want_input = output_mask[0], want_weight = output_mask[1], want_bias = output_mask[2];
  const at::ScalarType param_type = parameter_type(input, weight);
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::Tensor mask = valid ? valid->contiguous() : at::Tensor();
  at::Tensor grad_input =
      want_input ? at::empty_like(x, at::MemoryFormat::Contiguous) : empty_placeholder(input, input.scalar_type());
  at::Tensor grad_weight = want_weight ? at::empty({C}, x.options().dtype(param_type)) : empty_placeholder(input, param_type);
  at::Tensor grad_bias = want_bias ? at::empty({C}, x.options().dtype(param_type)) : empty_placeholder(input, param_type);
  if (C == 0 || !(want_input || want_weight || want_bias)) return {grad_input, grad_weight, grad_bias};

  const bool need_sums = want_weight || want_bias || (training && want_input);
  const auto acc_options = x.options().dtype(acc);
  const at::Tensor mean_acc = mean.to(acc).contiguous();
  const at::Tensor rstd_acc = rstd.to(acc).contiguous();
  at::Tensor coef = at::empty({3, C}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const acc_t* mean_p = mean_acc.const_data_ptr<acc_t>();

    // Without rows the sums are 0: no reduction (splits = 0).
    at::Tensor partials;
    if (need_sums && R > 0) {
      MaskedGradSumsOp<scalar_t> sums_op;
      sums_op.x = xp;
      sums_op.dy = dyp;
      sums_op.mean = mean_p;
      sums_op.C = C;
      partials = run_rows(sums_op, valid_ptr(mask), R, C, /*reduce=*/true, acc_options, stream);
    }
    const int64_t splits = partials.defined() ? partials.size(1) : 0;
    const dim3 block = finalize_block(splits, kThreads);
    masked_grad_finalize_kernel<scalar_t><<<finalize_grid(block, C), block, 0, stream>>>(
        partials.defined() ? partials.const_data_ptr<acc_t>() : nullptr, splits, C, training,
        rstd_acc.const_data_ptr<acc_t>(), channel_param<scalar_t>(weight, false),
        want_weight ? channel_param<scalar_t>(grad_weight, true) : ChannelParam<scalar_t>{},
        want_bias ? channel_param<scalar_t>(grad_bias, true) : ChannelParam<scalar_t>{},
        coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (!want_input || R == 0) return;
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    const acc_t* coef_p = coef.const_data_ptr<acc_t>();
    if (C % kVec == 0 && is_aligned16(xp) && is_aligned16(dyp) && is_aligned16(gi)) {
      const RowGrid g = row_grid_for<masked_input_grad_kernel<scalar_t, kVec>>(C / kVec, R);
      masked_input_grad_kernel<scalar_t, kVec><<<g.grid, g.block, 0, stream>>>(
          dyp, xp, valid_ptr(mask), mean_p, coef_p, R, C, gi);
    } else {
      const RowGrid g = row_grid_for<masked_input_grad_kernel<scalar_t, 1>>(C, R);
      masked_input_grad_kernel<scalar_t, 1><<<g.grid, g.block, 0, stream>>>(
          dyp, xp, valid_ptr(mask), mean_p, coef_p, R, C, gi);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_input, grad_weight, grad_bias};
}

void bn_lstm_step_cuda(
    const at::Tensor& input_gates,
    const at::Tensor& hidden_gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& bn_ih_weight,
    const at::Tensor& bn_hh_weight,
    const at::Tensor& bn_c_weight,
    const at::Tensor& bn_c_bias,
    const std::optional<at::Tensor>& running_mean_ih,
    const std::optional<at::Tensor>& running_var_ih,
    const std::optional<at::Tensor>& running_mean_hh,
    const std::optional<at::Tensor>& running_var_hh,
    const std::optional<at::Tensor>& running_mean_c,
    const std::optional<at::Tensor>& running_var_c,
    int64_t step,
    const std::optional<at::Tensor>& valid,
    bool training,
    double momentum,
    double eps,
    const at::Tensor& hy,
    const at::Tensor& cy,
    const at::Tensor& stats) {
  constexpr const char* op = "torchnorm._bn_lstm_step";
  c10::cuda::CUDAGuard guard(input_gates.device());
  check_bn_lstm_step_forward(op, input_gates, hidden_gates, cx, bias, bn_ih_weight, bn_hh_weight, bn_c_weight,
                             bn_c_bias, running_mean_ih, running_var_ih, running_mean_hh, running_var_hh,
                             running_mean_c, running_var_c, step, valid, training, hy, cy, stats);
  const int64_t N = cx.size(0), H = cx.size(1), G = 4 * H;
  if (H == 0) return;  // no column: nothing to compute, write or update
  const at::ScalarType acc = accumulate_type(input_gates.scalar_type());

  const at::Tensor gx = input_gates.contiguous();
  const at::Tensor gh = hidden_gates.contiguous();
  const at::Tensor c_prev = cx.contiguous();
  const at::Tensor mask = valid ? valid->contiguous() : at::Tensor();
  const auto acc_options = gx.options().dtype(acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), op, [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const bool* valid_p = valid_ptr(mask);

    // The gate BNs: moments of both in one launch, then the shared helpers,
    // ih then hh as the CPU kernel.
    std::optional<ColumnMoments> ih, hh;
    if (training) {
      const ColumnMoments both = valid_row_moments<scalar_t>(gx, gh, valid_p, stream);
      ih = ColumnMoments{both.mean.narrow(0, 0, G), both.var.narrow(0, 0, G), both.count};
      hh = ColumnMoments{both.mean.narrow(0, G, G), both.var.narrow(0, G, G), both.count};
    }
    at::Tensor mean_ih, rstd_ih, mean_hh, rstd_hh, mean_c, rstd_c;
    std::tie(mean_ih, rstd_ih) = normalizing_stats(training, ih, running_mean_ih, running_var_ih, step, eps, acc);
    if (training) update_running_stats(running_mean_ih, running_var_ih, step, *ih, momentum);
    std::tie(mean_hh, rstd_hh) = normalizing_stats(training, hh, running_mean_hh, running_var_hh, step, eps, acc);
    if (training) update_running_stats(running_mean_hh, running_var_hh, step, *hh, momentum);
    mean_ih = mean_ih.contiguous();
    rstd_ih = rstd_ih.contiguous();
    mean_hh = mean_hh.contiguous();
    rstd_hh = rstd_hh.contiguous();

    StepCoefficients<scalar_t> coef;
    coef.bias = channel_param<scalar_t>(bias, false);
    coef.w_ih = channel_param<scalar_t>(bn_ih_weight, false);
    coef.w_hh = channel_param<scalar_t>(bn_hh_weight, false);
    coef.w_c = channel_param<scalar_t>(bn_c_weight, false);
    coef.b_c = channel_param<scalar_t>(bn_c_bias, false);
    coef.mean_ih = mean_ih.const_data_ptr<acc_t>();
    coef.rstd_ih = rstd_ih.const_data_ptr<acc_t>();
    coef.mean_hh = mean_hh.const_data_ptr<acc_t>();
    coef.rstd_hh = rstd_hh.const_data_ptr<acc_t>();
    coef.H = H;

    CellOp<scalar_t> cell;
    cell.gx = gx.const_data_ptr<scalar_t>();
    cell.gh = gh.const_data_ptr<scalar_t>();
    cell.cx = c_prev.const_data_ptr<scalar_t>();
    cell.cy = cy.mutable_data_ptr<scalar_t>();
    cell.hy = hy.mutable_data_ptr<scalar_t>();
    cell.coef = coef;  // BN_c's pointers stay null until pass 2 (or the eval branch) sets them
    cell.moments = training;
    cell.hidden = false;

    // The stats epilogue of whichever pass comes last; its c pointers are set
    // once BN_c's statistics are known.
    StepStatsWriter<acc_t> stats_writer;
    stats_writer.out = stats.mutable_data_ptr<acc_t>();
    stats_writer.mean_ih = coef.mean_ih;
    stats_writer.rstd_ih = coef.rstd_ih;
    stats_writer.mean_hh = coef.mean_hh;
    stats_writer.rstd_hh = coef.rstd_hh;
    stats_writer.H = H;

    if (training) {
      // Pass 1 (cy, and the moments of the stored cy), then BN_c's statistics.
      const at::Tensor partials = run_rows(cell, valid_p, N, H, /*reduce=*/true, acc_options, stream);
      const ColumnMoments cell_moments = finalize_moments<acc_t>(partials, stream);
      std::tie(mean_c, rstd_c) =
          normalizing_stats(true, cell_moments, running_mean_c, running_var_c, step, eps, acc);
      update_running_stats(running_mean_c, running_var_c, step, cell_moments, momentum);
      mean_c = mean_c.contiguous();
      rstd_c = rstd_c.contiguous();
      coef.mean_c = stats_writer.mean_c = mean_c.const_data_ptr<acc_t>();
      coef.rstd_c = stats_writer.rstd_c = rstd_c.const_data_ptr<acc_t>();

      // Pass 2: h, and stats.
      HiddenOp<scalar_t> hidden;
      hidden.gx = cell.gx;
      hidden.gh = cell.gh;
      hidden.cy = cell.cy;
      hidden.hy = cell.hy;
      hidden.coef = coef;
      hidden.stats = stats_writer;
      run_rows(hidden, valid_p, N, H, /*reduce=*/false, acc_options, stream);
    } else {
      // Evaluation: BN_c's statistics are the running ones, so one pass
      // writes cy, hy and stats.
      std::tie(mean_c, rstd_c) =
          normalizing_stats(false, std::nullopt, running_mean_c, running_var_c, step, eps, acc);
      mean_c = mean_c.contiguous();
      rstd_c = rstd_c.contiguous();
      coef.mean_c = stats_writer.mean_c = mean_c.const_data_ptr<acc_t>();
      coef.rstd_c = stats_writer.rstd_c = rstd_c.const_data_ptr<acc_t>();
      cell.coef = coef;
      cell.hidden = true;
      cell.stats = stats_writer;
      run_rows(cell, valid_p, N, H, /*reduce=*/false, acc_options, stream);
    }
  });
}

void bn_lstm_step_backward_cuda(
    const at::Tensor& grad_hy,
    const at::Tensor& grad_cy,
    const at::Tensor& input_gates,
    const at::Tensor& hidden_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& bn_ih_weight,
    const at::Tensor& bn_hh_weight,
    const at::Tensor& bn_c_weight,
    const at::Tensor& bn_c_bias,
    const at::Tensor& stats,
    const std::optional<at::Tensor>& valid,
    bool training,
    const at::Tensor& grad_input_gates,
    const at::Tensor& grad_hidden_gates,
    const at::Tensor& grad_cx,
    const at::Tensor& grad_params) {
  constexpr const char* op = "torchnorm._bn_lstm_step_backward";
  c10::cuda::CUDAGuard guard(input_gates.device());
  check_bn_lstm_step_backward(op, grad_hy, grad_cy, input_gates, hidden_gates, cx, cy, bias, bn_ih_weight,
                              bn_hh_weight, bn_c_weight, bn_c_bias, stats, valid, grad_input_gates,
                              grad_hidden_gates, grad_cx, grad_params);
  const int64_t N = cx.size(0), H = cx.size(1), G = 4 * H;
  // No row: every gradient tensor is empty and grad_params gains 0.
  if (H == 0 || N == 0) return;
  const at::ScalarType acc = accumulate_type(input_gates.scalar_type());

  const at::Tensor dh = grad_hy.contiguous();
  const at::Tensor dc = grad_cy.contiguous();
  const at::Tensor gx = input_gates.contiguous();
  const at::Tensor gh = hidden_gates.contiguous();
  const at::Tensor c_prev = cx.contiguous();
  const at::Tensor c = cy.contiguous();
  const at::Tensor mask = valid ? valid->contiguous() : at::Tensor();
  const auto acc_options = gx.options().dtype(acc);
  // Scratch: BN_c's coefficients (3, H), the valid-row count (1), the gate
  // BNs' coefficients (6, 4H); da (N, 4H).
  at::Tensor work = at::empty({3 * H + 1 + 6 * G}, acc_options);
  at::Tensor da = at::empty({N, G}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), op, [&] {
    using acc_t = acc_type_of<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const bool* valid_p = valid_ptr(mask);
    const acc_t* stats_p = stats.const_data_ptr<acc_t>();
    acc_t* bn_c_coef = work.mutable_data_ptr<acc_t>();
    acc_t* count = bn_c_coef + 3 * H;
    acc_t* gate_coef = count + 1;
    acc_t* params = grad_params.mutable_data_ptr<acc_t>();

    StepCoefficients<scalar_t> coef;
    coef.bias = channel_param<scalar_t>(bias, false);
    coef.w_ih = channel_param<scalar_t>(bn_ih_weight, false);
    coef.w_hh = channel_param<scalar_t>(bn_hh_weight, false);
    coef.w_c = channel_param<scalar_t>(bn_c_weight, false);
    coef.b_c = channel_param<scalar_t>(bn_c_bias, false);
    coef.mean_ih = stats_p;
    coef.mean_hh = stats_p + G;
    coef.mean_c = stats_p + 2 * G;
    coef.rstd_ih = stats_p + 9 * H;
    coef.rstd_hh = stats_p + 9 * H + G;
    coef.rstd_c = stats_p + 9 * H + 2 * G;
    coef.H = H;

    // 1, 2: BN_c.
    CellGradSumsOp<scalar_t> cell_sums;
    cell_sums.grad_hy = dh.const_data_ptr<scalar_t>();
    cell_sums.gx = gx.const_data_ptr<scalar_t>();
    cell_sums.gh = gh.const_data_ptr<scalar_t>();
    cell_sums.cy = c.const_data_ptr<scalar_t>();
    cell_sums.coef = coef;
    const at::Tensor cell_partials = run_rows(cell_sums, valid_p, N, H, /*reduce=*/true, acc_options, stream);
    {
      const int64_t splits = cell_partials.size(1);
      const dim3 block = finalize_block(splits, kThreads);
      cell_bn_finalize_kernel<scalar_t><<<finalize_grid(block, H), block, 0, stream>>>(
          cell_partials.const_data_ptr<acc_t>(), splits, H, training, coef.rstd_c, coef.w_c, params + 3 * G,
          params + 3 * G + H, bn_c_coef, count);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // 3, 4: the cell and the gates.
    GateGradsOp<scalar_t> gate_grads;
    gate_grads.grad_hy = cell_sums.grad_hy;
    gate_grads.grad_cy = dc.const_data_ptr<scalar_t>();
    gate_grads.gx = cell_sums.gx;
    gate_grads.gh = cell_sums.gh;
    gate_grads.cx = c_prev.const_data_ptr<scalar_t>();
    gate_grads.cy = cell_sums.cy;
    gate_grads.bn_c_coef = bn_c_coef;
    gate_grads.grad_cx = grad_cx.mutable_data_ptr<scalar_t>();
    gate_grads.da = da.mutable_data_ptr<acc_t>();
    gate_grads.coef = coef;
    const at::Tensor gate_partials = run_rows(gate_grads, valid_p, N, H, /*reduce=*/true, acc_options, stream);
    {
      const int64_t splits = gate_partials.size(1);
      const dim3 block = finalize_block(splits, kThreads);
      gate_bn_finalize_kernel<scalar_t><<<finalize_grid(block, G), block, 0, stream>>>(
          gate_partials.const_data_ptr<acc_t>(), splits, G, training, count, coef.rstd_ih, coef.rstd_hh, coef.w_ih,
          coef.w_hh, params, gate_coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // 5: the gate inputs.
    GateInputGradsOp<scalar_t> inputs;
    inputs.da = da.const_data_ptr<acc_t>();
    inputs.gx = cell_sums.gx;
    inputs.gh = cell_sums.gh;
    inputs.mean_ih = coef.mean_ih;
    inputs.mean_hh = coef.mean_hh;
    inputs.coef = gate_coef;
    inputs.grad_ig = grad_input_gates.mutable_data_ptr<scalar_t>();
    inputs.grad_hg = grad_hidden_gates.mutable_data_ptr<scalar_t>();
    inputs.G = G;
    run_rows(inputs, valid_p, N, G, /*reduce=*/false, acc_options, stream);
  });
}

}  // namespace
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CUDA, m) {
  m.impl("masked_batch_norm", TORCH_FN(torchnorm::masked_batch_norm_cuda));
  m.impl("masked_batch_norm_backward", TORCH_FN(torchnorm::masked_batch_norm_backward_cuda));
  m.impl("_bn_lstm_step", TORCH_FN(torchnorm::bn_lstm_step_cuda));
  m.impl("_bn_lstm_step_backward", TORCH_FN(torchnorm::bn_lstm_step_backward_cuda));
}
