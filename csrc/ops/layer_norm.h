// The C++ signatures of the per-row norms (layer_norm, rms_norm and their
// shared layer_norm_backward), for C++ that calls them through
// ops::handle<>() (csrc/ops/handle.h). Their schemas, and what each op
// computes, are in csrc/registration.cpp; their kernels in
// csrc/{cpu,cuda}/layer_norm.*; their autograd in csrc/autograd/layer_norm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// layer_norm(input, normalized_shape, weight, bias, eps, residual) -> (out, sum, mean, rstd)
struct LayerNorm {
  static constexpr const char* kName = "torchnorm::layer_norm";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
      const std::optional<at::Tensor>&);
};

// rms_norm(input, normalized_shape, weight, eps, residual) -> (out, sum, rstd)
struct RmsNorm {
  static constexpr const char* kName = "torchnorm::rms_norm";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&, std::optional<double>,
      const std::optional<at::Tensor>&);
};

// layer_norm_backward(grad_output, grad_sum, input, normalized_shape, mean,
//                     rstd, weight, output_mask) -> (grad_input, grad_weight, grad_bias)
// Serves rms_norm too (mean None).
struct LayerNormBackward {
  static constexpr const char* kName = "torchnorm::layer_norm_backward";
  // The gradients it returns, which are also the entries of its output_mask.
  enum Grad { kInput, kWeight, kBias, kNumGrads };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, at::IntArrayRef,
      const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
      std::array<bool, kNumGrads>);
};

}  // namespace torchnorm::ops
