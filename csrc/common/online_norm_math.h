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

// Layer scaling (the paper's error compensation "ls"), fused into the ops:
// per sample n, out = z * r_n with z = weight * y + bias the affine output and
// r_n = 1 / sqrt(mean over the sample's channels and positions of z^2 + eps).
// No pass of its own: both directions get what it needs from the
// per-(sample, channel) moments they compute anyway.

// Plane (n, c)'s mean of z^2 from the sample's mean m and biased variance s2
// over the plane, normalized with mu and rstd: with k = weight * rstd, z has
// variance k^2 s2 and mean k (m - mu) + bias, and its mean square is their
// sum of squares (no cancellation). The sample's r_n is
// rstd_from_var(mean over c of these, eps).
template <typename acc_t>
TN_HOST_DEVICE acc_t layer_scale_plane_mean_square(acc_t m, acc_t s2, acc_t mu, acc_t rstd, acc_t weight,
                                                   acc_t bias) {
  const acc_t k = weight * rstd;
  const acc_t centre = k * (m - mu) + bias;
  return k * k * s2 + centre * centre;
}

// ls's backward, the derivative of out = z * r_n: dz = r dout - t z with
// t = r^3 mean(dout z) over the sample. Plane (n, c)'s mean of dout * z from
// the backward's plane means of dout * y and dout: weight E[dout y] + bias
// E[dout]; t is layer_scale_grad_t(r, mean over c of these).
template <typename acc_t>
TN_HOST_DEVICE acc_t layer_scale_plane_grad_dot(acc_t mean_dy_y, acc_t mean_dy, acc_t weight, acc_t bias) {
  return weight * mean_dy_y + bias * mean_dy;
}

template <typename acc_t>
TN_HOST_DEVICE acc_t layer_scale_grad_t(acc_t r, acc_t mean_dy_z) {
  return r * r * r * mean_dy_z;
}

// The plane means of dz * y and dz (dz = r dout - t (weight y + bias)), the
// control process's inputs, from those of dout * y and dout (replaced in
// place) and the plane's means of y^2 and y.
template <typename acc_t>
TN_HOST_DEVICE void layer_scale_grad_moments(acc_t& mean_dy_y, acc_t& mean_dy, acc_t mean_y2, acc_t mean_y, acc_t r,
                                             acc_t t, acc_t weight, acc_t bias) {
  mean_dy_y = r * mean_dy_y - t * (weight * mean_y2 + bias * mean_y);
  mean_dy = r * mean_dy - t * (weight * mean_y + bias);
}

// dx's coefficients on dout instead of dz: dx = dz k.dy + y k.y + k.constant
// with dz = r dout - t (weight y + bias).
template <typename acc_t>
TN_HOST_DEVICE OnlineGradCoefficients<acc_t> layer_scale_input_grad(const OnlineGradCoefficients<acc_t>& k, acc_t r,
                                                                    acc_t t, acc_t weight, acc_t bias) {
  return {k.dy * r, k.y - t * weight * k.dy, k.constant - t * bias * k.dy};
}

}  // namespace torchnorm
