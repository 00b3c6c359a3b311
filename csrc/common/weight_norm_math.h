#pragma once
// The per-slice math of Weight Normalization (Salimans and Kingma 2016),
// w = g * v / ||v||, shared by the CPU and CUDA kernels. A slice's norm is
// clamped from below by eps, so a zero slice gives w = 0 and finite
// gradients, never 0 / 0 (see docs/weight_norm.md).
#include "macros.h"

namespace torchnorm {

// The forward's factor of one slice: w = v * scale. A NaN norm stays NaN
// (the comparison is false for it), so a NaN in v still shows in w.
template <typename acc_t>
TN_HOST_DEVICE acc_t weight_norm_scale(acc_t g, acc_t norm, acc_t eps) {
  return g / (norm < eps ? eps : norm);
}

// The backward of one slice: grad_v = grad_w * grad_w_coef + v * v_coef and
// grad_g = g_grad.
template <typename acc_t>
struct WeightNormGradCoefs {
  acc_t grad_w_coef, v_coef, g_grad;
};

// With d = sum(grad_w * v) over the slice (norm as the forward saw it,
// unclamped): where norm >= eps, w = g v / norm and
//   grad_g = d / norm,  grad_v = (g / norm) (grad_w - v d / norm^2);
// below eps the forward was w = g v / eps, linear in v:
//   grad_g = d / eps,   grad_v = (g / eps) grad_w.
template <typename acc_t>
TN_HOST_DEVICE WeightNormGradCoefs<acc_t> weight_norm_grad_coefs(acc_t g, acc_t norm, acc_t dot, acc_t eps) {
  if (norm < eps) return {g / eps, acc_t(0), dot / eps};
  const acc_t inv = acc_t(1) / norm;
  // (g / norm) (d / norm) / norm: no product of three large factors.
  return {g * inv, -(g * inv) * (dot * inv) * inv, dot * inv};
}

// grad_v of one element (T: acc_t, or a whole vector of them on the CPU,
// the coefficients then per element or broadcast).
template <typename T>
TN_HOST_DEVICE T weight_norm_grad_v(T grad_w, T v, T grad_w_coef, T v_coef) {
  return grad_w * grad_w_coef + v * v_coef;
}

}  // namespace torchnorm
