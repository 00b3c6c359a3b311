// CPU kernels of GroupNorm and of InstanceNorm, which lives here too: the ops
// group_norm, group_norm_backward and instance_norm (GroupNorm with one group
// per channel, G = C, plus the running-statistics update). The data is
// (N, C, S), C split into G groups of K channels.
//
// Memory traffic. NCHW ("planar"): a group of one sample is one contiguous
// run of K * S elements, so a task owns a group, computes its statistics
// (two passes per L1-sized segment, merged with Chan's formula) and
// normalizes it while it is still in cache: one read and one write of x.
// Channels-last ("rowwise"): a sample is S rows of C interleaved channels;
// per sample, the BatchNorm rowwise kernels give per-channel partials, which
// are merged into the groups with the same Chan formula, then a second pass
// normalizes with per-channel coefficients.
// The backward has the same two shapes: per (n, c), sum(dz) and
// sum(dz * (x - mean)) with dz = dy * act'(z); per group they combine, with
// the weights, into the coefficients of dx (csrc/common/sample_norm_math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "common/sample_norm_plan.h"
#include "common/sample_norm_math.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm {
namespace {

using at::vec::Vectorized;
using namespace cpu;

template <typename acc_t>
std::vector<acc_t> values_or(const at::Tensor& t, int64_t C, acc_t fill) {
  return channel_values<acc_t>(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt, C, fill);
}

// Runs fn(n) for every sample of a rowwise tensor. With at least as many
// samples as threads, samples run in parallel (the rowwise kernels' own
// parallel loops then run inline), so the thread that reduced a sample
// normalizes it next, while it is still in cache; with fewer, samples run one
// after another, each split across the threads.
template <typename Fn>
void for_each_sample(int64_t N, int64_t sample_elements, const Fn& fn) {
  if (N >= at::get_num_threads()) {
    at::parallel_for(0, N, grain_for(sample_elements), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) fn(n);
    });
  } else {
    for (int64_t n = 0; n < N; ++n) fn(n);
  }
}

// ------------------------------------------------------------- forward --

template <typename scalar_t>
void group_norm_forward(GroupNormPlan& p, double eps, double negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = p.g;
  const int64_t K = g.channels_per_group(), S = g.S, C = g.C;
  const acc_t slope = static_cast<acc_t>(negative_slope), eps_acc = static_cast<acc_t>(eps);
  const auto w = values_or<acc_t>(p.weight, C, 1), b = values_or<acc_t>(p.bias, C, 0);
  acc_t* mean = p.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd = p.rstd.mutable_data_ptr<acc_t>();
  acc_t* var = mutable_ptr<acc_t>(p.var);
  const auto d = forward_data<scalar_t>(p.x, at::Tensor(), p.out, p.activation);
  const auto finish_group = [&](int64_t ng, const MeanM2<acc_t>& st) {
    mean[ng] = st.mean;
    const acc_t v = st.count > 0 ? st.m2 / st.count : acc_t(0);
    rstd[ng] = rstd_from_var(v, eps_acc);
    if (var) var[ng] = v;
  };
  if (g.layout == Layout::Planar) {
    at::parallel_for(0, g.N * g.G, grain_for(K * S), [&](int64_t i0, int64_t i1) {
      auto s = scratch_for<scalar_t, acc_t>(kSegment);
      for (int64_t ng = i0; ng < i1; ++ng) {
        const int64_t first = ng * K * S, c0 = (ng % g.G) * K;
        finish_group(ng, range_mean_m2<scalar_t, acc_t>(d.x + first, K * S, s));
        for (int64_t k = 0; k < K; ++k) {
          const auto f = forward_coefficients(rstd[ng], w[c0 + k], b[c0 + k]);
          const ForwardCoefs<false, acc_t> coefs{{&mean[ng]}, {&f.scale}, {&f.shift}};
          normalize_range<scalar_t, acc_t>(d.at(first + k * S), S, coefs, slope, s);
        }
      }
    });
    return;
  }
  for_each_sample(g.N, S * C, [&](int64_t n) {
    const int64_t first = n * S * C;
    const auto channel_stats = rowwise_stats<scalar_t, acc_t>(d.x + first, S * C, C);
    ChannelCoefs<acc_t> cc{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C)};
    for (int64_t gi = 0; gi < g.G; ++gi) {
      MeanM2<acc_t> st;
      for (int64_t k = 0; k < K; ++k) st = combine(st, channel_stats[gi * K + k]);
      const int64_t ng = n * g.G + gi;
      finish_group(ng, st);
      for (int64_t c = gi * K; c < (gi + 1) * K; ++c) {
        const auto f = forward_coefficients(rstd[ng], w[c], b[c]);
        cc.mean[c] = mean[ng];
        cc.scale[c] = f.scale;
        cc.shift[c] = f.shift;
      }
    }
    normalize_rowwise<scalar_t, acc_t>(d.at(first), S * C, C, cc, slope);
  });
}

