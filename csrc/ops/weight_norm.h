// The C++ signatures of the Weight Normalization ops (weight_norm,
// weight_norm_backward), for C++ that calls them through ops::handle<>()
// (csrc/ops/handle.h). Schemas, and what each op computes, are in
// csrc/registration.cpp; kernels in csrc/{cpu,cuda}/weight_norm.*; autograd
// in csrc/autograd/weight_norm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// weight_norm(v, g, dim, eps) -> (w, norms)
struct WeightNorm {
  static constexpr const char* kName = "torchnorm::weight_norm";
  using Signature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, std::optional<int64_t>,
                                                       double);
};

// weight_norm_backward(grad_w, v, g, norms, dim, eps, output_mask) -> (grad_v, grad_g)
struct WeightNormBackward {
  static constexpr const char* kName = "torchnorm::weight_norm_backward";
  enum Grad { kV, kG, kNumGrads };
  using Signature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, std::optional<int64_t>, double,
                                                       std::array<bool, kNumGrads>);
};

}  // namespace torchnorm::ops
