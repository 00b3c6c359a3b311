#pragma once
// Per-channel coefficients of BatchNorm and the pre-activation z with its
// gradient, shared by the CPU and CUDA kernels (the GroupNorm / InstanceNorm
// kernels use them per (sample, channel)). Element-wise the kernels then only
// evaluate
//   forward:  z = (x - mean) * scale + shift [+ residual];   y = act(z)
//   backward: dz = dy * act'(z);
//             dx = dz * dz_coef + (x - mean) * xc_coef + const_coef
// Subtracting the mean before scaling keeps precision when |mean| >> std.
// Also BatchNorm's running-statistics update and the frozen-BatchNorm
// formulas of conv_bn_frozen.
#include "activations.h"
#include "macros.h"

namespace torchnorm {

template <typename acc_t>
struct ForwardCoefficients {
  acc_t scale;  // weight * rstd
  acc_t shift;  // bias
};

template <typename acc_t>
TN_HOST_DEVICE ForwardCoefficients<acc_t> forward_coefficients(acc_t rstd, acc_t weight, acc_t bias) {
  return {weight * rstd, bias};
}

// rstd from a (biased or running) variance.
template <typename acc_t>
TN_HOST_DEVICE acc_t rstd_from_var(acc_t var, acc_t eps) {
  return acc_t(1) / sqrt(var + eps);
}

// The pre-activation z from xc = x - mean and the coefficients; with a
// residual, z = (xc * scale + shift) + residual. The forward and the backward
// (which recomputes z for act'(z) instead of saving it) both take z from
// here, so they round alike and agree on which side of a kink z is. Used by
// the CUDA BatchNorm, GroupNorm and LayerNorm kernels and the CPU scalar
// loops. The CUDA BatchNorm kernels add a residual of 0 when there is none;
// the others add none.
template <typename acc_t>
TN_HOST_DEVICE acc_t pre_activation(acc_t xc, acc_t scale, acc_t shift) {
  return xc * scale + shift;
}

template <typename acc_t>
TN_HOST_DEVICE acc_t pre_activation(acc_t xc, acc_t scale, acc_t shift, acc_t residual) {
  return pre_activation(xc, scale, shift) + residual;
}

// dL/dz from dL/dy: the activation's derivative at the recomputed z (not
// computed at all without an activation).
template <typename acc_t>
TN_HOST_DEVICE acc_t pre_activation_grad(Activation act, acc_t slope, acc_t dy, acc_t xc, acc_t scale, acc_t shift) {
  if (act == Activation::None) return dy;
  return dy * activation_derivative(act, pre_activation(xc, scale, shift), slope);
}

template <typename acc_t>
TN_HOST_DEVICE acc_t pre_activation_grad(Activation act, acc_t slope, acc_t dy, acc_t xc, acc_t scale, acc_t shift,
                                         acc_t residual) {
  if (act == Activation::None) return dy;
  return dy * activation_derivative(act, pre_activation(xc, scale, shift, residual), slope);
}

template <typename acc_t>
struct BackwardCoefficients {
  acc_t dz_coef;     // multiplies dz
  acc_t xc_coef;     // multiplies (x - mean)
  acc_t const_coef;  // added
};

// sum_dz = sum(dz), sum_dz_xc = sum(dz * (x - mean)) over the channel's count
// elements. In training the batch statistics depend on x, which adds the two
// projection terms; in evaluation mean and rstd are constants.
template <typename acc_t>
TN_HOST_DEVICE BackwardCoefficients<acc_t> backward_coefficients(
    bool training, acc_t rstd, acc_t weight, acc_t sum_dz, acc_t sum_dz_xc, acc_t count) {
  const acc_t k = weight * rstd;
  if (!training) return {k, acc_t(0), acc_t(0)};
  const acc_t inv_count = acc_t(1) / count;
  return {k, -k * rstd * rstd * sum_dz_xc * inv_count, -k * sum_dz * inv_count};
}

// dx from dz and xc = x - mean with a column's coefficients (any lane type:
// the CPU sequence kernels pass whole at::vec vectors).
template <typename T>
TN_HOST_DEVICE T input_grad(T dz, T xc, T dz_coef, T xc_coef, T const_coef) {
  return dz * dz_coef + xc * xc_coef + const_coef;
}

// Running statistics exactly as torch.nn.BatchNorm updates them: an
// exponential moving average whose variance term is the unbiased batch
// variance (count / (count - 1)).
template <typename acc_t>
TN_HOST_DEVICE void update_running_stats(
    acc_t& running_mean, acc_t& running_var, acc_t batch_mean, acc_t batch_m2, acc_t count, acc_t momentum) {
  const acc_t unbiased_var = count > acc_t(1) ? batch_m2 / (count - acc_t(1)) : batch_m2;
  running_mean = (acc_t(1) - momentum) * running_mean + momentum * batch_mean;
  running_var = (acc_t(1) - momentum) * running_var + momentum * unbiased_var;
}

// BatchNorm with frozen statistics after a conv (conv_bn_frozen), per output
// channel: out = conv(x, W) * scale + shift with scale = bn_weight * inv_std,
// inv_std = 1 / sqrt(var + eps), shift = (conv_bias - mean) * scale + bn_bias
// (the fold's formula, docs/design.md).
template <typename acc_t>
struct FrozenChannel {
  acc_t scale, shift, inv_std;
};

template <typename acc_t>
TN_HOST_DEVICE FrozenChannel<acc_t> frozen_channel(acc_t var, acc_t eps, acc_t bn_weight, acc_t bn_bias,
                                                   acc_t conv_bias, acc_t mean) {
  const acc_t inv_std = rstd_from_var(var, eps);
  const acc_t scale = forward_coefficients(inv_std, bn_weight, bn_bias).scale;
  return {scale, (conv_bias - mean) * scale + bn_bias, inv_std};
}

// Its parameter gradients from the per-channel sums grad_scale (of the
// output's gradient times conv(x, W)) and grad_shift (of the gradient):
// the conv bias's is grad_shift * scale; the BN weight's is
// (grad_scale + grad_shift * (conv_bias - mean)) * inv_std.
template <typename acc_t>
TN_HOST_DEVICE acc_t frozen_conv_bias_grad(acc_t grad_shift, acc_t scale) {
  return grad_shift * scale;
}

template <typename acc_t>
TN_HOST_DEVICE acc_t frozen_bn_weight_grad(acc_t grad_scale, acc_t grad_shift, acc_t conv_bias, acc_t mean,
                                           acc_t inv_std) {
  return (grad_scale + grad_shift * (conv_bias - mean)) * inv_std;
}

}  // namespace torchnorm
