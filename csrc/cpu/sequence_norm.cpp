// CPU kernels of the sequence norms: masked_batch_norm (recurrent BatchNorm's
// per-step statistics and BN-RNN's sequence-wise statistics over valid rows)
// and the fused BN-LSTM step, forward and backward. Data is 2-d and
// row-major: one row per sample (per (step, sample) for the sequence-wise
// BN), the features along the row. Column statistics are sums over valid
// rows taken in fixed row chunks (masked_batch_norm) or in row order within
// a block of columns (the BN-LSTM step), so results do not depend on
// scheduling; the passes run the per-element math of
// csrc/common/lstm_math.h on whole at::vec vectors. The host-side pieces
// (checks, which statistics normalize, the running update) are
// csrc/common/sequence_norm_plan.*.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/batch_norm_math.h"
#include "common/input_checks.h"
#include "common/lstm_math.h"
#include "common/sequence_norm_plan.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm {

// exp and tanh of whole vectors, for the formulas of common/lstm_math.h.
template <typename acc_t>
struct ElementMath<at::vec::Vectorized<acc_t>> {
  using Vec = at::vec::Vectorized<acc_t>;
  static Vec exp(const Vec& x) { return x.exp(); }
  static Vec tanh(const Vec& x) { return x.tanh(); }
};

// In float32, exp is at::vec's exp_u20 (the polynomial torch's own CPU
// SiLU uses) rather than Sleef's 1-ulp exp: a step evaluates five exps per
// hidden unit each way, and with Sleef's they were a fifth of the
// step kernel's time (18.4 -> 14.5 ms of a 100-step forward, profiled).
// tanh comes from one exp: sign(x) (1 - e) / (1 + e)
// with e = exp(-2|x|); at::vec's tanh (Sleef, 1 ulp) costs three exps on
// AVX2. The sigmoid and tanh so computed stay within 4e-7 absolute of
// float64's (estimated over [-12, 12] through torch's silu, which uses the
// same exp); e <= 1 so nothing overflows, and
// tanh saturates to +-1 exactly.
template <>
struct ElementMath<at::vec::Vectorized<float>> {
  using Vec = at::vec::Vectorized<float>;
  static Vec exp(const Vec& x) { return x.exp_u20(); }
  static Vec tanh(const Vec& x) {
    const Vec one(1.0f), e = exp(x.abs() * Vec(-2.0f));
    const Vec magnitude = (one - e) / (one + e);
    return Vec::blendv(magnitude, magnitude.neg(), x < Vec(0.0f));
  }
};

namespace cpu {
namespace {

using at::Tensor;
using std::optional;

// ------------------------------------------------------------ row loops --

// Loads and stores of one lane type: a whole vector, or one element for the
// tail, so a loop body written once serves both.
template <typename acc_t>
struct VectorLanes {
  using Vec = Vectorized<acc_t>;
  static Vec load(const acc_t* p) { return Vec::loadu(p); }
  static void store(const Vec& v, acc_t* p) { v.store(p); }
};
template <typename acc_t>
struct ScalarLanes {
  static acc_t load(const acc_t* p) { return *p; }
  static void store(acc_t v, acc_t* p) { *p = v; }
};

// body(j, lanes) for j = 0, V, 2V, ... on whole vectors, then one by one.
template <typename acc_t, typename Body>
void lane_loop(int64_t n, const Body& body) {
  int64_t j = 0;
  for (; j + Vectorized<acc_t>::size() <= n; j += Vectorized<acc_t>::size()) body(j, VectorLanes<acc_t>{});
  for (; j < n; ++j) body(j, ScalarLanes<acc_t>{});
}

bool row_is_valid(const bool* valid, int64_t r) { return valid == nullptr || valid[r]; }

// body(r) for every row r in parallel, rows of `width` elements.
template <typename Body>
void for_each_row(int64_t rows, int64_t width, const Body& body) {
  at::parallel_for(0, rows, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(r);
  });
}

// out[0, width) = sum over the valid rows r of add_row(r, partial): each
// chunk of rows sums into its own partial, then the chunks are added in
// order. The chunks depend on the sizes only, so the result depends neither
// on which thread ran which chunk nor on the number of threads.
constexpr int64_t kMaxRowChunks = 16;

template <typename acc_t, typename AddRow>
void sum_valid_rows(int64_t rows, const bool* valid, int64_t width, acc_t* out, const AddRow& add_row) {
  const int64_t work = rows * width;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({rows, kMaxRowChunks, work / kMinTaskElements}));
  std::vector<acc_t> partial(chunks * width, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t r = c * rows / chunks; r < (c + 1) * rows / chunks; ++r) {
        if (row_is_valid(valid, r)) add_row(r, partial.data() + c * width);
      }
    }
  });
  std::fill(out, out + width, acc_t(0));
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t j = 0; j < width; ++j) out[j] += partial[c * width + j];
  }
}

int64_t count_valid(const bool* valid, int64_t rows) {
  return valid == nullptr ? rows : std::count(valid, valid + rows, true);
}

const bool* valid_data(const optional<Tensor>& valid) {
  return valid ? valid->const_data_ptr<bool>() : nullptr;
}

