// BatchNorm CPU kernels: batch_norm_train, batch_norm_eval, batch_norm_apply
// (normalize with given statistics) and batch_norm_backward.
//
// Memory traffic. NCHW ("planar") work is split by channel: one task owns a
// channel, reads its N planes once to compute the statistics (two-pass within
// each L1-sized segment, segments merged with Chan's formula), then normalizes
// the same data again while it is still in L2 (a channel of the benchmark
// shapes is 50-400 KiB). So DRAM sees about one read and one write of x.
// Channels-last ("rowwise") data interleaves channels, so it is split by rows:
// tasks reduce row blocks into per-channel partials, the partials are merged,
// and a second parallel pass normalizes: two reads and one write of x.
// The backward has the same two shapes, with sum(dz) and sum(dz * (x - mean))
// in place of the statistics. The passes of both directions are in
// cpu/channel_passes.h, shared with Streaming Normalization; here only how a
// channel's statistics or sums become its coefficients.
//
// All math runs on acc_t (float, or double for double input): float16 and
// bfloat16 segments are converted into small scratch buffers first. The
// per-element formulas come from csrc/common; vector_activation* below are
// their at::vec::Vectorized forms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/batch_norm_plan.h"
#include "common/batch_norm_math.h"
#include "common/welford.h"
#include "cpu/channel_passes.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm {
namespace {

using at::vec::Vectorized;
using namespace cpu;

// ------------------------------------------------------------------- ops --

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, c10::string_view activation, double negative_slope, const std::optional<at::Tensor>& residual) {
  ForwardPlan p = plan_forward("torchnorm.batch_norm_train", input, weight, bias, running_mean, running_var, residual,
                               /*training=*/true, eps, std::string(activation));
  const int64_t C = p.g.C;
  const auto acc_options = input.options().dtype(accumulate_type(input.scalar_type()));
  if (p.g.count_per_channel() == 0) {
    // Empty batch: nothing to normalize; running statistics stay as they are,
    // as in torch.nn.
    return {p.out, at::zeros({C}, acc_options), at::zeros({C}, acc_options)};
  }
  at::Tensor save_mean, save_rstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t slope = static_cast<acc_t>(negative_slope), eps_acc = static_cast<acc_t>(eps);
    std::vector<MeanM2<acc_t>> stats(C);
    std::vector<acc_t> mean(C), rstd(C);
    const auto w = channel_values<acc_t>(weight, C, 1), b = channel_values<acc_t>(bias, C, 0);
    forward_channel_passes<scalar_t, acc_t>(p, slope, [&](int64_t c, const MeanM2<acc_t>& channel_stats) {
      stats[c] = channel_stats;
      mean[c] = channel_stats.mean;
      rstd[c] = rstd_from_var(channel_stats.m2 / channel_stats.count, eps_acc);
      const auto f = forward_coefficients(rstd[c], w[c], b[c]);
      return ForwardChannel<acc_t>{mean[c], f.scale, f.shift};
    });
    if (running_mean) {
      auto rm = channel_values<acc_t>(running_mean, C, 0), rv = channel_values<acc_t>(running_var, C, 1);
      for (int64_t c = 0; c < C; ++c) {
        update_running_stats(rm[c], rv[c], stats[c].mean, stats[c].m2, stats[c].count, static_cast<acc_t>(momentum));
      }
      running_mean->copy_(to_tensor(rm, input));
      running_var->copy_(to_tensor(rv, input));
    }
    save_mean = to_tensor(mean, input);
    save_rstd = to_tensor(rstd, input);
  });
  return {p.out, save_mean, save_rstd};
}

