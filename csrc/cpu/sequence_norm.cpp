// CPU kernels of the sequence norms: masked_batch_norm (recurrent BatchNorm's
// per-step statistics and BN-RNN's sequence-wise statistics over valid rows)
// and the fused BN-LSTM step, forward and backward. Data is 2-d and
// row-major: one row per sample (per (step, sample) for the sequence-wise
// BN), the features along the row. Column statistics are sums over valid
// rows taken in fixed row chunks, so results do not depend on scheduling;
// the row passes run the per-element math of csrc/common/lstm_math.h on
// whole at::vec vectors. The host-side pieces (checks, which statistics
// normalize, the running update) are csrc/common/sequence_norm_plan.*.
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

// In float32, tanh from one exp: sign(x) (1 - e) / (1 + e) with e =
// exp(-2|x|). The step kernels evaluate two tanh per hidden unit each way,
// and at::vec's tanh (Sleef, 1 ulp) costs three exps on AVX2: with it the
// tanh alone were a quarter of a step. This form's absolute error stays
// below 1e-7 (1.5 ulp of 1; measured over [-12, 12] against float64), e <= 1
// so nothing overflows, and it saturates to +-1 exactly.
template <>
struct ElementMath<at::vec::Vectorized<float>> {
  using Vec = at::vec::Vectorized<float>;
  static Vec exp(const Vec& x) { return x.exp(); }
  static Vec tanh(const Vec& x) {
    const Vec one(1.0f), e = (x.abs() * Vec(-2.0f)).exp();
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

// Per-column coefficients of a step, acc_t: the gate pre-activation is
// (gx - mean_ih) * scale_ih + (gh - mean_hh) * scale_hh + bias over the 4H
// gate columns; z = (c - mean_c) * scale_c + shift_c over the H cell columns.
template <typename acc_t>
struct StepCoefficients {
  Tensor mean_ih, scale_ih, mean_hh, scale_hh, bias, mean_c, scale_c, shift_c;
};

template <typename acc_t>
struct StepPointers {
  const acc_t *mean_ih, *scale_ih, *mean_hh, *scale_hh, *bias, *mean_c, *scale_c, *shift_c;
  explicit StepPointers(const StepCoefficients<acc_t>& c)
      : mean_ih(c.mean_ih.template const_data_ptr<acc_t>()),
        scale_ih(c.scale_ih.template const_data_ptr<acc_t>()),
        mean_hh(c.mean_hh.template const_data_ptr<acc_t>()),
        scale_hh(c.scale_hh.template const_data_ptr<acc_t>()),
        bias(c.bias.template const_data_ptr<acc_t>()),
        mean_c(c.mean_c.defined() ? c.mean_c.template const_data_ptr<acc_t>() : nullptr),
        scale_c(c.scale_c.defined() ? c.scale_c.template const_data_ptr<acc_t>() : nullptr),
        shift_c(c.shift_c.template const_data_ptr<acc_t>()) {}
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

// One row of a (rows, width) tensor as acc_t: in place for float/double, else
// converted into buf.
template <typename scalar_t, typename acc_t>
const acc_t* row_as_acc(const Tensor& t, int64_t r, std::vector<acc_t>& buf) {
  const int64_t width = t.size(1);
  if (buf.size() < size_t(width)) buf.resize(width);
  return read_as_acc<scalar_t, acc_t>(t.const_data_ptr<scalar_t>() + r * width, width, buf.data());
}

template <typename scalar_t, typename acc_t>
void write_row(const acc_t* src, const Tensor& t, int64_t r) {
  const int64_t width = t.size(1);
  scalar_t* dst = t.mutable_data_ptr<scalar_t>() + r * width;
  if constexpr (kSameType<scalar_t, acc_t>) {
    std::copy(src, src + width, dst);
  } else {
    at::vec::convert(src, dst, width);
  }
}

// Per-thread row buffers of the row passes.
template <typename acc_t>
struct RowBuffers {
  std::vector<acc_t> gx, gh, c_prev, c, out, dh, dc, grad;
};

// The row passes of a step run through parallel_for over rows, each task
// with its own RowBuffers.
template <typename acc_t, typename Body>
void for_each_row_buffered(int64_t rows, int64_t width, const Body& body) {
  at::parallel_for(0, rows, grain_for(width), [&](int64_t begin, int64_t end) {
    RowBuffers<acc_t> buf;
    for (int64_t r = begin; r < end; ++r) body(r, buf);
  });
}

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

  // The two gate BatchNorms: statistics, running update, coefficients.
  auto gate_bn = [&](const Tensor& g, const optional<Tensor>& rm, const optional<Tensor>& rv, const Tensor& w) {
    optional<ColumnMoments> batch;
    if (training) batch = column_moments<scalar_t>(g, valid);
    auto [mean, rstd] = normalizing_stats(training, batch, rm, rv, step, eps, acc_type);
    if (training) update_running_stats(rm, rv, step, *batch, momentum);
    return std::make_tuple(mean, rstd, w.to(acc_type) * rstd);
  };
  StepCoefficients<acc_t> coef;
  Tensor rstd_ih, rstd_hh, rstd_c;
  std::tie(coef.mean_ih, rstd_ih, coef.scale_ih) = gate_bn(gx, rm_ih, rv_ih, bn_ih_weight);
  std::tie(coef.mean_hh, rstd_hh, coef.scale_hh) = gate_bn(gh, rm_hh, rv_hh, bn_hh_weight);
  coef.bias = column_values<acc_t>(bias, G, 0.0, acc_options);
  coef.shift_c = column_values<acc_t>(bn_c_bias, H, 0.0, acc_options);

  // Pass 1: the cell, and sigmoid(a_o) for pass 2. Ended rows keep their
  // cell and output 0.
  std::vector<acc_t> gate_o(N * H);
  {
    const StepPointers<acc_t> p(coef);
    for_each_row_buffered<acc_t>(N, G, [&](int64_t r, RowBuffers<acc_t>& buf) {
      const acc_t* cp = row_as_acc<scalar_t, acc_t>(cx, r, buf.c_prev);
      buf.c.resize(H);
      if (!row_is_valid(ok, r)) {
        write_row<scalar_t, acc_t>(cp, cy, r);
        std::fill(buf.c.begin(), buf.c.end(), acc_t(0));
        write_row<scalar_t, acc_t>(buf.c.data(), hy, r);
        return;
      }
      const acc_t* x = row_as_acc<scalar_t, acc_t>(gx, r, buf.gx);
      const acc_t* h = row_as_acc<scalar_t, acc_t>(gh, r, buf.gh);
      lane_loop<acc_t>(H, [&](int64_t j, auto lanes) {
        const auto gates = gates_at(lanes, x, h, p, j, H);
        lanes.store(lstm_cell(gates, lanes.load(cp + j)), buf.c.data() + j);
        lanes.store(gates.o, gate_o.data() + r * H + j);
      });
      write_row<scalar_t, acc_t>(buf.c.data(), cy, r);
    });
  }

  // BN_c from the cell as stored, so the backward, which reads it back, agrees.
  std::tie(coef.mean_c, rstd_c, coef.scale_c) = gate_bn(cy, rm_c, rv_c, bn_c_weight);

  // Pass 2: h = sigmoid(a_o) * tanh(BN_c(c)).
  {
    const StepPointers<acc_t> p(coef);
    for_each_row_buffered<acc_t>(N, G, [&](int64_t r, RowBuffers<acc_t>& buf) {
      if (!row_is_valid(ok, r)) return;
      const acc_t* c = row_as_acc<scalar_t, acc_t>(cy, r, buf.c);
      buf.out.resize(H);
      lane_loop<acc_t>(H, [&](int64_t j, auto lanes) {
        using Lane = decltype(lanes.load(c));
        const Lane z = pre_activation(lanes.load(c + j) - lanes.load(p.mean_c + j), lanes.load(p.scale_c + j),
                                      lanes.load(p.shift_c + j));
        lanes.store(lanes.load(gate_o.data() + r * H + j) * ElementMath<Lane>::tanh(z), buf.out.data() + j);
      });
      write_row<scalar_t, acc_t>(buf.out.data(), hy, r);
    });
  }
  stats.select(0, 0).copy_(at::cat({coef.mean_ih, coef.mean_hh, coef.mean_c}));
  stats.select(0, 1).copy_(at::cat({rstd_ih, rstd_hh, rstd_c}));
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

  const Tensor mean = stats.select(0, 0).to(acc_type).contiguous(), rstd = stats.select(0, 1).to(acc_type).contiguous();
  StepCoefficients<acc_t> coef;
  coef.mean_ih = mean.narrow(0, 0, G);
  coef.mean_hh = mean.narrow(0, G, G);
  coef.mean_c = mean.narrow(0, 2 * G, H);
  const Tensor rstd_ih = rstd.narrow(0, 0, G), rstd_hh = rstd.narrow(0, G, G), rstd_c = rstd.narrow(0, 2 * G, H);
  const Tensor w_ih = bn_ih_weight.to(acc_type).contiguous(), w_hh = bn_hh_weight.to(acc_type).contiguous(),
               w_c = bn_c_weight.to(acc_type).contiguous();
  coef.scale_ih = w_ih * rstd_ih;
  coef.scale_hh = w_hh * rstd_hh;
  coef.scale_c = w_c * rstd_c;
  coef.bias = column_values<acc_t>(bias, G, 0.0, acc_options);
  coef.shift_c = column_values<acc_t>(bn_c_bias, H, 0.0, acc_options);
  const StepPointers<acc_t> p(coef);

  // Pass A: dz and da_o from dh per valid row (acc_t scratch), with BN_c's
  // column sums of dz and dz * (c - mean_c) taken in the same pass.
  std::vector<acc_t> dz(N * H), da(N * G);
  std::vector<acc_t> bn_c_sums(2 * H);  // [sum dz | sum dz * (c - mean_c)]
  sum_valid_rows<acc_t>(N, ok, 2 * H, bn_c_sums.data(), [&](int64_t r, acc_t* sums) {
    thread_local RowBuffers<acc_t> buf;
    const acc_t* x = row_as_acc<scalar_t, acc_t>(gx, r, buf.gx);
    const acc_t* h = row_as_acc<scalar_t, acc_t>(gh, r, buf.gh);
    const acc_t* c = row_as_acc<scalar_t, acc_t>(cy, r, buf.c);
    const acc_t* dh = row_as_acc<scalar_t, acc_t>(grad_hy, r, buf.dh);
    lane_loop<acc_t>(H, [&](int64_t j, auto lanes) {
      using Lane = decltype(lanes.load(c));
      const Lane gate_o = sigmoid(pre_activation_at(lanes, x, h, p, 3 * H + j));
      const Lane c_centred = lanes.load(c + j) - lanes.load(p.mean_c + j);
      const Lane z = pre_activation(c_centred, lanes.load(p.scale_c + j), lanes.load(p.shift_c + j));
      const auto g = lstm_output_grads(lanes.load(dh + j), gate_o, ElementMath<Lane>::tanh(z));
      lanes.store(g.dz, dz.data() + r * H + j);
      lanes.store(g.da_o, da.data() + r * G + 3 * H + j);
      lanes.store(lanes.load(sums + j) + g.dz, sums + j);
      lanes.store(lanes.load(sums + H + j) + g.dz * c_centred, sums + H + j);
    });
  });
  const acc_t *sum_dz = bn_c_sums.data(), *sum_dz_xc = bn_c_sums.data() + H;
  const ColumnBackward<acc_t> bn_c(H, training, rstd_c.const_data_ptr<acc_t>(), w_c.const_data_ptr<acc_t>(), sum_dz,
                                   sum_dz_xc, count);

  // Pass B: dc, the cell's gate gradients and grad_cx per valid row, with
  // the gate BNs' column sums of da, da * (gx - mean_ih) and da * (gh -
  // mean_hh) taken in the same pass. An ended sequence's cell gradient
  // passes through.
  for (int64_t r = 0; r < N; ++r) {
    if (!row_is_valid(ok, r)) grad_cx.select(0, r).copy_(grad_cy.select(0, r));
  }
  std::vector<acc_t> gate_sums(3 * G);  // [sum da | sum da * (gx - mean_ih) | sum da * (gh - mean_hh)]
  sum_valid_rows<acc_t>(N, ok, 3 * G, gate_sums.data(), [&](int64_t r, acc_t* sums) {
    thread_local RowBuffers<acc_t> buf;
    const acc_t* dc_next = row_as_acc<scalar_t, acc_t>(grad_cy, r, buf.dc);
    const acc_t* x = row_as_acc<scalar_t, acc_t>(gx, r, buf.gx);
    const acc_t* h = row_as_acc<scalar_t, acc_t>(gh, r, buf.gh);
    const acc_t* c = row_as_acc<scalar_t, acc_t>(cy, r, buf.c);
    const acc_t* cp = row_as_acc<scalar_t, acc_t>(cx, r, buf.c_prev);
    buf.out.resize(H);
    acc_t* da_row = da.data() + r * G;
    lane_loop<acc_t>(H, [&](int64_t j, auto lanes) {
      const auto gates = cell_gates_at(lanes, x, h, p, j, H);
      const auto dc = lanes.load(dc_next + j) +
                      input_grad(lanes.load(dz.data() + r * H + j), lanes.load(c + j) - lanes.load(p.mean_c + j),
                                 lanes.load(bn_c.dz_coef.data() + j), lanes.load(bn_c.xc_coef.data() + j),
                                 lanes.load(bn_c.const_coef.data() + j));
      const auto g = lstm_cell_grads(gates, dc, lanes.load(cp + j));
      lanes.store(g.da_i, da_row + j);
      lanes.store(g.da_f, da_row + H + j);
      lanes.store(g.da_g, da_row + 2 * H + j);
      lanes.store(g.dc_prev, buf.out.data() + j);
    });
    write_row<scalar_t, acc_t>(buf.out.data(), grad_cx, r);
    lane_loop<acc_t>(G, [&](int64_t k, auto lanes) {
      const auto d = lanes.load(da_row + k);
      lanes.store(lanes.load(sums + k) + d, sums + k);
      lanes.store(lanes.load(sums + G + k) + d * (lanes.load(x + k) - lanes.load(p.mean_ih + k)), sums + G + k);
      lanes.store(lanes.load(sums + 2 * G + k) + d * (lanes.load(h + k) - lanes.load(p.mean_hh + k)),
                  sums + 2 * G + k);
    });
  });
  const acc_t *sum_da = gate_sums.data(), *sum_da_xc = gate_sums.data() + G, *sum_da_hc = gate_sums.data() + 2 * G;
  const ColumnBackward<acc_t> bn_ih(G, training, rstd_ih.const_data_ptr<acc_t>(), w_ih.const_data_ptr<acc_t>(),
                                    sum_da, sum_da_xc, count);
  const ColumnBackward<acc_t> bn_hh(G, training, rstd_hh.const_data_ptr<acc_t>(), w_hh.const_data_ptr<acc_t>(),
                                    sum_da, sum_da_hc, count);

  // Pass C: the gradients of both gate inputs.
  for_each_row_buffered<acc_t>(N, G, [&](int64_t r, RowBuffers<acc_t>& buf) {
    buf.grad.resize(G);
    if (!row_is_valid(ok, r)) {
      std::fill(buf.grad.begin(), buf.grad.end(), acc_t(0));
      write_row<scalar_t, acc_t>(buf.grad.data(), grad_gx, r);
      write_row<scalar_t, acc_t>(buf.grad.data(), grad_gh, r);
      return;
    }
    const acc_t* da_row = da.data() + r * G;
    auto gate_input_grad = [&](const Tensor& g, std::vector<acc_t>& in_buf, const acc_t* mean_p,
                          const ColumnBackward<acc_t>& bn, const Tensor& out) {
      const acc_t* in = row_as_acc<scalar_t, acc_t>(g, r, in_buf);
      lane_loop<acc_t>(G, [&](int64_t k, auto lanes) {
        lanes.store(input_grad(lanes.load(da_row + k), lanes.load(in + k) - lanes.load(mean_p + k),
                               lanes.load(bn.dz_coef.data() + k), lanes.load(bn.xc_coef.data() + k),
                               lanes.load(bn.const_coef.data() + k)),
                    buf.grad.data() + k);
      });
      write_row<scalar_t, acc_t>(buf.grad.data(), out, r);
    };
    gate_input_grad(gx, buf.gx, p.mean_ih, bn_ih, grad_gx);
    gate_input_grad(gh, buf.gh, p.mean_hh, bn_hh, grad_gh);
  });

  // Parameter gradients of this step, added to grad_params.
  acc_t* gp = grad_params.mutable_data_ptr<acc_t>();
  const acc_t *ri = rstd_ih.const_data_ptr<acc_t>(), *rh = rstd_hh.const_data_ptr<acc_t>(),
              *rc = rstd_c.const_data_ptr<acc_t>();
  for (int64_t k = 0; k < G; ++k) {
    gp[k] += sum_da[k];
    gp[G + k] += sum_da_xc[k] * ri[k];
    gp[2 * G + k] += sum_da_hc[k] * rh[k];
  }
  for (int64_t j = 0; j < H; ++j) {
    gp[3 * G + j] += sum_dz_xc[j] * rc[j];
    gp[3 * G + H + j] += sum_dz[j];
  }
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