void run_group_norm_forward(GroupNormPlan& p, double eps, double negative_slope) {
  if (p.x.numel() == 0) {
    // No elements (N = 0, or empty groups): statistics of nothing.
    p.mean.zero_();
    p.rstd.fill_(1.0 / std::sqrt(eps));
    if (p.var.defined()) p.var.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "group_norm_cpu",
                                  [&] { group_norm_forward<scalar_t>(p, eps, negative_slope); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cpu(const at::Tensor& input, int64_t num_groups,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps,
                                                              c10::string_view activation, double negative_slope) {
  GroupNormPlan p = plan_group_norm("torchnorm.group_norm", input, num_groups, weight, bias, eps,
                                    std::string(activation), /*want_var=*/false);
  run_group_norm_forward(p, eps, negative_slope);
  return {p.out, p.mean, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps) {
  GroupNormPlan p = plan_instance_norm(input, weight, bias, running_mean, running_var, eps);
  run_group_norm_forward(p, eps, 0.0);
  update_instance_running_stats(p, running_mean, running_var, momentum);
  return {p.out, p.mean, p.rstd};
}

// ------------------------------------------------------------ backward --

// dx = dz * dz_coef + (x - mean) * xc_coef + const_coef over n elements, from
// the dz the sums pass kept: an activation's derivative (SiLU's exp) costs
// more than storing dz and reading it back from cache.
template <typename scalar_t, typename acc_t>
void grad_input_from_dz(const scalar_t* x, const acc_t* dz, scalar_t* dx, int64_t n, acc_t mean, acc_t dz_coef,
                        const BackwardCoefficients<acc_t>& k, Scratch<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  const acc_t* xa = read_as_acc(x, n, s.x.data());
  acc_t* out = write_target(dx, s.out.data());
  const Vec vmean(mean), vdz(dz_coef), vxc(k.xc_coef), vconst(k.const_coef);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::fmadd(Vec::loadu(xa + i) - vmean, vxc, at::vec::fmadd(Vec::loadu(dz + i), vdz, vconst)).store(out + i);
  }
  for (; i < n; ++i) out[i] = dz[i] * dz_coef + (xa[i] - mean) * k.xc_coef + k.const_coef;
  write_back(out, dx, n);
}

template <typename scalar_t>
void group_norm_backward(GroupNormBackwardPlan& p, double negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = p.g;
  const int64_t K = g.channels_per_group(), S = g.S, C = g.C, G = g.G;
  const acc_t slope = static_cast<acc_t>(negative_slope);
  const auto w = values_or<acc_t>(p.weight, C, 1), b = values_or<acc_t>(p.bias, C, 0);
  const acc_t* mean = p.mean.const_data_ptr<acc_t>();
  const acc_t* rstd = p.rstd.const_data_ptr<acc_t>();
  const auto d = backward_data<scalar_t>(p.x, p.grad_out, at::Tensor(), p.grad_input, at::Tensor(), p.activation);
  const bool want_dx = d.dx != nullptr;
  // Per (n, c): sum(dz) and sum(dz * (x - mean)).
  std::vector<acc_t> sum_dz(g.N * C, 0), sum_dz_xc(g.N * C, 0);
  // The coefficients of dx for group ng from its channels' sums.
  const auto group_coefficients = [&](int64_t n, int64_t gi) {
    acc_t sum_g = 0, sum_g_xc = 0;
    for (int64_t c = gi * K; c < (gi + 1) * K; ++c) {
      sum_g += w[c] * sum_dz[n * C + c];
      sum_g_xc += w[c] * sum_dz_xc[n * C + c];
    }
    return sample_backward_coefficients(true, rstd[n * G + gi], sum_g, sum_g_xc, acc_t(K * S));
  };
  if (g.layout == Layout::Planar) {
    // With an activation, the sums pass keeps the group's dz for the dx pass.
    const bool keep_dz = want_dx && p.activation != Activation::None;
    at::parallel_for(0, g.N * G, grain_for(K * S), [&](int64_t i0, int64_t i1) {
      auto s = scratch_for<scalar_t, acc_t>(kSegment);
      std::vector<acc_t> dz(keep_dz ? K * S : 0);
      for (int64_t ng = i0; ng < i1; ++ng) {
        const int64_t n = ng / G, gi = ng % G;
        std::vector<acc_t> scale(K), shift(K);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t c = gi * K + k, plane = (n * C + c) * S;
          const auto f = forward_coefficients(rstd[ng], w[c], b[c]);
          scale[k] = f.scale;
          shift[k] = f.shift;
          const ForwardCoefs<false, acc_t> fc{{&mean[ng]}, {&scale[k]}, {&shift[k]}};
          std::array<acc_t, Vectorized<acc_t>::size()> lanes_dz{}, lanes_dz_xc{};
          for_each_segment(S, [&](int64_t s0, int64_t len) {
            backward_sums<false, scalar_t, acc_t>(d.at(plane + s0), len, fc, slope, s, lanes_dz.data(),
                                                  lanes_dz_xc.data(), keep_dz ? &dz[k * S + s0] : nullptr);
          });
          sum_dz[n * C + c] = lane_sum(lanes_dz);
          sum_dz_xc[n * C + c] = lane_sum(lanes_dz_xc);
        }
        if (!want_dx) continue;
        const auto k = group_coefficients(n, gi);
        for (int64_t kk = 0; kk < K; ++kk) {
          const int64_t c = gi * K + kk, plane = (n * C + c) * S;
          const ForwardCoefs<false, acc_t> fc{{&mean[ng]}, {&scale[kk]}, {&shift[kk]}};
          const acc_t dz_coef = w[c] * k.dz_coef;
          const GradCoefs<false, acc_t> gc{{&dz_coef}, {&k.xc_coef}, {&k.const_coef}};
          for_each_segment(S, [&](int64_t s0, int64_t len) {
            if (keep_dz) {
              grad_input_from_dz<scalar_t, acc_t>(d.x + plane + s0, &dz[kk * S + s0], d.dx + plane + s0, len,
                                                  mean[ng], dz_coef, k, s);
            } else {
              backward_elementwise<false, scalar_t, acc_t>(d.at(plane + s0), len, fc, gc, slope, s);
            }
          });
        }
      }
    });
  } else {
    for_each_sample(g.N, S * C, [&](int64_t n) {
      ChannelCoefs<acc_t> cc{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C)};
      for (int64_t c = 0; c < C; ++c) {
        const int64_t ng = n * G + c / K;
        const auto f = forward_coefficients(rstd[ng], w[c], b[c]);
        cc.mean[c] = mean[ng];
        cc.scale[c] = f.scale;
        cc.shift[c] = f.shift;
      }
      const int64_t first = n * S * C;
      auto dx_pass = d.at(first);
      acc_t* dz_out = keep_dz_in_grad_input<scalar_t, acc_t>(dx_pass);
      rowwise_grad_sums<scalar_t, acc_t>(d.at(first), S * C, C, cc, slope, &sum_dz[n * C], &sum_dz_xc[n * C],
                                         dz_out);
      if (!want_dx) return;
      ChannelGradCoefs<acc_t> gc(C);
      for (int64_t gi = 0; gi < G; ++gi) {
        const auto k = group_coefficients(n, gi);
        for (int64_t c = gi * K; c < (gi + 1) * K; ++c) {
          gc.dz_coef[c] = w[c] * k.dz_coef;
          gc.xc_coef[c] = k.xc_coef;
          gc.const_coef[c] = k.const_coef;
        }
      }
      rowwise_grad_elementwise<scalar_t, acc_t>(dx_pass, S * C, C, cc, gc, slope);
    });
  }
  if (p.grad_weight.numel()) {
    std::vector<acc_t> gw(C, 0);
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < C; ++c) gw[c] += sum_dz_xc[n * C + c] * rstd[n * G + c / K];
    }
    p.grad_weight.copy_(to_tensor(gw, p.grad_weight));
  }
  if (p.grad_bias.numel()) {
    std::vector<acc_t> gb(C, 0);
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < C; ++c) gb[c] += sum_dz[n * C + c];
    }
    p.grad_bias.copy_(to_tensor(gb, p.grad_bias));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, int64_t num_groups, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    c10::string_view activation, double negative_slope, std::array<bool, 3> output_mask) {
  GroupNormBackwardPlan p = plan_group_norm_backward(grad_out, input, num_groups, mean, rstd, weight, bias,
                                                     std::string(activation), output_mask);
  if (p.x.numel() == 0) {
    // No elements: the parameter gradients are empty sums.
    if (p.grad_weight.numel()) p.grad_weight.zero_();
    if (p.grad_bias.numel()) p.grad_bias.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "group_norm_backward_cpu",
                                    [&] { group_norm_backward<scalar_t>(p, negative_slope); });
  }
  return {p.grad_input, p.grad_weight, p.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  m.impl("group_norm", &group_norm_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
  m.impl("instance_norm", &instance_norm_cpu);
}

}  // namespace torchnorm