// Writes act((x - mean) * rstd * weight + bias + residual) into p.out.
// stats_are_rstd: `stats` holds rstd itself (batch_norm_apply) rather than a
// variance (batch_norm_eval), so a rebuilt training output is bit-identical.
at::Tensor normalize_with_statistics(const ForwardPlan& p, const at::Tensor& mean, const at::Tensor& stats,
                                     bool stats_are_rstd, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, double eps, double negative_slope) {
  if (p.x.numel() == 0) return p.out;
  const int64_t C = p.g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "batch_norm_normalize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t slope = static_cast<acc_t>(negative_slope);
    std::vector<acc_t> rstd = channel_values<acc_t>(stats, C, 1);
    if (!stats_are_rstd) {
      for (auto& v : rstd) v = rstd_from_var(v, static_cast<acc_t>(eps));
    }
    const auto cc = forward_channel_coefs(channel_values<acc_t>(mean, C, 0), rstd, weight, bias);
    const auto d = forward_data<scalar_t>(p.x, p.residual, p.out, p.activation);
    if (p.g.layout == Layout::Planar) {
      at::parallel_for(0, p.g.N * C, grain_for(p.g.S), [&](int64_t i0, int64_t i1) {
        auto s = scratch_for<scalar_t, acc_t>(kSegment);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t c = i % C;
          const ForwardCoefs<false, acc_t> coefs{{&cc.mean[c]}, {&cc.scale[c]}, {&cc.shift[c]}};
          normalize_range<scalar_t, acc_t>(d.at(i * p.g.S), p.g.S, coefs, slope, s);
        }
      });
    } else {
      normalize_rowwise<scalar_t, acc_t>(d, p.x.numel(), C, cc, slope);
    }
  });
  return p.out;
}

at::Tensor batch_norm_eval_cpu(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               double eps, c10::string_view activation, double negative_slope,
                               const std::optional<at::Tensor>& residual) {
  const ForwardPlan p = plan_forward("torchnorm.batch_norm_eval", input, weight, bias, running_mean, running_var,
                                     residual, /*training=*/false, eps, std::string(activation));
  return normalize_with_statistics(p, running_mean, running_var, /*stats_are_rstd=*/false, weight, bias, eps,
                                   negative_slope);
}

at::Tensor batch_norm_apply_cpu(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                c10::string_view activation, double negative_slope,
                                const std::optional<at::Tensor>& residual) {
  const ForwardPlan p = plan_apply(input, mean, rstd, weight, bias, residual, std::string(activation));
  return normalize_with_statistics(p, mean, rstd, /*stats_are_rstd=*/true, weight, bias, 0.0, negative_slope);
}

// ------------------------------------------------------------- backward --

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& mean,
    const at::Tensor& rstd, bool training, c10::string_view activation, double negative_slope,
    std::array<bool, 4> output_mask) {
  BackwardPlan p = plan_backward("torchnorm.batch_norm_backward", grad_out, input, weight, bias, residual, mean, rstd,
                                 std::string(activation), output_mask);
  const int64_t C = p.g.C;
  const bool want_sums = p.grad_weight.numel() > 0 || p.grad_bias.numel() > 0 || (training && p.grad_input.numel() > 0);
  if (p.g.count_per_channel() == 0) {
    // Empty batch: the parameter gradients are empty sums.
    if (p.grad_weight.numel()) p.grad_weight.zero_();
    if (p.grad_bias.numel()) p.grad_bias.zero_();
    return {p.grad_input, p.grad_weight, p.grad_bias, p.grad_residual};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const acc_t count = static_cast<acc_t>(p.g.count_per_channel());
    const auto r = channel_values<acc_t>(rstd, C, 1), w = channel_values<acc_t>(weight, C, 1);
    const auto cc = forward_channel_coefs(channel_values<acc_t>(mean, C, 0), r, weight, bias);
    std::vector<acc_t> sum_dz(C, 0), sum_dz_xc(C, 0);
    backward_channel_passes<scalar_t, acc_t>(p, cc, want_sums, slope, [&](int64_t c, acc_t dz, acc_t dz_xc) {
      sum_dz[c] = dz;
      sum_dz_xc[c] = dz_xc;
      return backward_coefficients(training, r[c], w[c], dz, dz_xc, count);
    });
    store_parameter_grads(p, sum_dz, sum_dz_xc, r);
  });
  return {p.grad_input, p.grad_weight, p.grad_bias, p.grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("batch_norm_eval", &batch_norm_eval_cpu);
  m.impl("batch_norm_apply", &batch_norm_apply_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace torchnorm