// Column mean and biased variance of the valid rows of a contiguous (R, C)
// x, two passes (the second over x - mean, exact however large the mean).
template <typename scalar_t>
ColumnMoments column_moments(const Tensor& x, const optional<Tensor>& valid) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0), cols = x.size(1);
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  const bool* ok = valid_data(valid);
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Tensor mean = at::empty({cols}, acc_options), var = at::empty({cols}, acc_options);
  acc_t* m = mean.mutable_data_ptr<acc_t>();
  acc_t* v = var.mutable_data_ptr<acc_t>();
  const int64_t count = count_valid(ok, rows);
  const acc_t inv_count = count > 0 ? acc_t(1) / acc_t(count) : acc_t(0);
  sum_valid_rows<acc_t>(rows, ok, cols, m, [&](int64_t r, acc_t* p) {
    const scalar_t* row = data + r * cols;
    for (int64_t j = 0; j < cols; ++j) p[j] += acc_t(row[j]);
  });
  for (int64_t j = 0; j < cols; ++j) m[j] *= inv_count;
  sum_valid_rows<acc_t>(rows, ok, cols, v, [&](int64_t r, acc_t* p) {
    const scalar_t* row = data + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t d = acc_t(row[j]) - m[j];
      p[j] += d * d;
    }
  });
  for (int64_t j = 0; j < cols; ++j) v[j] *= inv_count;
  return {mean, var, at::scalar_tensor(double(count), acc_options), count};
}

// Per column over the valid rows, in one pass: sum(d) and sum(d * (x - mean)).
template <typename acc_t, typename scalar_t>
void gradient_sums(const scalar_t* d, const scalar_t* x, const acc_t* mean, int64_t rows, int64_t cols,
                   const bool* valid, acc_t* sum_d, acc_t* sum_d_xc) {
  std::vector<acc_t> sums(2 * cols);  // [sum d | sum d * (x - mean)]
  sum_valid_rows<acc_t>(rows, valid, 2 * cols, sums.data(), [&](int64_t r, acc_t* p) {
    const scalar_t *d_row = d + r * cols, *x_row = x + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      p[j] += acc_t(d_row[j]);
      p[cols + j] += acc_t(d_row[j]) * (acc_t(x_row[j]) - mean[j]);
    }
  });
  std::copy(sums.begin(), sums.begin() + cols, sum_d);
  std::copy(sums.begin() + cols, sums.end(), sum_d_xc);
}

// The (C,) acc_t values of an optional per-column parameter (fill when
// absent); may be the parameter itself, so never write to it.
template <typename acc_t>
Tensor column_values(const optional<Tensor>& param, int64_t cols, double fill, const at::TensorOptions& acc_options) {
  if (!param) return at::full({cols}, fill, acc_options);
  return param->to(acc_options.dtype()).contiguous();
}

// BatchNorm backward coefficients of every column (common/batch_norm_math.h).
template <typename acc_t>
struct ColumnBackward {
  std::vector<acc_t> dz_coef, xc_coef, const_coef;
  ColumnBackward(int64_t cols, bool training, const acc_t* rstd, const acc_t* weight, const acc_t* sum_d,
                 const acc_t* sum_d_xc, int64_t count)
      : dz_coef(cols), xc_coef(cols), const_coef(cols) {
    for (int64_t j = 0; j < cols; ++j) {
      const auto c = backward_coefficients<acc_t>(training, rstd[j], weight[j], sum_d[j], sum_d_xc[j],
                                                  acc_t(std::max<int64_t>(count, 1)));
      dz_coef[j] = c.dz_coef;
      xc_coef[j] = c.xc_coef;
      const_coef[j] = c.const_coef;
    }
  }
};

// ------------------------------------------------------ masked_batch_norm --

std::tuple<Tensor, Tensor, Tensor> masked_batch_norm_cpu(const Tensor& input, const optional<Tensor>& valid,
                                                         const optional<Tensor>& weight, const optional<Tensor>& bias,
                                                         const optional<Tensor>& running_mean,
                                                         const optional<Tensor>& running_var, int64_t step,
                                                         bool training, double momentum, double eps) {
  check_masked_batch_norm("torchnorm.masked_batch_norm", input, valid, weight, bias, running_mean, running_var, step,
                          training);
  const Tensor x = input.contiguous();
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const int64_t rows = x.size(0), cols = x.size(1);
  Tensor out = at::empty_like(x);
  Tensor mean, rstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_batch_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    optional<ColumnMoments> batch;
    if (training) batch = column_moments<scalar_t>(x, valid);
    std::tie(mean, rstd) = normalizing_stats(training, batch, running_mean, running_var, step, eps, acc_type);
    if (training) update_running_stats(running_mean, running_var, step, *batch, momentum);
    const Tensor scale = column_values<acc_t>(weight, cols, 1.0, acc_options) * rstd;
    const Tensor shift = column_values<acc_t>(bias, cols, 0.0, acc_options);
    const acc_t *m = mean.const_data_ptr<acc_t>(), *k = scale.const_data_ptr<acc_t>(),
                *b = shift.const_data_ptr<acc_t>();
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* yd = out.mutable_data_ptr<scalar_t>();
    const bool* ok = valid_data(valid);
    for_each_row(rows, cols, [&](int64_t r) {
      scalar_t* y_row = yd + r * cols;
      if (!row_is_valid(ok, r)) return std::fill(y_row, y_row + cols, scalar_t(0));
      const scalar_t* x_row = xd + r * cols;
      for (int64_t j = 0; j < cols; ++j) y_row[j] = scalar_t(pre_activation(acc_t(x_row[j]) - m[j], k[j], b[j]));
    });
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> masked_batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                                  const optional<Tensor>& valid,
                                                                  const optional<Tensor>& weight, const Tensor& mean,
                                                                  const Tensor& rstd, bool training,
                                                                  std::array<bool, 3> output_mask) {
  const char* op = "torchnorm.masked_batch_norm_backward";
  check_masked_batch_norm_backward(op, grad_output, input, valid, weight, mean, rstd);
  const Tensor x = input.contiguous(), dy = grad_output.contiguous();
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto param_type = parameter_type(input, weight);
  Tensor grad_input = output_mask[0] ? at::empty_like(x) : empty_placeholder(input, input.scalar_type());
  Tensor sum_dy = at::empty({cols}, acc_options), sum_dy_xc = at::empty({cols}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool* ok = valid_data(valid);
    const scalar_t *xd = x.const_data_ptr<scalar_t>(), *dyd = dy.const_data_ptr<scalar_t>();
    const Tensor mean_acc = mean.to(acc_type).contiguous(), rstd_acc = rstd.to(acc_type).contiguous();
    const acc_t *m = mean_acc.const_data_ptr<acc_t>(), *rs = rstd_acc.const_data_ptr<acc_t>();
    gradient_sums<acc_t>(dyd, xd, m, rows, cols, ok, sum_dy.mutable_data_ptr<acc_t>(),
                         sum_dy_xc.mutable_data_ptr<acc_t>());
    if (!output_mask[0]) return;
    const Tensor w = column_values<acc_t>(weight, cols, 1.0, acc_options);
    const ColumnBackward<acc_t> coef(cols, training, rs, w.const_data_ptr<acc_t>(), sum_dy.const_data_ptr<acc_t>(),
                                     sum_dy_xc.const_data_ptr<acc_t>(), count_valid(ok, rows));
    scalar_t* dxd = grad_input.mutable_data_ptr<scalar_t>();
    for_each_row(rows, cols, [&](int64_t r) {
      scalar_t* dx_row = dxd + r * cols;
      if (!row_is_valid(ok, r)) return std::fill(dx_row, dx_row + cols, scalar_t(0));
      const scalar_t *x_row = xd + r * cols, *dy_row = dyd + r * cols;
      for (int64_t j = 0; j < cols; ++j) {
        dx_row[j] = scalar_t(input_grad(acc_t(dy_row[j]), acc_t(x_row[j]) - m[j], coef.dz_coef[j], coef.xc_coef[j],
                                        coef.const_coef[j]));
      }
    });
  });
  Tensor grad_weight =
      output_mask[1] ? (sum_dy_xc * rstd.to(acc_type)).to(param_type) : empty_placeholder(input, param_type);
  Tensor grad_bias = output_mask[2] ? sum_dy.to(param_type) : empty_placeholder(input, param_type);
  return {grad_input, grad_weight, grad_bias};
}

