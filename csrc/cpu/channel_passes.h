#pragma once
// The passes of a per-channel norm's training forward and of its backward
// over the data of a BatchNorm plan (common/batch_norm_plan.h), shared by
// BatchNorm and Streaming Normalization. The two differ only in how a
// channel's statistics (forward) or gradient sums (backward) become the
// coefficients of the element-wise pass: the `channel` callback, called once
// per channel between the two passes. Planar data is split by channel: one
// task reads a channel's N planes for its statistics, calls `channel`, and
// makes the element-wise pass over the same planes while they are still in
// cache (L2 for the benchmark shapes), so memory sees about one read of the
// input (and of dy) and one write. Rowwise (channels-last) data: a reduction
// pass into per-channel partials, `channel` for each channel in order, then
// the element-wise pass.
//
// `channel` is called from parallel tasks (planar data): it may write only
// channel c's entries of shared arrays.
#include <ATen/Parallel.h>

#include <array>
#include <vector>

#include "common/batch_norm_math.h"
#include "common/batch_norm_plan.h"
#include "common/welford.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm {
namespace cpu {

// A channel's forward coefficients: out = act((x - mean) * scale + shift [+ residual]).
template <typename acc_t>
struct ForwardChannel {
  acc_t mean, scale, shift;
};

// Training forward: stats of each channel over N and the positions (count,
// mean, M2; two-pass per segment, segments merged with Chan's formula), then
// channel(c, stats) -> ForwardChannel, then out.
template <typename scalar_t, typename acc_t, typename Channel>
void forward_channel_passes(const ForwardPlan& p, acc_t slope, const Channel& channel) {
  const int64_t C = p.g.C;
  const auto d = forward_data<scalar_t>(p.x, p.residual, p.out, p.activation);
  if (p.g.layout == Layout::Planar) {
    const int64_t S = p.g.S;
    at::parallel_for(0, C, grain_for(p.g.count_per_channel()), [&](int64_t c0, int64_t c1) {
      auto s = scratch_for<scalar_t, acc_t>(kSegment);
      for (int64_t c = c0; c < c1; ++c) {
        const ForwardChannel<acc_t> f = channel(c, planar_channel_mean_m2<scalar_t, acc_t>(d.x, p.g.N, C, S, c, s));
        const ForwardCoefs<false, acc_t> coefs{{&f.mean}, {&f.scale}, {&f.shift}};
        for (int64_t n = 0; n < p.g.N; ++n) normalize_range<scalar_t, acc_t>(d.at((n * C + c) * S), S, coefs, slope, s);
      }
    });
  } else {
    const auto stats = rowwise_stats<scalar_t, acc_t>(p.x.const_data_ptr<scalar_t>(), p.x.numel(), C);
    ChannelCoefs<acc_t> cc{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C)};
    for (int64_t c = 0; c < C; ++c) {
      const ForwardChannel<acc_t> f = channel(c, stats[c]);
      cc.mean[c] = f.mean;
      cc.scale[c] = f.scale;
      cc.shift[c] = f.shift;
    }
    normalize_rowwise<scalar_t, acc_t>(d, p.x.numel(), C, cc, slope);
  }
}

