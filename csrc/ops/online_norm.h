// The C++ signatures of the Online Normalization ops (online_norm,
// online_norm_backward), for C++ that calls them through ops::handle<>()
// (csrc/ops/handle.h). Schemas, and what each op computes, are in
// csrc/registration.cpp; kernels in csrc/{cpu,cuda}/online_norm.*; autograd
// in csrc/autograd/online_norm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// online_norm(input, weight, bias, mu!, var!, u, v, alpha_fwd, alpha_bkw, eps, layer_scale)
//   -> (out, mean, rstd, layer_rstd)
struct OnlineNorm {
  static constexpr const char* kName = "torchnorm::online_norm";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double, bool);
};

// online_norm_backward(grad_output, input, weight, mean, rstd, u!, v!, alpha_bkw, output_mask, bias, layer_rstd)
//   -> (grad_input, grad_weight, grad_bias)
struct OnlineNormBackward {
  static constexpr const char* kName = "torchnorm::online_norm_backward";
  enum Grad { kInput, kWeight, kBias, kNumGrads };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, double, std::array<bool, kNumGrads>, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&);
};

}  // namespace torchnorm::ops