// ------------------------------------------------------------ BN-LSTM step --
//
// Both step kernels split the work by blocks of hidden units, not by rows.
// Every statistic of a step is a column's over the batch, and hidden unit j
// owns gate columns j, H + j, 2H + j, 3H + j and cell column j: one task
// takes a block of units through the whole step (the gate BNs' statistics,
// the gates, the cell, BN_c's statistics, h; backward the mirror image)
// without any other task's results. So a step is one parallel region, not
// one per pass, and no per-chunk partial sums are combined (with a region
// per pass the step kernels spent more time in OpenMP's fork and join than
// in their math). Columns are summed over the rows in order: the results do
// not depend on the number of threads.
//
// A task item's block of units is sized so that its gate runs (N rows x 4
// runs of gx and of gh) take about kBlockBytes: the passes after the first
// re-read them from L2. At N = 64, H = 512 in float on this project's CPU a
// step over fresh memory took (forward / backward) 241 / 434 us with blocks
// of 32 units, 203 / 293 us with 128 (256 KiB) and 371 / 394 us with 256.
// Each thread gets at least one block; the block size changes no result.
constexpr int64_t kBlockBytes = int64_t(256) << 10;
constexpr int64_t kMinUnitBlock = 16;

int64_t unit_block(int64_t N, int64_t H, int64_t element_bytes) {
  const int64_t fits = kBlockBytes / std::max<int64_t>(1, N * 8 * element_bytes);
  const int64_t per_thread = (H + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t block = std::max(kMinUnitBlock, std::min(fits, per_thread));
  return (block + kMinUnitBlock - 1) / kMinUnitBlock * kMinUnitBlock;
}

// The columns of one block in a row: `count` runs of `length` columns, the
// k-th starting at begin + k * stride (the four gate runs of the block's
// units, or the one run of its cell columns).
struct BlockRuns {
  int64_t begin, length, stride, count;
  template <typename Fn>
  void for_each(const Fn& fn) const {
    for (int64_t k = 0; k < count; ++k) fn(begin + k * stride);
  }
};

// Row r of a contiguous (rows, width) tensor as acc_t, read at the block's
// runs: the tensor's own memory for float/double, else the runs converted
// into buf (of width elements, indexed like the row).
template <typename scalar_t, typename acc_t>
const acc_t* runs_as_acc(const scalar_t* data, int64_t width, int64_t r, const BlockRuns& runs, acc_t* buf) {
  const scalar_t* row = data + r * width;
  if constexpr (kSameType<scalar_t, acc_t>) {
    return row;
  } else {
    runs.for_each([&](int64_t col) { read_as_acc(row + col, runs.length, buf + col); });
    return buf;
  }
}

// Where the block's runs of row r are computed (write_target), and their
// conversion back (write_back) for float16/bfloat16.
template <typename scalar_t, typename acc_t>
acc_t* runs_target(scalar_t* data, int64_t width, int64_t r, acc_t* buf) {
  return write_target(data + r * width, buf);
}
template <typename scalar_t, typename acc_t>
void runs_write_back(const acc_t* buf, scalar_t* data, int64_t width, int64_t r, const BlockRuns& runs) {
  runs.for_each([&](int64_t col) { write_back(buf + col, data + r * width + col, runs.length); });
}

// Per-thread rows of the block kernels (empty for float/double, which are
// read and written in place), and the block's own per-row values.
template <typename scalar_t, typename acc_t>
struct BlockBuffers {
  std::vector<acc_t> gx, gh, cell, cell_prev, out, grad;
  BlockBuffers(int64_t G, int64_t H) {
    const int64_t g = kSameType<scalar_t, acc_t> ? 0 : G, h = kSameType<scalar_t, acc_t> ? 0 : H;
    gx.resize(g), gh.resize(g), grad.resize(g), cell.resize(h), cell_prev.resize(h), out.resize(h);
  }
};

// Column mean and biased variance over the valid rows of the block's runs of
// a contiguous (rows, width) tensor, two passes (the second over x - mean,
// exact however large the mean), into mean[col] and var[col].
template <typename scalar_t, typename acc_t>
void block_moments(const scalar_t* data, int64_t rows, int64_t width, const bool* ok, acc_t inv_count,
                   const BlockRuns& runs, acc_t* buf, acc_t* mean, acc_t* var) {
  runs.for_each([&](int64_t col) {
    std::fill(mean + col, mean + col + runs.length, acc_t(0));
    std::fill(var + col, var + col + runs.length, acc_t(0));
  });
  for (int64_t r = 0; r < rows; ++r) {
    if (!row_is_valid(ok, r)) continue;
    const acc_t* x = runs_as_acc(data, width, r, runs, buf);
    runs.for_each([&](int64_t col) {
      lane_loop<acc_t>(runs.length, [&](int64_t j, auto lanes) {
        lanes.store(lanes.load(mean + col + j) + lanes.load(x + col + j), mean + col + j);
      });
    });
  }
  runs.for_each([&](int64_t col) {
    for (int64_t j = 0; j < runs.length; ++j) mean[col + j] *= inv_count;
  });
  for (int64_t r = 0; r < rows; ++r) {
    if (!row_is_valid(ok, r)) continue;
    const acc_t* x = runs_as_acc(data, width, r, runs, buf);
    runs.for_each([&](int64_t col) {
      lane_loop<acc_t>(runs.length, [&](int64_t j, auto lanes) {
        const auto d = lanes.load(x + col + j) - lanes.load(mean + col + j);
        lanes.store(lanes.load(var + col + j) + d * d, var + col + j);
      });
    });
  }
  runs.for_each([&](int64_t col) {
    for (int64_t j = 0; j < runs.length; ++j) var[col + j] *= inv_count;
  });
}

// The per-column values of a step, acc_t, indexed by column: the gate
// pre-activation of gate column k is (gx - mean_ih) * scale_ih + (gh -
// mean_hh) * scale_hh + bias; BN_c's output z = (c - mean_c) * scale_c +
// shift_c per hidden unit. scale = BN weight * rstd.
template <typename acc_t>
struct StepPointers {
  const acc_t *mean_ih, *scale_ih, *mean_hh, *scale_hh, *bias, *mean_c, *scale_c, *shift_c;
};

// The gate pre-activations of columns [k, k + lanes) of one row (gx, gh as acc_t).
template <typename Lanes, typename acc_t>
auto pre_activation_at(const Lanes& lanes, const acc_t* gx, const acc_t* gh, const StepPointers<acc_t>& p,
                       int64_t k) {
  return gate_pre_activation(lanes.load(gx + k) - lanes.load(p.mean_ih + k), lanes.load(p.scale_ih + k),
                             lanes.load(gh + k) - lanes.load(p.mean_hh + k), lanes.load(p.scale_hh + k),
                             lanes.load(p.bias + k));
}

// The four gates of hidden units [j, j + lanes) of one row.
template <typename Lanes, typename acc_t>
auto gates_at(const Lanes& lanes, const acc_t* gx, const acc_t* gh, const StepPointers<acc_t>& p, int64_t j,
              int64_t H) {
  return lstm_gates(pre_activation_at(lanes, gx, gh, p, j), pre_activation_at(lanes, gx, gh, p, H + j),
                    pre_activation_at(lanes, gx, gh, p, 2 * H + j), pre_activation_at(lanes, gx, gh, p, 3 * H + j));
}

// Gates i, f and g of hidden units [j, j + lanes) of one row.
template <typename Lanes, typename acc_t>
auto cell_gates_at(const Lanes& lanes, const acc_t* gx, const acc_t* gh, const StepPointers<acc_t>& p, int64_t j,
                   int64_t H) {
  return lstm_cell_gates(pre_activation_at(lanes, gx, gh, p, j), pre_activation_at(lanes, gx, gh, p, H + j),
                         pre_activation_at(lanes, gx, gh, p, 2 * H + j));
}

// fn(runs of the gates, runs of the cells) for each block of hidden units,
// blocks in parallel.
template <typename acc_t, typename Fn>
void for_each_unit_block(int64_t N, int64_t H, const Fn& fn) {
  const int64_t block = unit_block(N, H, sizeof(acc_t));
  const int64_t blocks = (H + block - 1) / block;
  at::parallel_for(0, blocks, grain_for(N * 4 * block), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * block, length = std::min(block, H - j0);
      fn(BlockRuns{j0, length, H, 4}, BlockRuns{j0, length, H, 1});
    }
  });
}

