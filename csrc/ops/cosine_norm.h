// The C++ signatures of the Cosine Normalization ops (cosine_linear,
// cosine_conv2d and their backwards), for C++ that calls them through
// ops::handle<>() (csrc/ops/handle.h). Schemas, and what each op computes,
// are in csrc/registration.cpp; kernels in csrc/{cpu,cuda}/cosine_norm.*
// (with the shared host side in csrc/common/cosine_norm_plan.*); autograd in
// csrc/autograd/cosine_norm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// The gradients every backward returns, in this order.
enum CosineGrad { kCosineInput, kCosineWeight, kCosineBias, kCosineNumGrads };

// cosine_linear(input, weight, bias, eps) -> (out, input_rnorm, weight_rnorm)
struct CosineLinear {
  static constexpr const char* kName = "torchnorm::cosine_linear";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const std::optional<at::Tensor>&, double);
};

// cosine_linear_backward(grad_output, input, weight, bias, output, input_rnorm, weight_rnorm, output_mask)
//   -> (grad_input, grad_weight, grad_bias)
struct CosineLinearBackward {
  static constexpr const char* kName = "torchnorm::cosine_linear_backward";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, std::array<bool, kCosineNumGrads>);
};

// cosine_conv2d(input, weight, bias, stride, padding, dilation, groups, eps) -> (out, input_rnorm, weight_rnorm)
struct CosineConv2d {
  static constexpr const char* kName = "torchnorm::cosine_conv2d";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
      at::IntArrayRef, int64_t, double);
};

// cosine_conv2d_backward(grad_output, input, weight, bias, output, input_rnorm, weight_rnorm, stride, padding,
//                        dilation, groups, output_mask) -> (grad_input, grad_weight, grad_bias)
struct CosineConv2dBackward {
  static constexpr const char* kName = "torchnorm::cosine_conv2d_backward";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
      std::array<bool, kCosineNumGrads>);
};

}  // namespace torchnorm::ops
