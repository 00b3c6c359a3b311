// LayerNorm and RMSNorm CPU kernels: M rows of D contiguous elements.
//
// Memory traffic: a task owns a block of rows and finishes each row before
// the next, so the statistics pass (two passes per L1-sized segment, merged
// with Chan's formula; RMSNorm needs only the sum of squares) leaves the row
// in cache for the normalize pass: DRAM sees one read of x (and residual)
// and one write of out (and the sum). With a fused residual the sum is
// written first, rounded to the input's dtype as `x + residual` would be,
// and the row is normalized from it.
// The backward computes, per row, sum(g) and sum(g * (x - mean)) with
// g = dy * weight, then dx; weight and bias gradients are column sums kept
// per task and added at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/sample_norm_plan.h"
#include "common/sample_norm_math.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm {
namespace {

using at::vec::Vectorized;
using namespace cpu;

// A (D,) parameter as acc_t values; empty when absent.
template <typename acc_t>
std::vector<acc_t> row_values(const at::Tensor& t, int64_t D) {
  if (!t.defined()) return {};
  return channel_values<acc_t>(std::optional<at::Tensor>(t), D, acc_t(0));
}

template <typename acc_t>
const acc_t* data_or_null(const std::vector<acc_t>& v, int64_t offset) {
  return v.empty() ? nullptr : v.data() + offset;
}

// y = (x - mean) * rstd [* w] [+ b]
template <typename acc_t>
void affine_segment(const acc_t* x, acc_t mean, acc_t rstd, const acc_t* w, const acc_t* b, acc_t* y, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vmean(mean), vrstd(rstd);
  // One loop per combination of parameters, so no loop tests w or b.
  const auto rows = [&](auto with_w, auto with_b) {
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec v = (Vec::loadu(x + i) - vmean) * vrstd;
      if constexpr (with_w && with_b) {
        v = at::vec::fmadd(v, Vec::loadu(w + i), Vec::loadu(b + i));
      } else if constexpr (with_w) {
        v = v * Vec::loadu(w + i);
      } else if constexpr (with_b) {
        v = v + Vec::loadu(b + i);
      }
      v.store(y + i);
    }
    for (; i < n; ++i) {
      acc_t v = (x[i] - mean) * rstd;
      if constexpr (with_w) v *= w[i];
      if constexpr (with_b) v += b[i];
      y[i] = v;
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (w && b) {
    rows(yes{}, yes{});
  } else if (w) {
    rows(yes{}, no{});
  } else if (b) {
    rows(no{}, yes{});
  } else {
    rows(no{}, no{});
  }
}

// sum = x + r, computed in acc_t and rounded to scalar_t.
template <typename scalar_t, typename acc_t>
void add_segment(const scalar_t* x, const scalar_t* r, scalar_t* sum, int64_t n, Scratch<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  const acc_t* xa = read_as_acc(x, n, s.x.data());
  const acc_t* ra = read_as_acc(r, n, s.residual.data());
  acc_t* out = write_target(sum, s.out.data());
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(xa + i) + Vec::loadu(ra + i)).store(out + i);
  for (; i < n; ++i) out[i] = xa[i] + ra[i];
  write_back(out, sum, n);
}

// Per-row sums of the backward over one segment, in vector lanes:
// sum(g) and sum(g * xc) with g = dy * w, xc = x - mean. When dw / db are
// given, also dw[i] += dy * xc * rstd and db[i] += dy.
template <typename acc_t>
void row_grad_sums_segment(const acc_t* x, const acc_t* dy, const acc_t* w, acc_t mean, acc_t rstd, int64_t n,
                           Vectorized<acc_t>& lanes_g, Vectorized<acc_t>& lanes_g_xc, acc_t& tail_g,
                           acc_t& tail_g_xc, acc_t* dw, acc_t* db) {
  using Vec = Vectorized<acc_t>;
  const Vec vmean(mean), vrstd(rstd);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec xc = Vec::loadu(x + i) - vmean, d = Vec::loadu(dy + i);
    const Vec g = w ? d * Vec::loadu(w + i) : d;
    lanes_g = lanes_g + g;
    lanes_g_xc = at::vec::fmadd(g, xc, lanes_g_xc);
    if (dw) at::vec::fmadd(d * xc, vrstd, Vec::loadu(dw + i)).store(dw + i);
    if (db) (Vec::loadu(db + i) + d).store(db + i);
  }
  for (; i < n; ++i) {
    const acc_t xc = x[i] - mean, g = w ? dy[i] * w[i] : dy[i];
    tail_g += g;
    tail_g_xc += g * xc;
    if (dw) dw[i] += dy[i] * xc * rstd;
    if (db) db[i] += dy[i];
  }
}

