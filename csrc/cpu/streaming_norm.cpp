// CPU kernels of Streaming Normalization (streaming_norm,
// streaming_norm_backward). They are BatchNorm's passes (cpu/channel_passes.h)
// with the streaming mix in between: a channel's batch statistics (or
// gradient sums) are pushed into its history and mixed with the long-term
// average (common/streaming_norm_math.h) inside the channel's own task, so
// the element-wise pass reads the channel from cache as BatchNorm's does,
// and the op costs about what batch_norm_train (batch_norm_backward) costs.
// The histories are read into double arrays before the passes and written
// back after them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "common/streaming_norm_math.h"
#include "common/streaming_norm_plan.h"
#include "cpu/channel_passes.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm::cpu {
namespace {

using at::Tensor;
using T = streaming_state_t;

// A (2, C) history as C (mean, std) pairs of state_t, and back in place.
std::vector<StreamingPair<T>> history_values(const Tensor& history) {
  const Tensor h = history.to(at::kDouble).contiguous();
  const T* p = h.const_data_ptr<T>();
  const int64_t C = history.size(1);
  std::vector<StreamingPair<T>> out(C);
  for (int64_t c = 0; c < C; ++c) out[c] = {p[c], p[C + c]};
  return out;
}

void store_history(const std::vector<StreamingPair<T>>& values, const Tensor& history) {
  const int64_t C = history.size(1);
  Tensor h = at::empty({2, C}, history.options().dtype(at::kDouble));
  T* p = h.mutable_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    p[c] = values[c].mean;
    p[C + c] = values[c].std;
  }
  history.copy_(h);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> streaming_norm_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const Tensor& short_stats, const Tensor& short_count, const Tensor& long_stats, const Tensor& long_count,
    const Tensor& grad_short, const Tensor& grad_short_count, const Tensor& grad_long, const Tensor& grad_long_count,
    double alpha_long, double alpha_short, double /*beta_long*/, double /*beta_short*/, double /*beta_current*/,
    double eps) {
  const ForwardPlan p = plan_streaming_norm("torchnorm.streaming_norm", input, weight, bias, short_stats, short_count,
                                            long_stats, long_count, grad_short, grad_short_count, grad_long,
                                            grad_long_count, eps);
  const int64_t C = p.g.C;
  std::vector<StreamingPair<T>> short_c = history_values(short_stats);
  const std::vector<StreamingPair<T>> long_c = history_values(long_stats);
  const T count = short_count.item<T>();
  const bool long_set = long_count.item<T>() > 0;
  Tensor mean, rstd, mean_hat, rstd_hat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "streaming_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> m(C), r(C), m_hat(C), r_hat(C);
    const auto w = channel_values<acc_t>(weight, C, 1), b = channel_values<acc_t>(bias, C, 0);
    forward_channel_passes<scalar_t, acc_t>(p, acc_t(0), [&](int64_t c, const MeanM2<acc_t>& stats) {
      m[c] = stats.mean;
      r[c] = rstd_from_var(stats.m2 / stats.count, static_cast<acc_t>(eps));
      const StreamingPair<T> hat = streaming_forward_channel(short_c[c], long_c[c], long_set, count, m[c], r[c],
                                                             T(alpha_long), T(alpha_short));
      m_hat[c] = static_cast<acc_t>(hat.mean);
      r_hat[c] = acc_t(1) / static_cast<acc_t>(hat.std);
      const auto f = forward_coefficients(r_hat[c], w[c], b[c]);
      return ForwardChannel<acc_t>{m_hat[c], f.scale, f.shift};
    });
    mean = to_tensor(m, input);
    rstd = to_tensor(r, input);
    mean_hat = to_tensor(m_hat, input);
    rstd_hat = to_tensor(r_hat, input);
  });
  store_history(short_c, short_stats);
  short_count.add_(1);
  return {p.out, mean, rstd, mean_hat, rstd_hat};
}

std::tuple<Tensor, Tensor, Tensor> streaming_norm_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight, const Tensor& mean,
    const Tensor& rstd, const Tensor& mean_hat, const Tensor& rstd_hat, const Tensor& grad_short,
    const Tensor& grad_short_count, const Tensor& grad_long, const Tensor& grad_long_count, double beta_long,
    double beta_short, double beta_current, std::array<bool, 3> output_mask) {
  const BackwardPlan p =
      plan_streaming_norm_backward("torchnorm.streaming_norm_backward", grad_output, input, weight, mean, rstd,
                                   mean_hat, rstd_hat, grad_short, grad_short_count, grad_long, grad_long_count,
                                   output_mask);
  const int64_t C = p.g.C;
  std::vector<StreamingPair<T>> short_c = history_values(grad_short);
  const std::vector<StreamingPair<T>> long_c = history_values(grad_long);
  const T count = grad_short_count.item<T>();
  const bool long_set = grad_long_count.item<T>() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "streaming_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = channel_values<acc_t>(weight, C, 1);
    const auto m = channel_values<acc_t>(mean, C, 0), r = channel_values<acc_t>(rstd, C, 1);
    const auto m_hat = channel_values<acc_t>(mean_hat, C, 0), r_hat = channel_values<acc_t>(rstd_hat, C, 1);
    // The element-wise pass centres on mean_hat (no activation: scale and
    // shift are not read).
    const auto cc = ChannelCoefs<acc_t>{m_hat, std::vector<acc_t>(C), std::vector<acc_t>(C)};
    const acc_t M = static_cast<acc_t>(p.g.count_per_channel());
    std::vector<acc_t> sum_dy(C), sum_dy_xc(C);
    // The history needs both sums whatever the mask.
    const auto channel = [&](int64_t c, acc_t dy, acc_t dy_xc) {
      sum_dy[c] = dy;
      sum_dy_xc[c] = dy_xc;
      return streaming_backward_channel(short_c[c], long_c[c], long_set, count, dy, dy_xc, w[c], m_hat[c], r_hat[c],
                                        m[c], r[c], M, T(beta_long), T(beta_short), T(beta_current));
    };
    backward_channel_passes<scalar_t, acc_t>(p, cc, /*want_sums=*/true, acc_t(0), channel);
    store_parameter_grads(p, sum_dy, sum_dy_xc, r_hat);
  });
  store_history(short_c, grad_short);
  grad_short_count.add_(1);
  return {p.grad_input, p.grad_weight, p.grad_bias};
}

}  // namespace
}  // namespace torchnorm::cpu

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  m.impl("streaming_norm", &torchnorm::cpu::streaming_norm_cpu);
  m.impl("streaming_norm_backward", &torchnorm::cpu::streaming_norm_backward_cpu);
}
