// The C++ signatures of the Streaming Normalization ops (streaming_norm,
// streaming_norm_backward), for C++ that calls them through ops::handle<>()
// (csrc/ops/handle.h). Schemas, and what each op computes, are in
// csrc/registration.cpp; kernels in csrc/{cpu,cuda}/streaming_norm.*;
// autograd in csrc/autograd/streaming_norm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// streaming_norm(input, weight, bias, short_stats!, short_count!, long_stats, long_count, grad_short,
//                grad_short_count, grad_long, grad_long_count, alpha_long, alpha_short, beta_long, beta_short,
//                beta_current, eps) -> (out, mean, rstd, mean_hat, rstd_hat)
struct StreamingNorm {
  static constexpr const char* kName = "torchnorm::streaming_norm";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, double, double, double, double, double, double);
};

// streaming_norm_backward(grad_output, input, weight, mean, rstd, mean_hat, rstd_hat, grad_short!,
//                         grad_short_count!, grad_long, grad_long_count, beta_long, beta_short, beta_current,
//                         output_mask) -> (grad_input, grad_weight, grad_bias)
struct StreamingNormBackward {
  static constexpr const char* kName = "torchnorm::streaming_norm_backward";
  enum Grad { kInput, kWeight, kBias, kNumGrads };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, double, double, double, std::array<bool, kNumGrads>);
};

}  // namespace torchnorm::ops
