// CPU kernels of SyncBatchNorm's per-rank ops (docs/sync_batch_norm.md):
// batch_norm_stats (one rank's per-channel count, mean, M2),
// batch_norm_gather_stats (merge of every rank's, running statistics) and
// batch_norm_backward_elemt (grad_input from the global gradient means). The
// statistics are batch_norm_train's (planar: two-pass segments merged with
// Chan's formula per channel; channels-last: shifted rowwise Welford), the
// element-wise gradient is batch_norm_backward's, all from
// cpu/kernel_helpers.h; the per-channel math is common/sync_batch_norm_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "common/sync_batch_norm_math.h"
#include "common/sync_batch_norm_plan.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm {
namespace {

using namespace cpu;

// (count, mean, M2) of channel c of planar (N, C, S) data, the mean relative
// to `shift`: each segment is shifted before its two passes, so the partial
// means that Chan's formula merges are of the order of the spread, not of the
// mean (at a mean of 1e4, float32 means are off by float's spacing there,
// 1e-3, and their differences, which the merge squares, by as much).
template <typename scalar_t, typename acc_t>
MeanM2<acc_t> planar_channel_shifted_mean_m2(const scalar_t* x, int64_t N, int64_t C, int64_t S, int64_t c,
                                             acc_t shift, Scratch<acc_t>& s, std::vector<acc_t>& shifted) {
  MeanM2<acc_t> acc;
  for (int64_t n = 0; n < N; ++n) {
    for_each_segment(S, [&](int64_t s0, int64_t len) {
      const acc_t* v = read_as_acc(x + (n * C + c) * S + s0, len, s.x.data());
      for (int64_t i = 0; i < len; ++i) shifted[i] = v[i] - shift;
      acc = combine(acc, segment_mean_m2(shifted.data(), len));
    });
  }
  return acc;
}

at::Tensor batch_norm_stats_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_var,
                                const std::optional<at::Tensor>& residual) {
  StatsPlan p = plan_stats(input, weight, bias, running_mean, running_var, residual);
  const int64_t C = p.g.C, count = p.g.count_per_channel();
  if (count == 0) return p.stats;  // an empty share: count 0 (mean and M2 0)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    std::vector<MeanM2<acc_t>> stats(C);
    std::vector<acc_t> shift(C);  // each channel's first value: the means are relative to it
    if (p.g.layout == Layout::Planar) {
      for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc_t>(x[c * p.g.S]);
      at::parallel_for(0, C, grain_for(count), [&](int64_t c0, int64_t c1) {
        auto s = scratch_for<scalar_t, acc_t>(kSegment);
        std::vector<acc_t> shifted(kSegment);
        for (int64_t c = c0; c < c1; ++c) {
          stats[c] = planar_channel_shifted_mean_m2<scalar_t, acc_t>(x, p.g.N, C, p.g.S, c, shift[c], s, shifted);
        }
      });
    } else {
      stats = rowwise_stats<scalar_t, acc_t>(x, p.x.numel(), C, &shift);
    }
    // float64 out: the mean leaves as shift + relative mean without rounding
    // to float32's spacing at its magnitude, and the count is exact.
    double* out = p.stats.mutable_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<double>(count);
      out[C + c] = static_cast<double>(shift[c]) + static_cast<double>(stats[c].mean);
      out[2 * C + c] = static_cast<double>(stats[c].m2);
    }
  });
  return p.stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_gather_stats_cpu(
    const at::Tensor& stats, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  const at::Tensor table = plan_gather_stats(stats, running_mean, running_var, eps);
  const int64_t W = table.size(0), C = table.size(2);
  at::Tensor mean = at::empty({C}, table.options()), rstd = at::empty_like(mean), count = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "batch_norm_gather_stats_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* t = table.const_data_ptr<acc_t>();
    auto rm = channel_values<acc_t>(running_mean, C, 0), rv = channel_values<acc_t>(running_var, C, 1);
    acc_t *m = mean.mutable_data_ptr<acc_t>(), *r = rstd.mutable_data_ptr<acc_t>(), *n = count.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      const auto merged = finish_merged(merge_partials(t, W, C, c), static_cast<acc_t>(eps), running_mean.has_value(),
                                        static_cast<acc_t>(momentum), rm[c], rv[c]);
      m[c] = merged.mean;
      r[c] = merged.rstd;
      n[c] = merged.count;
    }
    if (running_mean) {
      running_mean->copy_(to_tensor(rm, table));
      running_var->copy_(to_tensor(rv, table));
    }
  });
  return {mean, rstd, count};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& mean_dz, const at::Tensor& mean_dz_xhat, c10::string_view activation,
    double negative_slope, std::array<bool, 2> output_mask) {
  BackwardPlan p = plan_backward_elemt(grad_out, input, weight, bias, residual, mean, rstd, mean_dz, mean_dz_xhat,
                                       std::string(activation), output_mask);
  if (p.x.numel() == 0 || (p.grad_input.numel() == 0 && p.grad_residual.numel() == 0)) {
    return {p.grad_input, p.grad_residual};
  }
  const int64_t C = p.g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const auto r = channel_values<acc_t>(rstd, C, 1), w = channel_values<acc_t>(weight, C, 1);
    const auto mdz = channel_values<acc_t>(mean_dz, C, 0), mdzx = channel_values<acc_t>(mean_dz_xhat, C, 0);
    const auto cc = forward_channel_coefs(channel_values<acc_t>(mean, C, 0), r, weight, bias);
    ChannelGradCoefs<acc_t> gc(C);
    for (int64_t c = 0; c < C; ++c) {
      const auto k = global_backward_coefficients(r[c], w[c], mdz[c], mdzx[c]);
      gc.dz_coef[c] = k.dz_coef;
      gc.xc_coef[c] = k.xc_coef;
      gc.const_coef[c] = k.const_coef;
    }
    const auto d = backward_data<scalar_t>(p.x, p.grad_out, p.residual, p.grad_input, p.grad_residual, p.activation);
    if (p.g.layout == Layout::Planar) {
      const int64_t S = p.g.S;
      at::parallel_for(0, p.g.N * C, grain_for(S), [&](int64_t i0, int64_t i1) {
        auto s = scratch_for<scalar_t, acc_t>(kSegment);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t c = i % C;
          const ForwardCoefs<false, acc_t> fc{{&cc.mean[c]}, {&cc.scale[c]}, {&cc.shift[c]}};
          const GradCoefs<false, acc_t> k{{&gc.dz_coef[c]}, {&gc.xc_coef[c]}, {&gc.const_coef[c]}};
          for_each_segment(S, [&](int64_t s0, int64_t len) {
            backward_elementwise<false, scalar_t, acc_t>(d.at(i * S + s0), len, fc, k, slope, s);
          });
        }
      });
    } else {
      rowwise_grad_elementwise<scalar_t, acc_t>(d, p.x.numel(), C, cc, gc, slope);
    }
  });
  return {p.grad_input, p.grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_gather_stats", &batch_norm_gather_stats_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
}

}  // namespace torchnorm