// dx = g * rstd + xc * xc_coef + const_coef [+ grad_sum]
template <typename acc_t>
void row_grad_input_segment(const acc_t* x, const acc_t* dy, const acc_t* w, const acc_t* grad_sum, acc_t mean,
                            acc_t rstd, const BackwardCoefficients<acc_t>& k, acc_t* dx, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vmean(mean), vrstd(rstd), vxc(k.xc_coef), vconst(k.const_coef);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = Vec::loadu(dy + i);
    const Vec g = w ? d * Vec::loadu(w + i) : d;
    Vec v = at::vec::fmadd(Vec::loadu(x + i) - vmean, vxc, at::vec::fmadd(g, vrstd, vconst));
    if (grad_sum) v = v + Vec::loadu(grad_sum + i);
    v.store(dx + i);
  }
  for (; i < n; ++i) {
    const acc_t g = w ? dy[i] * w[i] : dy[i];
    acc_t v = g * rstd + (x[i] - mean) * k.xc_coef + k.const_coef;
    if (grad_sum) v += grad_sum[i];
    dx[i] = v;
  }
}

// ------------------------------------------------------------- forward --

template <typename scalar_t>
void row_norm_forward(RowNormPlan& p, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = p.D;
  const auto w = row_values<acc_t>(p.weight, D), b = row_values<acc_t>(p.bias, D);
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const scalar_t* residual = const_ptr<scalar_t>(p.residual);
  scalar_t* sum = residual ? p.sum.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = p.out.mutable_data_ptr<scalar_t>();
  acc_t* mean_out = p.rms ? nullptr : p.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_out = p.rstd.mutable_data_ptr<acc_t>();
  const acc_t eps_acc = static_cast<acc_t>(eps);
  at::parallel_for(0, p.M, grain_for(D), [&](int64_t r0, int64_t r1) {
    auto s = scratch_for<scalar_t, acc_t>(kSegment);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = r * D;
      const scalar_t* src = x + row;
      if (residual) {
        for_each_segment(D, [&](int64_t s0, int64_t n) {
          add_segment<scalar_t, acc_t>(x + row + s0, residual + row + s0, sum + row + s0, n, s);
        });
        src = sum + row;
      }
      acc_t mean = 0, var = 0;
      if (p.rms) {
        for_each_segment(D, [&](int64_t s0, int64_t n) {
          const acc_t* a = read_as_acc(src + s0, n, s.x.data());
          var += sum_segment<acc_t>(a, a, n);
        });
        var /= acc_t(D);
      } else {
        const auto st = range_mean_m2<scalar_t, acc_t>(src, D, s);
        mean = st.mean;
        var = st.m2 / st.count;
        mean_out[r] = mean;
      }
      const acc_t rstd = rstd_from_var(var, eps_acc);
      rstd_out[r] = rstd;
      for_each_segment(D, [&](int64_t s0, int64_t n) {
        acc_t* y = write_target(out + row + s0, s.out.data());
        affine_segment<acc_t>(read_as_acc(src + s0, n, s.x.data()), mean, rstd, data_or_null(w, s0),
                              data_or_null(b, s0), y, n);
        write_back(y, out + row + s0, n);
      });
    }
  });
}