// The (C,) acc_t values of a BN weight (may be the parameter itself).
Tensor as_acc(const Tensor& t, at::ScalarType acc_type) { return t.to(acc_type).contiguous(); }

// The running-statistics row a step updates, when the kernel can update it
// in place as it goes: both rows contiguous and of the accumulation dtype
// (a float32 or float64 model). Otherwise (null) the update runs after the
// kernel as ATen ops (update_running_stats of common/sequence_norm_plan.h):
// those are a dozen small ops a step, a sixth of a 100-step forward's step
// kernels at batch 64, hidden 512.
template <typename acc_t>
struct RunningRow {
  acc_t *mean = nullptr, *var = nullptr;
  static RunningRow of(const optional<Tensor>& running_mean, const optional<Tensor>& running_var, int64_t step) {
    if (!running_mean) return {};
    const Tensor m = running_row(*running_mean, step), v = running_row(*running_var, step);
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    if (m.scalar_type() != acc || v.scalar_type() != acc || !m.is_contiguous() || !v.is_contiguous()) return {};
    return {m.mutable_data_ptr<acc_t>(), v.mutable_data_ptr<acc_t>()};
  }
};

template <typename scalar_t>
void bn_lstm_step_forward(const Tensor& gx, const Tensor& gh, const Tensor& cx, const optional<Tensor>& bias,
                          const Tensor& bn_ih_weight, const Tensor& bn_hh_weight, const Tensor& bn_c_weight,
                          const Tensor& bn_c_bias, const optional<Tensor>& rm_ih, const optional<Tensor>& rv_ih,
                          const optional<Tensor>& rm_hh, const optional<Tensor>& rv_hh, const optional<Tensor>& rm_c,
                          const optional<Tensor>& rv_c, int64_t step, const optional<Tensor>& valid, bool training,
                          double momentum, double eps, const Tensor& hy, const Tensor& cy, const Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = gx.size(0), G = gx.size(1), H = G / 4;
  const auto acc_type = accumulate_type(gx.scalar_type());
  const auto acc_options = gx.options().dtype(acc_type);
  const bool* ok = valid_data(valid);
  const int64_t count = count_valid(ok, N);
  const acc_t inv_count = count > 0 ? acc_t(1) / acc_t(count) : acc_t(0);

  // stats holds [mean_ih | mean_hh | mean_c] then the rstd in the same
  // order: the kernels write the batch's there in training; in evaluation
  // the running rows are copied in first.
  acc_t* mean = stats.mutable_data_ptr<acc_t>();
  acc_t* rstd = mean + 9 * H;
  const std::array<optional<Tensor>, 3> running_means{rm_ih, rm_hh, rm_c}, running_vars{rv_ih, rv_hh, rv_c};
  const std::array<int64_t, 3> offsets{0, G, 2 * G}, widths{G, G, H};
  if (!training) {
    for (int i = 0; i < 3; ++i) {
      const auto [m, r] = normalizing_stats(false, std::nullopt, running_means[i], running_vars[i], step, eps, acc_type);
      stats.select(0, 0).narrow(0, offsets[i], widths[i]).copy_(m);
      stats.select(0, 1).narrow(0, offsets[i], widths[i]).copy_(r);
    }
  }
  Tensor var = at::empty({9 * H}, acc_options);  // the batch's biased variances, for the running update
  const Tensor w_ih = as_acc(bn_ih_weight, acc_type), w_hh = as_acc(bn_hh_weight, acc_type),
               w_c = as_acc(bn_c_weight, acc_type);
  const Tensor bias_acc = column_values<acc_t>(bias, G, 0.0, acc_options),
               shift_c = column_values<acc_t>(bn_c_bias, H, 0.0, acc_options);
  std::vector<acc_t> scale(9 * H);
  const StepPointers<acc_t> p{mean,          scale.data(),     mean + G,     scale.data() + G,
                              bias_acc.const_data_ptr<acc_t>(), mean + 2 * G, scale.data() + 2 * G,
                              shift_c.const_data_ptr<acc_t>()};
  const acc_t *wi = w_ih.const_data_ptr<acc_t>(), *wh = w_hh.const_data_ptr<acc_t>(), *wc = w_c.const_data_ptr<acc_t>();
  acc_t* v = var.mutable_data_ptr<acc_t>();
  const scalar_t *gx_d = gx.const_data_ptr<scalar_t>(), *gh_d = gh.const_data_ptr<scalar_t>(),
                 *cx_d = cx.const_data_ptr<scalar_t>();
  scalar_t *cy_d = cy.mutable_data_ptr<scalar_t>(), *hy_d = hy.mutable_data_ptr<scalar_t>();
  const acc_t eps_acc = acc_t(eps);

  // The rows of running statistics the kernel updates in place (see RunningRow).
  const std::array<RunningRow<acc_t>, 3> in_place{RunningRow<acc_t>::of(rm_ih, rv_ih, step),
                                                  RunningRow<acc_t>::of(rm_hh, rv_hh, step),
                                                  RunningRow<acc_t>::of(rm_c, rv_c, step)};
  const acc_t momentum_acc = acc_t(momentum);
  // rstd and scale of the block's columns at offset, from their variances in
  // training, and BN i's running update there when it is done in place.
  auto finish_columns = [&](const BlockRuns& runs, int64_t offset, const acc_t* weight, int i) {
    const RunningRow<acc_t>& running = in_place[i];
    runs.for_each([&](int64_t col) {
      for (int64_t j = col; j < col + runs.length; ++j) {
        if (training) rstd[offset + j] = acc_t(1) / std::sqrt(v[offset + j] + eps_acc);
        scale[offset + j] = weight[j] * rstd[offset + j];
        if (training && running.mean && count > 0) {
          update_running_stats(running.mean[j], running.var[j], mean[offset + j], v[offset + j] * acc_t(count),
                               acc_t(count), momentum_acc);
        }
      }
    });
  };

  for_each_unit_block<acc_t>(N, H, [&](const BlockRuns& gate_runs, const BlockRuns& cell_runs) {
    BlockBuffers<scalar_t, acc_t> buf(G, H);
    const int64_t j0 = cell_runs.begin, B = cell_runs.length;
    // The two gate BatchNorms.
    if (training) {
      block_moments(gx_d, N, G, ok, inv_count, gate_runs, buf.gx.data(), mean, v);
      block_moments(gh_d, N, G, ok, inv_count, gate_runs, buf.gh.data(), mean + G, v + G);
    }
    finish_columns(gate_runs, 0, wi, 0);
    finish_columns(gate_runs, G, wh, 1);

    // The cell, and sigmoid(a_o) for h. Ended rows keep their cell and output 0.
    std::vector<acc_t> gate_o(N * B);
    for (int64_t r = 0; r < N; ++r) {
      const acc_t* cp = runs_as_acc(cx_d, H, r, cell_runs, buf.cell_prev.data());
      acc_t* c = runs_target(cy_d, H, r, buf.cell.data());
      if (!row_is_valid(ok, r)) {
        std::copy(cp + j0, cp + j0 + B, c + j0);
        runs_write_back(buf.cell.data(), cy_d, H, r, cell_runs);
        acc_t* h = runs_target(hy_d, H, r, buf.out.data());
        std::fill(h + j0, h + j0 + B, acc_t(0));
        runs_write_back(buf.out.data(), hy_d, H, r, cell_runs);
        continue;
      }
      const acc_t* x = runs_as_acc(gx_d, G, r, gate_runs, buf.gx.data());
      const acc_t* h = runs_as_acc(gh_d, G, r, gate_runs, buf.gh.data());
      lane_loop<acc_t>(B, [&](int64_t i, auto lanes) {
        const auto gates = gates_at(lanes, x, h, p, j0 + i, H);
        lanes.store(lstm_cell(gates, lanes.load(cp + j0 + i)), c + j0 + i);
        lanes.store(gates.o, gate_o.data() + r * B + i);
      });
      runs_write_back(buf.cell.data(), cy_d, H, r, cell_runs);
    }

    // BN_c from the cell as stored, so the backward, which reads it back, agrees.
    if (training) block_moments(cy_d, N, H, ok, inv_count, cell_runs, buf.cell.data(), mean + 2 * G, v + 2 * G);
    finish_columns(cell_runs, 2 * G, wc, 2);

    // h = sigmoid(a_o) * tanh(BN_c(c)).
    for (int64_t r = 0; r < N; ++r) {
      if (!row_is_valid(ok, r)) continue;
      const acc_t* c = runs_as_acc(cy_d, H, r, cell_runs, buf.cell.data());
      acc_t* out = runs_target(hy_d, H, r, buf.out.data());
      lane_loop<acc_t>(B, [&](int64_t i, auto lanes) {
        using Lane = decltype(lanes.load(c));
        const int64_t j = j0 + i;
        const Lane z = pre_activation(lanes.load(c + j) - lanes.load(p.mean_c + j), lanes.load(p.scale_c + j),
                                      lanes.load(p.shift_c + j));
        lanes.store(lanes.load(gate_o.data() + r * B + i) * ElementMath<Lane>::tanh(z), out + j);
      });
      runs_write_back(buf.out.data(), hy_d, H, r, cell_runs);
    }
  });

  if (training) {
    const Tensor count_tensor = at::scalar_tensor(double(count), acc_options);
    for (int i = 0; i < 3; ++i) {
      if (in_place[i].mean) continue;
      update_running_stats(running_means[i], running_vars[i], step,
                           ColumnMoments{stats.select(0, 0).narrow(0, offsets[i], widths[i]),
                                         var.narrow(0, offsets[i], widths[i]), count_tensor, count},
                           momentum);
    }
  }
}

