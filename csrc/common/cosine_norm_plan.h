#pragma once
// Host side of the Cosine Normalization ops (cosine_linear, cosine_conv2d and
// their backwards), shared by the CPU and CUDA registrations: the argument
// checks (all before anything is computed), the geometry, and the one
// forward and one backward that both ops and both backends run
// (cosine_norm_plan.cpp). The dot
// product and its gradients are ATen's (at::linear / at::mm,
// at::convolution / at::convolution_backward); everything else goes through
// the backend's CosineKernels: the norms (a windowed sum of squares for a
// convolution), the output pass, the gradient sums and the norms' gradient
// terms. The per-element math is in cosine_norm_math.h.
//
// A linear layer is the convolution geometry with an (M, I, 1, 1) input, a
// 1 x 1 window and one group, so the drivers and kernels see one shape:
// input (N, C, H, W), output (N, O, Ho, Wo), rx (N, G, Ho, Wo), rw (O,).
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/cosine_norm_math.h"

namespace torchnorm {

struct CosineGeometry {
  int64_t N = 0, C = 0, H = 1, W = 1;  // input
  int64_t O = 0, G = 1;                // output channels, groups
  Window1d rows, cols;                 // along H (rows.out = Ho) and W (cols.out = Wo)
  int64_t Ho() const { return rows.out; }
  int64_t Wo() const { return cols.out; }
  int64_t P() const { return rows.out * cols.out; }  // output positions per (sample, channel)
  int64_t HW() const { return H * W; }               // input positions per (sample, channel)
  int64_t Cg() const { return C / G; }               // input channels per group
  int64_t Og() const { return O / G; }               // output channels per group
  int64_t K() const { return Cg() * rows.size * cols.size; }  // weights per output channel
};

// What a backend provides. Tensors are contiguous; rx, rw, q, t and sum_gd
// are in the accumulation dtype (float32; float64 for float64 input).
struct CosineKernels {
  // rw[o] = cosine_rnorm(sum_k w[o, k]^2 + bias[o]^2, eps); w is (O, K).
  void (*weight_rnorm)(const at::Tensor& w, const std::optional<at::Tensor>& bias, double eps, const at::Tensor& rw);
  // The forward's pass after the dot product: rx[n, g, ho, wo] =
  // cosine_rnorm(sum of x^2 over the group's channels and the window at
  // (ho, wo) + constant, eps), and, in place on y (the dot product),
  // y[n, o, p] = cosine_scale(y[n, o, p], rw[o], rx[n, o / Og, p]).
  void (*normalize)(const at::Tensor& x, const at::Tensor& rw, const CosineGeometry& geo, double constant,
                    double eps, const at::Tensor& rx, const at::Tensor& y);
  // gd = dy * rw[o] * rx[n, g, p]; q[n, g, p] = rx^2 * sum over the group's o of dy * y;
  // t[o] = rw^2 * sum over n, p of dy * y; sum_gd[o] = sum over n, p of gd.
  void (*grad_sums)(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& rw, const at::Tensor& rx,
                    const CosineGeometry& geo, const at::Tensor& gd, const at::Tensor& q, const at::Tensor& t,
                    const at::Tensor& sum_gd);
  // grad_x[n, c, h, w] -= x[n, c, h, w] * (sum of q[n, g(c)] over the output
  // positions whose window covers (h, w)), in place.
  void (*input_norm_grad)(const at::Tensor& grad_x, const at::Tensor& x, const at::Tensor& q,
                          const CosineGeometry& geo);
  // grad_w[o, k] -= w[o, k] * t[o] in place (when grad_w is defined);
  // grad_b[o] = sum_gd[o] - bias[o] * t[o] (when grad_b is defined).
  void (*weight_norm_grad)(const at::Tensor& grad_w, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           const at::Tensor& t, const at::Tensor& sum_gd, const at::Tensor& grad_b);
};

// The ops, given a backend's kernels: each checks its arguments first (a
// clear error naming the op and the argument), then runs ATen's dot product
// and the kernels. Schemas and what they return: csrc/registration.cpp.
using CosineResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
CosineResult cosine_linear(const CosineKernels& kernels, const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, double eps);
CosineResult cosine_linear_backward(const CosineKernels& kernels, const at::Tensor& grad_output,
                                    const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& output,
                                    const at::Tensor& input_rnorm, const at::Tensor& weight_rnorm,
                                    std::array<bool, 3> output_mask);
CosineResult cosine_conv2d(const CosineKernels& kernels, const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, double eps);
CosineResult cosine_conv2d_backward(const CosineKernels& kernels, const at::Tensor& grad_output,
                                    const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& output,
                                    const at::Tensor& input_rnorm, const at::Tensor& weight_rnorm,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, std::array<bool, 3> output_mask);

// The four ops of one backend, as functions of the schemas' signatures for
// its TORCH_LIBRARY_IMPL: m.impl("cosine_linear", &CosineOps<kKernels>::linear).
template <const CosineKernels& kKernels>
struct CosineOps {
  static CosineResult linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             double eps) {
    return cosine_linear(kKernels, input, weight, bias, eps);
  }
  static CosineResult linear_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& output,
                                      const at::Tensor& input_rnorm, const at::Tensor& weight_rnorm,
                                      std::array<bool, 3> output_mask) {
    return cosine_linear_backward(kKernels, grad_output, input, weight, bias, output, input_rnorm, weight_rnorm,
                                  output_mask);
  }
  static CosineResult conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             double eps) {
    return cosine_conv2d(kKernels, input, weight, bias, stride, padding, dilation, groups, eps);
  }
  static CosineResult conv2d_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& output,
                                      const at::Tensor& input_rnorm, const at::Tensor& weight_rnorm,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, std::array<bool, 3> output_mask) {
    return cosine_conv2d_backward(kKernels, grad_output, input, weight, bias, output, input_rnorm, weight_rnorm,
                                  stride, padding, dilation, groups, output_mask);
  }
};

}  // namespace torchnorm
