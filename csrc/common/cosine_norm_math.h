#pragma once
// Per-element math of Cosine Normalization (Luo et al. 2017, arXiv
// 1702.05870), shared by the CPU and CUDA kernels (csrc/{cpu,cuda}/
// cosine_norm.*). With the dot product d = w . x + b of an output unit
// (ATen's matmul or convolution), the kernels evaluate
//   forward:  y = d * rw[o] * rx[patch],  rx = 1 / sqrt(|x_patch|^2 + c + eps),
//                                          rw = 1 / sqrt(|w_o|^2 + b_o^2 + eps)
//   backward: gd = dy * rw * rx                      (to ATen's dot backward)
//             q[patch] = rx^2 * sum over the group's outputs of dy * y
//             t[o]     = rw^2 * sum over samples and positions of dy * y
//             dx      -= x * (sum of q over the patches that cover x)
//             dw      -= w * t[o],   db = sum(gd) - b * t[o]
// (c = 1 with a bias: the bias is the weight of a constant input 1 in every
// patch.) docs/cosine_norm.md derives them.
#include <cstdint>

#include "macros.h"

namespace torchnorm {

// 1 / sqrt(sum_of_squares + eps): the reciprocal of a norm with eps inside
// the square root, so an all-zero patch (or weight row) has the finite
// 1 / sqrt(eps) and gives y = 0, not 0 / 0.
template <typename acc_t>
TN_HOST_DEVICE acc_t cosine_rnorm(acc_t sum_of_squares, acc_t eps) {
  return acc_t(1) / sqrt(sum_of_squares + eps);
}

// The forward's output, and gd of the backward: value * rw * rx. (T: acc_t,
// or a whole vector of them on the CPU.)
template <typename T>
TN_HOST_DEVICE T cosine_scale(T value, T rw, T rx) {
  return value * (rw * rx);
}

// The coefficient of a norm's gradient term: for rx (per patch) q = rx^2 *
// sum(dy * y) over the outputs that patch's norm divides; for rw (per output
// unit) t = rw^2 * sum(dy * y) over its outputs. Then d/dv of the loss gets
// -v * coefficient for each v inside that norm.
template <typename acc_t>
TN_HOST_DEVICE acc_t cosine_norm_grad_coefficient(acc_t rnorm, acc_t sum_dy_y) {
  return rnorm * rnorm * sum_dy_y;
}

// One dimension of a convolution window: output index o's tap i reads input
// index o * stride - padding + i * dilation (outside [0, in): zero padding).
struct Window1d {
  int64_t size = 1, stride = 1, padding = 0, dilation = 1;
  int64_t in = 1, out = 1;  // input and output lengths

  TN_HOST_DEVICE int64_t tap(int64_t o, int64_t i) const { return o * stride - padding + i * dilation; }

  // The output index whose tap i reads input index x, or -1 when none does
  // (the window's transpose, for gathering the norm's gradient on the GPU).
  TN_HOST_DEVICE int64_t source(int64_t x, int64_t i) const {
    const int64_t num = x + padding - i * dilation;
    if (num < 0 || num % stride != 0) return -1;
    const int64_t o = num / stride;
    return o < out ? o : -1;
  }
};

}  // namespace torchnorm