void bn_lstm_step_cpu(const Tensor& input_gates, const Tensor& hidden_gates, const Tensor& cx,
                      const optional<Tensor>& bias, const Tensor& bn_ih_weight, const Tensor& bn_hh_weight,
                      const Tensor& bn_c_weight, const Tensor& bn_c_bias, const optional<Tensor>& rm_ih,
                      const optional<Tensor>& rv_ih, const optional<Tensor>& rm_hh, const optional<Tensor>& rv_hh,
                      const optional<Tensor>& rm_c, const optional<Tensor>& rv_c, int64_t step,
                      const optional<Tensor>& valid, bool training, double momentum, double eps, const Tensor& hy,
                      const Tensor& cy, const Tensor& stats) {
  check_bn_lstm_step_forward("torchnorm._bn_lstm_step", input_gates, hidden_gates, cx, bias, bn_ih_weight,
                             bn_hh_weight, bn_c_weight, bn_c_bias, rm_ih, rv_ih, rm_hh, rv_hh, rm_c, rv_c, step, valid,
                             training, hy, cy, stats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_gates.scalar_type(), "bn_lstm_step_cpu", [&] {
    bn_lstm_step_forward<scalar_t>(input_gates.contiguous(), hidden_gates.contiguous(), cx.contiguous(), bias,
                                   bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias, rm_ih, rv_ih, rm_hh, rv_hh,
                                   rm_c, rv_c, step, valid, training, momentum, eps, hy, cy, stats);
  });
}