// Backward, with cc the forward's coefficients (the centre, and scale and
// shift to recompute z for an activation's derivative): per channel the sums
// sum(dz) and sum(dz * (x - cc.mean)) when want_sums (else both 0), then
// channel(c, sum_dz, sum_dz_xc) -> BackwardCoefficients, then grad_input =
// dz * dz_coef + (x - mean) * xc_coef + const_coef and/or grad_residual = dz,
// when the plan has either.
template <typename scalar_t, typename acc_t, typename Channel>
void backward_channel_passes(const BackwardPlan& p, const ChannelCoefs<acc_t>& cc, bool want_sums, acc_t slope,
                             const Channel& channel) {
  const int64_t C = p.g.C;
  const bool want_elementwise = p.grad_input.numel() > 0 || p.grad_residual.numel() > 0;
  const auto d = backward_data<scalar_t>(p.x, p.grad_out, p.residual, p.grad_input, p.grad_residual, p.activation);
  if (p.g.layout == Layout::Planar) {
    at::parallel_for(0, C, grain_for(p.g.count_per_channel()), [&](int64_t c0, int64_t c1) {
      auto s = scratch_for<scalar_t, acc_t>(kSegment);
      for (int64_t c = c0; c < c1; ++c) {
        const ForwardCoefs<false, acc_t> fc{{&cc.mean[c]}, {&cc.scale[c]}, {&cc.shift[c]}};
        auto for_each_channel_segment = [&](auto&& fn) {
          for (int64_t n = 0; n < p.g.N; ++n) {
            const int64_t plane = (n * C + c) * p.g.S;
            for_each_segment(p.g.S, [&](int64_t s0, int64_t len) { fn(plane + s0, len); });
          }
        };
        acc_t sum_dz = 0, sum_dz_xc = 0;
        if (want_sums) {
          std::array<acc_t, Vectorized<acc_t>::size()> lanes_dz{}, lanes_dz_xc{};
          for_each_channel_segment([&](int64_t off, int64_t len) {
            backward_sums<false, scalar_t, acc_t>(d.at(off), len, fc, slope, s, lanes_dz.data(), lanes_dz_xc.data());
          });
          sum_dz = lane_sum(lanes_dz);
          sum_dz_xc = lane_sum(lanes_dz_xc);
        }
        const BackwardCoefficients<acc_t> k = channel(c, sum_dz, sum_dz_xc);
        if (want_elementwise) {
          const GradCoefs<false, acc_t> gc{{&k.dz_coef}, {&k.xc_coef}, {&k.const_coef}};
          for_each_channel_segment([&](int64_t off, int64_t len) {
            backward_elementwise<false, scalar_t, acc_t>(d.at(off), len, fc, gc, slope, s);
          });
        }
      }
    });
  } else {
    auto dx_pass = d;
    acc_t* dz_out = want_sums && want_elementwise ? keep_dz_in_grad_input<scalar_t, acc_t>(dx_pass) : nullptr;
    std::vector<acc_t> sum_dz(C, 0), sum_dz_xc(C, 0);
    if (want_sums) {
      rowwise_grad_sums<scalar_t, acc_t>(d, p.x.numel(), C, cc, slope, sum_dz.data(), sum_dz_xc.data(), dz_out);
    }
    ChannelGradCoefs<acc_t> gc(C);
    for (int64_t c = 0; c < C; ++c) {
      const BackwardCoefficients<acc_t> k = channel(c, sum_dz[c], sum_dz_xc[c]);
      gc.dz_coef[c] = k.dz_coef;
      gc.xc_coef[c] = k.xc_coef;
      gc.const_coef[c] = k.const_coef;
    }
    if (want_elementwise) rowwise_grad_elementwise<scalar_t, acc_t>(dx_pass, p.x.numel(), C, cc, gc, slope);
  }
}

// A BatchNorm-style affine map's gradients into the plan's outputs (those it
// has): grad_weight = sum(dz * x_hat) = sum_dz_xc * rstd and grad_bias =
// sum_dz, with x_hat = (x - mean) * rstd as the forward normalized.
template <typename acc_t>
void store_parameter_grads(const BackwardPlan& p, const std::vector<acc_t>& sum_dz,
                           const std::vector<acc_t>& sum_dz_xc, const std::vector<acc_t>& rstd) {
  if (p.grad_weight.numel()) {
    std::vector<acc_t> gw(sum_dz_xc.size());
    for (size_t c = 0; c < gw.size(); ++c) gw[c] = sum_dz_xc[c] * rstd[c];
    p.grad_weight.copy_(to_tensor(gw, p.x));
  }
  if (p.grad_bias.numel()) p.grad_bias.copy_(to_tensor(sum_dz, p.x));
}

}  // namespace cpu
}  // namespace torchnorm
