#pragma once
// Per-sample norms (LayerNorm, RMSNorm, GroupNorm, InstanceNorm), shared by
// the CPU and CUDA kernels. One normalized set (a row, or a group of one
// sample) of `count` elements has statistics (mean, rstd); RMSNorm is the
// uncentred case, with mean 0 and rstd = 1 / sqrt(mean(x^2) + eps).
// Element-wise the kernels evaluate
//   forward:  z = (x - mean) * rstd * weight + bias;   y = act(z)
//   backward: g = dy * act'(z) * weight;
//             dx = g * rstd + (x - mean) * xc_coef + const_coef
// where the two coefficients come from the set's sums of g and g * (x - mean).
#include "batch_norm_math.h"
#include "macros.h"

namespace torchnorm {

// The gradient of a per-sample norm is the training-mode BatchNorm gradient
// with weight 1 (weights enter through g), minus the mean's term when the
// norm is uncentred (RMSNorm has no mean to differentiate).
template <typename acc_t>
TN_HOST_DEVICE BackwardCoefficients<acc_t> sample_backward_coefficients(bool centred, acc_t rstd, acc_t sum_g,
                                                                        acc_t sum_g_xc, acc_t count) {
  BackwardCoefficients<acc_t> k = backward_coefficients(true, rstd, acc_t(1), sum_g, sum_g_xc, count);
  if (!centred) k.const_coef = acc_t(0);
  return k;
}

}  // namespace torchnorm
