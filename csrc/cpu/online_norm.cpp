// CPU kernels of Online Normalization (online_norm, online_norm_backward).
// Each direction is three steps: the per-(sample, channel) moments over the
// sample's positions, in parallel; the per-channel recurrence over the
// samples (common/online_norm_math.h), a few flops per (sample, channel), in
// parallel over channels; and the element-wise pass, in parallel. The
// published kernel instead walks the data sample by sample, one channel per
// block, and takes the variance as E[x^2] - E[x]^2; here each sample's
// variance is two-pass (exact however large its mean). Input is taken as
// contiguous (N, C, positions): a channels-last input is copied first.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/batch_norm_math.h"
#include "common/input_checks.h"
#include "common/online_norm_math.h"
#include "common/online_norm_plan.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm::cpu {
namespace {

using at::Tensor;

// body(plane, scratch) for each of the N * C planes of `positions` elements,
// in parallel, with staging buffers for float16/bfloat16 planes.
template <typename scalar_t, typename acc_t, typename Body>
void for_each_plane(int64_t planes, int64_t positions, const Body& body) {
  at::parallel_for(0, planes, grain_for(positions), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch = scratch_for<scalar_t, acc_t>(kSegment);
    for (int64_t i = begin; i < end; ++i) body(i, scratch);
  });
}

// y = (x - mean) * scale + shift of n elements into y (acc_t), vectorized:
// the normalized value (scale = rstd, shift = 0) or the module's output
// (scale = rstd * weight, shift = bias).
template <typename acc_t>
void standardize_segment(const acc_t* x, acc_t mean, acc_t scale, acc_t shift, acc_t* y, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vm(mean), vs(scale), vb(shift);
  int64_t p = 0;
  for (; p + Vec::size() <= n; p += Vec::size()) pre_activation(Vec::loadu(x + p) - vm, vs, vb).store(y + p);
  for (; p < n; ++p) y[p] = pre_activation(x[p] - mean, scale, shift);
}

// The state as acc_t values, and back.
template <typename acc_t>
std::vector<acc_t> state_values(const Tensor& state) {
  const Tensor s = state.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return std::vector<acc_t>(s.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>() + s.numel());
}

template <typename acc_t>
void store_state(const std::vector<acc_t>& values, const Tensor& state) {
  const auto options = state.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  state.copy_(at::from_blob(const_cast<acc_t*>(values.data()), {int64_t(values.size())}, options));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> online_norm_cpu(const Tensor& input, const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, const Tensor& mu,
                                                           const Tensor& var, const Tensor& u, const Tensor& v,
                                                           double alpha_fwd, double alpha_bkw, double eps,
                                                           bool layer_scale) {
  check_online_norm("torchnorm.online_norm", input, weight, bias, mu, var, u, v, alpha_fwd, alpha_bkw, eps);
  const Tensor x = input.contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = N * C > 0 ? x.numel() / (N * C) : 0;
  const auto acc_type = accumulate_type(x.scalar_type());
  Tensor out = at::empty_like(x);
  Tensor mean = at::empty({N, C}, x.options().dtype(acc_type)), rstd = at::empty({N, C}, x.options().dtype(acc_type));
  Tensor layer_rstd = at::empty({layer_scale ? N : 0}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "online_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    // 1. Each sample's mean and biased variance per channel: two passes per
    //    L1-sized segment, segments merged with Chan's formula.
    std::vector<acc_t> sample_mean(N * C), sample_var(N * C);
    for_each_plane<scalar_t, acc_t>(N * C, P, [&](int64_t i, Scratch<acc_t>& scratch) {
      const MeanM2<acc_t> moments = range_mean_m2<scalar_t, acc_t>(xd + i * P, P, scratch);
      sample_mean[i] = moments.mean;
      sample_var[i] = moments.m2 / acc_t(P);
    });
    // 2. The recurrence over the samples, channel by channel (with
    //    layer_scale, also each plane's mean square of the affine output).
    std::vector<acc_t> mu_c = state_values<acc_t>(mu), var_c = state_values<acc_t>(var);
    const std::vector<acc_t> w = channel_values<acc_t>(weight, C, acc_t(1));
    const std::vector<acc_t> b = channel_values<acc_t>(bias, C, acc_t(0));
    acc_t* mean_d = mean.mutable_data_ptr<acc_t>();
    acc_t* rstd_d = rstd.mutable_data_ptr<acc_t>();
    std::vector<acc_t> plane_mean_square(layer_scale ? N * C : 0);
    at::parallel_for(0, C, grain_for(N), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t i = n * C + c;
          mean_d[i] = mu_c[c];
          rstd_d[i] = rstd_from_var(var_c[c], acc_t(eps));
          if (layer_scale) {
            plane_mean_square[i] =
                layer_scale_plane_mean_square(sample_mean[i], sample_var[i], mu_c[c], rstd_d[i], w[c], b[c]);
          }
          online_state_update(mu_c[c], var_c[c], sample_mean[i], sample_var[i], acc_t(alpha_fwd));
        }
      }
    });
    // 2b. Layer scaling: each sample's r = 1 / sqrt(mean of out^2 + eps),
    //     channels summed in order.
    std::vector<acc_t> r(N, acc_t(1));
    if (layer_scale) {
      acc_t* lr = layer_rstd.mutable_data_ptr<acc_t>();
      for (int64_t n = 0; n < N; ++n) {
        acc_t sum = 0;
        for (int64_t c = 0; c < C; ++c) sum += plane_mean_square[n * C + c];
        r[n] = lr[n] = rstd_from_var(sum / acc_t(std::max<int64_t>(C, 1)), acc_t(eps));
      }
    }
    // 3. out = ((x - mean) * rstd * weight + bias) * r with each sample's
    //    statistics (r = 1 without layer scaling).
    scalar_t* yd = out.mutable_data_ptr<scalar_t>();
    for_each_plane<scalar_t, acc_t>(N * C, P, [&](int64_t i, Scratch<acc_t>& scratch) {
      const int64_t c = i % C, n = i / C;
      const acc_t scale = layer_scale ? rstd_d[i] * w[c] * r[n] : rstd_d[i] * w[c];
      const acc_t shift = layer_scale ? b[c] * r[n] : b[c];
      for_each_segment(P, [&](int64_t offset, int64_t len) {
        scalar_t* dst = yd + i * P + offset;
        acc_t* y = write_target(dst, scratch.out.data());
        standardize_segment(read_as_acc(xd + i * P + offset, len, scratch.x.data()), mean_d[i], scale, shift, y, len);
        write_back(y, dst, len);
      });
    });
    store_state(mu_c, mu);
    store_state(var_c, var);
  });
  return {out, mean, rstd, layer_rstd};
}