template <typename scalar_t>
void bn_lstm_step_backward_impl(const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& gx, const Tensor& gh,
                                const Tensor& cx, const Tensor& cy, const optional<Tensor>& bias,
                                const Tensor& bn_ih_weight, const Tensor& bn_hh_weight, const Tensor& bn_c_weight,
                                const Tensor& bn_c_bias, const Tensor& stats, const optional<Tensor>& valid,
                                bool training, const Tensor& grad_gx, const Tensor& grad_gh, const Tensor& grad_cx,
                                const Tensor& grad_params) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = gx.size(0), G = gx.size(1), H = G / 4;
  const auto acc_type = accumulate_type(gx.scalar_type());
  const auto acc_options = gx.options().dtype(acc_type);
  const bool* ok = valid_data(valid);
  const int64_t count = count_valid(ok, N);

  const acc_t* mean = stats.const_data_ptr<acc_t>();
  const acc_t* rstd = mean + 9 * H;
  const Tensor w_ih = as_acc(bn_ih_weight, acc_type), w_hh = as_acc(bn_hh_weight, acc_type),
               w_c = as_acc(bn_c_weight, acc_type);
  const acc_t *wi = w_ih.const_data_ptr<acc_t>(), *wh = w_hh.const_data_ptr<acc_t>(), *wc = w_c.const_data_ptr<acc_t>();
  const Tensor bias_acc = column_values<acc_t>(bias, G, 0.0, acc_options),
               shift_c = column_values<acc_t>(bn_c_bias, H, 0.0, acc_options);
  std::vector<acc_t> scale(9 * H);
  for (int64_t k = 0; k < G; ++k) {
    scale[k] = wi[k] * rstd[k];
    scale[G + k] = wh[k] * rstd[G + k];
  }
  for (int64_t j = 0; j < H; ++j) scale[2 * G + j] = wc[j] * rstd[2 * G + j];
  const StepPointers<acc_t> p{mean,          scale.data(),     mean + G,     scale.data() + G,
                              bias_acc.const_data_ptr<acc_t>(), mean + 2 * G, scale.data() + 2 * G,
                              shift_c.const_data_ptr<acc_t>()};
  const scalar_t *gx_d = gx.const_data_ptr<scalar_t>(), *gh_d = gh.const_data_ptr<scalar_t>(),
                 *cx_d = cx.const_data_ptr<scalar_t>(), *cy_d = cy.const_data_ptr<scalar_t>(),
                 *dh_d = grad_hy.const_data_ptr<scalar_t>(), *dc_d = grad_cy.const_data_ptr<scalar_t>();
  scalar_t *dgx_d = grad_gx.mutable_data_ptr<scalar_t>(), *dgh_d = grad_gh.mutable_data_ptr<scalar_t>(),
           *dcx_d = grad_cx.mutable_data_ptr<scalar_t>();
  acc_t* gp = grad_params.mutable_data_ptr<acc_t>();

  for_each_unit_block<acc_t>(N, H, [&](const BlockRuns& gate_runs, const BlockRuns& cell_runs) {
    BlockBuffers<scalar_t, acc_t> buf(G, H);
    std::vector<acc_t> dh_buf(buf.out.size()), dc_buf(buf.out.size());
    const int64_t j0 = cell_runs.begin, B = cell_runs.length;
    // Per row of the block: dz (B) and da (the four gate runs, 4B).
    std::vector<acc_t> dz(N * B), da(N * 4 * B);

    // dz and da_o from dh, with BN_c's column sums of dz and dz * (c - mean_c).
    std::vector<acc_t> sum_dz(B, acc_t(0)), sum_dz_xc(B, acc_t(0));
    for (int64_t r = 0; r < N; ++r) {
      if (!row_is_valid(ok, r)) continue;
      const acc_t* x = runs_as_acc(gx_d, G, r, gate_runs, buf.gx.data());
      const acc_t* h = runs_as_acc(gh_d, G, r, gate_runs, buf.gh.data());
      const acc_t* c = runs_as_acc(cy_d, H, r, cell_runs, buf.cell.data());
      const acc_t* dh = runs_as_acc(dh_d, H, r, cell_runs, dh_buf.data());
      lane_loop<acc_t>(B, [&](int64_t i, auto lanes) {
        using Lane = decltype(lanes.load(c));
        const int64_t j = j0 + i;
        const Lane gate_o = sigmoid(pre_activation_at(lanes, x, h, p, 3 * H + j));
        const Lane c_centred = lanes.load(c + j) - lanes.load(p.mean_c + j);
        const Lane z = pre_activation(c_centred, lanes.load(p.scale_c + j), lanes.load(p.shift_c + j));
        const auto g = lstm_output_grads(lanes.load(dh + j), gate_o, ElementMath<Lane>::tanh(z));
        lanes.store(g.dz, dz.data() + r * B + i);
        lanes.store(g.da_o, da.data() + (r * 4 + 3) * B + i);
        lanes.store(lanes.load(sum_dz.data() + i) + g.dz, sum_dz.data() + i);
        lanes.store(lanes.load(sum_dz_xc.data() + i) + g.dz * c_centred, sum_dz_xc.data() + i);
      });
    }
    const ColumnBackward<acc_t> bn_c(B, training, rstd + 2 * G + j0, wc + j0, sum_dz.data(), sum_dz_xc.data(), count);

    // dc, the cell's gate gradients and grad_cx, with the gate BNs' column
    // sums of da, da * (gx - mean_ih) and da * (gh - mean_hh). An ended
    // sequence's cell gradient passes through.
    std::vector<acc_t> sum_da(4 * B, acc_t(0)), sum_da_xc(4 * B, acc_t(0)), sum_da_hc(4 * B, acc_t(0));
    for (int64_t r = 0; r < N; ++r) {
      const acc_t* dc_next = runs_as_acc(dc_d, H, r, cell_runs, dc_buf.data());
      acc_t* dc_prev = runs_target(dcx_d, H, r, buf.out.data());
      if (!row_is_valid(ok, r)) {
        std::copy(dc_next + j0, dc_next + j0 + B, dc_prev + j0);
        runs_write_back(buf.out.data(), dcx_d, H, r, cell_runs);
        continue;
      }
      const acc_t* x = runs_as_acc(gx_d, G, r, gate_runs, buf.gx.data());
      const acc_t* h = runs_as_acc(gh_d, G, r, gate_runs, buf.gh.data());
      const acc_t* c = runs_as_acc(cy_d, H, r, cell_runs, buf.cell.data());
      const acc_t* cp = runs_as_acc(cx_d, H, r, cell_runs, buf.cell_prev.data());
      acc_t* da_row = da.data() + r * 4 * B;
      lane_loop<acc_t>(B, [&](int64_t i, auto lanes) {
        const int64_t j = j0 + i;
        const auto gates = cell_gates_at(lanes, x, h, p, j, H);
        const auto dc = lanes.load(dc_next + j) +
                        input_grad(lanes.load(dz.data() + r * B + i), lanes.load(c + j) - lanes.load(p.mean_c + j),
                                   lanes.load(bn_c.dz_coef.data() + i), lanes.load(bn_c.xc_coef.data() + i),
                                   lanes.load(bn_c.const_coef.data() + i));
        const auto g = lstm_cell_grads(gates, dc, lanes.load(cp + j));
        lanes.store(g.da_i, da_row + i);
        lanes.store(g.da_f, da_row + B + i);
        lanes.store(g.da_g, da_row + 2 * B + i);
        lanes.store(g.dc_prev, dc_prev + j);
      });
      runs_write_back(buf.out.data(), dcx_d, H, r, cell_runs);
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t col = q * H + j0;
        lane_loop<acc_t>(B, [&](int64_t i, auto lanes) {
          const auto d = lanes.load(da_row + q * B + i);
          const int64_t s = q * B + i;
          lanes.store(lanes.load(sum_da.data() + s) + d, sum_da.data() + s);
          lanes.store(lanes.load(sum_da_xc.data() + s) + d * (lanes.load(x + col + i) - lanes.load(p.mean_ih + col + i)),
                      sum_da_xc.data() + s);
          lanes.store(lanes.load(sum_da_hc.data() + s) + d * (lanes.load(h + col + i) - lanes.load(p.mean_hh + col + i)),
                      sum_da_hc.data() + s);
        });
      }
    }
    // The gate BNs' backward coefficients, per gate run of the block.
    std::vector<ColumnBackward<acc_t>> bn_ih, bn_hh;
    for (int64_t q = 0; q < 4; ++q) {
      const int64_t col = q * H + j0, s = q * B;
      bn_ih.emplace_back(B, training, rstd + col, wi + col, sum_da.data() + s, sum_da_xc.data() + s, count);
      bn_hh.emplace_back(B, training, rstd + G + col, wh + col, sum_da.data() + s, sum_da_hc.data() + s, count);
    }

    // The gradients of both gate inputs; 0 for ended rows.
    for (int64_t r = 0; r < N; ++r) {
      const bool row_ok = row_is_valid(ok, r);
      const acc_t* x = row_ok ? runs_as_acc(gx_d, G, r, gate_runs, buf.gx.data()) : nullptr;
      const acc_t* h = row_ok ? runs_as_acc(gh_d, G, r, gate_runs, buf.gh.data()) : nullptr;
      const acc_t* da_row = da.data() + r * 4 * B;
      for (const auto& [in, mean_p, bn, out_d] :
           {std::make_tuple(x, p.mean_ih, &bn_ih, dgx_d), std::make_tuple(h, p.mean_hh, &bn_hh, dgh_d)}) {
        acc_t* grad = runs_target(out_d, G, r, buf.grad.data());
        for (int64_t q = 0; q < 4; ++q) {
          const int64_t col = q * H + j0;
          if (!row_ok) {
            std::fill(grad + col, grad + col + B, acc_t(0));
            continue;
          }
          const ColumnBackward<acc_t>& k = (*bn)[q];
          lane_loop<acc_t>(B, [&](int64_t i, auto lanes) {
            lanes.store(input_grad(lanes.load(da_row + q * B + i), lanes.load(in + col + i) - lanes.load(mean_p + col + i),
                                   lanes.load(k.dz_coef.data() + i), lanes.load(k.xc_coef.data() + i),
                                   lanes.load(k.const_coef.data() + i)),
                        grad + col + i);
          });
        }
        runs_write_back(buf.grad.data(), out_d, G, r, gate_runs);
      }
    }

    // Parameter gradients of the block's columns, added to grad_params.
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t i = 0; i < B; ++i) {
        const int64_t s = q * B + i, col = q * H + j0 + i;
        gp[col] += sum_da[s];
        gp[G + col] += sum_da_xc[s] * rstd[col];
        gp[2 * G + col] += sum_da_hc[s] * rstd[G + col];
      }
    }
    for (int64_t i = 0; i < B; ++i) {
      gp[3 * G + j0 + i] += sum_dz_xc[i] * rstd[2 * G + j0 + i];
      gp[3 * G + H + j0 + i] += sum_dz[i];
    }
  });
}