void run_row_norm_forward(RowNormPlan& p, double eps) {
  if (p.M == 0) {
    // No rows, or rows of no elements (normalized_shape holds a 0): the
    // statistics of nothing, as GroupNorm writes them.
    if (p.mean.numel()) p.mean.zero_();
    p.rstd.fill_(1.0 / std::sqrt(eps));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "row_norm_cpu",
                                  [&] { row_norm_forward<scalar_t>(p, eps); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& residual) {
  RowNormPlan p = plan_row_norm("torchnorm.layer_norm", input, normalized_shape, weight, bias, residual, eps, false);
  run_row_norm_forward(p, eps);
  return {p.out, p.sum, p.mean, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& input,
                                                            at::IntArrayRef normalized_shape,
                                                            const std::optional<at::Tensor>& weight,
                                                            std::optional<double> eps_or_none,
                                                            const std::optional<at::Tensor>& residual) {
  const double eps = rms_norm_eps(input, eps_or_none);
  RowNormPlan p = plan_row_norm("torchnorm.rms_norm", input, normalized_shape, weight, std::nullopt, residual, eps, true);
  run_row_norm_forward(p, eps);
  return {p.out, p.sum, p.rstd};
}

// ------------------------------------------------------------ backward --

template <typename scalar_t>
void row_norm_backward(RowNormBackwardPlan& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t M = p.M, D = p.D;
  const auto w = row_values<acc_t>(p.weight, D);
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = p.grad_out.const_data_ptr<scalar_t>();
  const scalar_t* grad_sum = const_ptr<scalar_t>(p.grad_sum);
  scalar_t* dx = mutable_ptr<scalar_t>(p.grad_input);
  const acc_t* mean = p.rms ? nullptr : p.mean.const_data_ptr<acc_t>();
  const acc_t* rstd = p.rstd.const_data_ptr<acc_t>();
  const bool want_dw = p.grad_weight.numel() > 0, want_db = p.grad_bias.numel() > 0;
  // Weight / bias gradients are column sums: each chunk of rows keeps its own.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({M, 4 * at::get_num_threads(), M * D / kMinTaskElements}));
  const int64_t rows_per_chunk = (M + chunks - 1) / chunks;
  std::vector<std::vector<acc_t>> part_dw(want_dw ? chunks : 0, std::vector<acc_t>(D, 0));
  std::vector<std::vector<acc_t>> part_db(want_db ? chunks : 0, std::vector<acc_t>(D, 0));
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    auto s = scratch_for<scalar_t, acc_t>(kSegment);
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* dw = want_dw ? part_dw[k].data() : nullptr;
      acc_t* db = want_db ? part_db[k].data() : nullptr;
      for (int64_t r = k * rows_per_chunk; r < std::min(M, (k + 1) * rows_per_chunk); ++r) {
        const int64_t row = r * D;
        const acc_t m = mean ? mean[r] : acc_t(0), rs = rstd[r];
        Vec lanes_g(0), lanes_g_xc(0);
        acc_t tail_g = 0, tail_g_xc = 0;
        for_each_segment(D, [&](int64_t s0, int64_t n) {
          row_grad_sums_segment<acc_t>(read_as_acc(x + row + s0, n, s.x.data()),
                                       read_as_acc(dy + row + s0, n, s.dy.data()), data_or_null(w, s0), m, rs, n,
                                       lanes_g, lanes_g_xc, tail_g, tail_g_xc, dw ? dw + s0 : nullptr,
                                       db ? db + s0 : nullptr);
        });
        if (!dx) continue;
        const auto add = [](Vec& a, Vec& b) { return a + b; };
        const acc_t sum_g = at::vec::vec_reduce_all<acc_t>(add, lanes_g) + tail_g;
        const acc_t sum_g_xc = at::vec::vec_reduce_all<acc_t>(add, lanes_g_xc) + tail_g_xc;
        const auto coefs = sample_backward_coefficients(!p.rms, rs, sum_g, sum_g_xc, acc_t(D));
        for_each_segment(D, [&](int64_t s0, int64_t n) {
          acc_t* out = write_target(dx + row + s0, s.out.data());
          row_grad_input_segment<acc_t>(read_as_acc(x + row + s0, n, s.x.data()),
                                        read_as_acc(dy + row + s0, n, s.dy.data()), data_or_null(w, s0),
                                        grad_sum ? read_as_acc(grad_sum + row + s0, n, s.residual.data()) : nullptr,
                                        m, rs, coefs, out, n);
          write_back(out, dx + row + s0, n);
        });
      }
    }
  });
  const auto reduce_into = [&](std::vector<std::vector<acc_t>>& parts, at::Tensor& grad) {
    for (size_t k = 1; k < parts.size(); ++k) {
      for (int64_t d = 0; d < D; ++d) parts[0][d] += parts[k][d];
    }
    grad.view({-1}).copy_(to_tensor(parts[0], grad));
  };
  if (want_dw) reduce_into(part_dw, p.grad_weight);
  if (want_db) reduce_into(part_db, p.grad_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const at::Tensor& input,
    at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask) {
  RowNormBackwardPlan p =
      plan_row_norm_backward(grad_out, grad_sum, input, normalized_shape, mean, rstd, weight, output_mask);
  if (p.M == 0) {
    // No rows: the parameter gradients are empty sums.
    if (p.grad_weight.numel()) p.grad_weight.zero_();
    if (p.grad_bias.numel()) p.grad_bias.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "layer_norm_backward_cpu",
                                    [&] { row_norm_backward<scalar_t>(p); });
  }
  return {p.grad_input, p.grad_weight, p.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace torchnorm