std::tuple<Tensor, Tensor, Tensor> online_norm_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                            const std::optional<Tensor>& weight, const Tensor& mean,
                                                            const Tensor& rstd, const Tensor& u, const Tensor& v,
                                                            double alpha_bkw, std::array<bool, 3> output_mask,
                                                            const std::optional<Tensor>& bias,
                                                            const std::optional<Tensor>& layer_rstd) {
  check_online_norm_backward("torchnorm.online_norm_backward", grad_output, input, weight, mean, rstd, u, v,
                             alpha_bkw, bias, layer_rstd);
  const Tensor x = input.contiguous(), dy = grad_output.contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = N * C > 0 ? x.numel() / (N * C) : 0;
  const auto acc_type = accumulate_type(x.scalar_type());
  Tensor grad_input = at::empty_like(x);
  Tensor grad_weight = at::empty({C}, x.options().dtype(acc_type)), grad_bias = at::empty_like(grad_weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "online_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor mean_acc = mean.to(acc_type).contiguous(), rstd_acc = rstd.to(acc_type).contiguous();
    const acc_t *m = mean_acc.const_data_ptr<acc_t>(), *r = rstd_acc.const_data_ptr<acc_t>();
    const scalar_t *xd = x.const_data_ptr<scalar_t>(), *dyd = dy.const_data_ptr<scalar_t>();
    // 1. Per (sample, channel): the means of dy * y, y^2, dy and y, with y
    //    recomputed from the input as the forward computed it.
    std::vector<acc_t> moments(4 * N * C);
    for_each_plane<scalar_t, acc_t>(N * C, P, [&](int64_t i, Scratch<acc_t>& scratch) {
      acc_t sums[4] = {0, 0, 0, 0};
      thread_local std::vector<acc_t> y_buffer;
      y_buffer.resize(kSegment);
      acc_t* y = y_buffer.data();
      for_each_segment(P, [&](int64_t offset, int64_t n) {
        standardize_segment(read_as_acc(xd + i * P + offset, n, scratch.x.data()), m[i], r[i], acc_t(0), y, n);
        const acc_t* g = read_as_acc(dyd + i * P + offset, n, scratch.dy.data());
        sums[0] += sum_segment<acc_t>(g, y, n);
        sums[1] += sum_segment<acc_t>(y, y, n);
        sums[2] += sum_segment<acc_t>(g, nullptr, n);
        sums[3] += sum_segment<acc_t>(y, nullptr, n);
      });
      for (int k = 0; k < 4; ++k) moments[4 * i + k] = sums[k] / acc_t(P);
    });
    const std::vector<acc_t> w = channel_values<acc_t>(weight, C, acc_t(1));
    // 1b. Layer scaling: dy above was the gradient of the scaled output;
    //     each sample's t (from the means of dy * z over its planes) turns
    //     the means into those of the affine output's gradient dz = r dy - t z.
    std::vector<acc_t> layer_r, layer_t;
    const std::vector<acc_t> b = channel_values<acc_t>(bias, C, acc_t(0));
    if (layer_rstd) {
      layer_r = state_values<acc_t>(*layer_rstd);
      layer_t.resize(N);
      for (int64_t n = 0; n < N; ++n) {
        acc_t sum = 0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = n * C + c;
          sum += layer_scale_plane_grad_dot(moments[4 * i], moments[4 * i + 2], w[c], b[c]);
        }
        layer_t[n] = layer_scale_grad_t(layer_r[n], sum / acc_t(std::max<int64_t>(C, 1)));
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = n * C + c;
          layer_scale_grad_moments(moments[4 * i], moments[4 * i + 2], moments[4 * i + 1], moments[4 * i + 3],
                                   layer_r[n], layer_t[n], w[c], b[c]);
        }
      }
    }
    // 2. The control process over the samples, channel by channel.
    //    The affine map's gradients, sum dy y and sum dy, come from the same
    //    per-sample means.
    std::vector<acc_t> u_c = state_values<acc_t>(u), v_c = state_values<acc_t>(v);
    std::vector<OnlineGradCoefficients<acc_t>> coef(N * C);
    acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
    acc_t* gb = grad_bias.mutable_data_ptr<acc_t>();
    at::parallel_for(0, C, grain_for(N), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        acc_t sum_dy_y = 0, sum_dy = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t i = n * C + c;
          coef[i] = online_backward_step(u_c[c], v_c[c], moments[4 * i], moments[4 * i + 1], moments[4 * i + 2],
                                         moments[4 * i + 3], r[i], w[c], acc_t(alpha_bkw));
          if (layer_rstd) coef[i] = layer_scale_input_grad(coef[i], layer_r[n], layer_t[n], w[c], b[c]);
          sum_dy_y += moments[4 * i];
          sum_dy += moments[4 * i + 2];
        }
        gw[c] = sum_dy_y * acc_t(P);
        gb[c] = sum_dy * acc_t(P);
      }
    });
    // 3. dx = dy * k_dy + y * k_y + k_const, y recomputed as in step 1 (dy
    //    the incoming gradient: with layer scaling the coefficients hold its
    //    derivative's).
    scalar_t* dxd = grad_input.mutable_data_ptr<scalar_t>();
    for_each_plane<scalar_t, acc_t>(N * C, P, [&](int64_t i, Scratch<acc_t>& scratch) {
      using Vec = Vectorized<acc_t>;
      const auto& k = coef[i];
      thread_local std::vector<acc_t> y_buffer;
      y_buffer.resize(kSegment);
      acc_t* y = y_buffer.data();
      for_each_segment(P, [&](int64_t offset, int64_t n) {
        standardize_segment(read_as_acc(xd + i * P + offset, n, scratch.x.data()), m[i], r[i], acc_t(0), y, n);
        const acc_t* g = read_as_acc(dyd + i * P + offset, n, scratch.dy.data());
        scalar_t* dst = dxd + i * P + offset;
        acc_t* dx = write_target(dst, scratch.out.data());
        int64_t p = 0;
        for (; p + Vec::size() <= n; p += Vec::size()) {
          online_input_grad(k, Vec::loadu(g + p), Vec::loadu(y + p)).store(dx + p);
        }
        for (; p < n; ++p) dx[p] = online_input_grad(k, g[p], y[p]);
        write_back(dx, dst, n);
      });
    });
    store_state(u_c, u);
    store_state(v_c, v);
  });
  const auto param_type = parameter_type(input, weight);
  return {output_mask[0] ? grad_input : empty_placeholder(input, input.scalar_type()),
          output_mask[1] ? grad_weight.to(param_type) : empty_placeholder(input, param_type),
          output_mask[2] ? grad_bias.to(param_type) : empty_placeholder(input, param_type)};
}

}  // namespace
}  // namespace torchnorm::cpu

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  m.impl("online_norm", &torchnorm::cpu::online_norm_cpu);
  m.impl("online_norm_backward", &torchnorm::cpu::online_norm_backward_cpu);
}