void bn_lstm_step_backward_cpu(const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input_gates,
                               const Tensor& hidden_gates, const Tensor& cx, const Tensor& cy,
                               const optional<Tensor>& bias, const Tensor& bn_ih_weight, const Tensor& bn_hh_weight,
                               const Tensor& bn_c_weight, const Tensor& bn_c_bias, const Tensor& stats,
                               const optional<Tensor>& valid, bool training, const Tensor& grad_input_gates,
                               const Tensor& grad_hidden_gates, const Tensor& grad_cx, const Tensor& grad_params) {
  check_bn_lstm_step_backward("torchnorm._bn_lstm_step_backward", grad_hy, grad_cy, input_gates, hidden_gates, cx, cy,
                              bias, bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias, stats, valid,
                              grad_input_gates, grad_hidden_gates, grad_cx, grad_params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_gates.scalar_type(), "bn_lstm_step_backward_cpu",
                                  [&] {
                                    bn_lstm_step_backward_impl<scalar_t>(
                                        grad_hy.contiguous(), grad_cy.contiguous(), input_gates.contiguous(),
                                        hidden_gates.contiguous(), cx.contiguous(), cy.contiguous(), bias,
                                        bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias, stats, valid, training,
                                        grad_input_gates, grad_hidden_gates, grad_cx, grad_params);
                                  });
}

}  // namespace
}  // namespace cpu
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  m.impl("masked_batch_norm", &torchnorm::cpu::masked_batch_norm_cpu);
  m.impl("masked_batch_norm_backward", &torchnorm::cpu::masked_batch_norm_backward_cpu);
  m.impl("_bn_lstm_step", &torchnorm::cpu::bn_lstm_step_cpu);
  m.impl("_bn_lstm_step_backward", &torchnorm::cpu::bn_lstm_step_backward_cpu);
}
