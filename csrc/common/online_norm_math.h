#pragma once
// The per-channel recurrences of Online Normalization (Chiley et al. 2019),
// shared by the CPU and CUDA kernels. Both directions are linear recurrences
// over the samples, given per-sample moments that a parallel pass computes
// first, so the sequential part is a few flops per (sample, channel), not a
// walk over the data.
#include "macros.h"

namespace torchnorm {

// The state after one sample of mean m and biased variance s2 (over its
// positions): var <- a var + (1 - a) s2 + a (1 - a) (m - mu)^2, then
// mu <- mu + (1 - a) (m - mu). This is the exact mean and variance of the
// exponentially weighted mixture of the running distribution and the sample.
template <typename acc_t>
TN_HOST_DEVICE void online_state_update(acc_t& mu, acc_t& var, acc_t m, acc_t s2, acc_t alpha_fwd) {
  const acc_t d = m - mu;
  var = alpha_fwd * var + (acc_t(1) - alpha_fwd) * s2 + alpha_fwd * (acc_t(1) - alpha_fwd) * d * d;
  mu = mu + (acc_t(1) - alpha_fwd) * d;
}

// dx = dy * k_dy + y * k_y + k_const for every position of one (sample,
// channel).
template <typename acc_t>
struct OnlineGradCoefficients {
  acc_t dy, y, constant;
};

// One sample of the backward's control process, on the gradient of the
// normalized output, weight * dy (the affine map after it is fused). With
// a = 1 - a_b and the sample's means over its positions of dy y, y^2, dy and
// y (y the normalized output, dy the incoming gradient):
//   g = weight dy - a v y;  v += mean(g y);  g = g * rstd;  dx = g - a u;  u += mean(dx)
// Returns dx's coefficients (from u and v before this sample) and updates u, v.
template <typename acc_t>
TN_HOST_DEVICE OnlineGradCoefficients<acc_t> online_backward_step(acc_t& u, acc_t& v, acc_t mean_dy_y,
                                                                  acc_t mean_y2, acc_t mean_dy, acc_t mean_y,
                                                                  acc_t rstd, acc_t weight, acc_t alpha_bkw) {
  const acc_t a = acc_t(1) - alpha_bkw;
  const OnlineGradCoefficients<acc_t> k{rstd * weight, -rstd * a * v, -a * u};
  v = v + (weight * mean_dy_y - a * v * mean_y2);
  u = u + (k.dy * mean_dy + k.y * mean_y + k.constant);
  return k;
}

// T: acc_t, or a whole vector of them on the CPU.
template <typename T, typename acc_t>
TN_HOST_DEVICE T online_input_grad(const OnlineGradCoefficients<acc_t>& k, T dy, T y) {
  return dy * T(k.dy) + y * T(k.y) + T(k.constant);
}

}  // namespace torchnorm
