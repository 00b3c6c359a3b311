// The C++ signatures of GroupNorm and InstanceNorm (group_norm,
// group_norm_backward, instance_norm; InstanceNorm is GroupNorm with one group
// per channel and shares its backward), for C++ that calls them through
// ops::handle<>() (csrc/ops/handle.h). Their schemas, and what each op
// computes, are in csrc/registration.cpp; their kernels in
// csrc/{cpu,cuda}/group_norm.*; their autograd in csrc/autograd/group_norm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// group_norm(input, num_groups, weight, bias, eps, activation, negative_slope) -> (out, mean, rstd)
struct GroupNorm {
  static constexpr const char* kName = "torchnorm::group_norm";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
      c10::string_view, double);
};

// group_norm_backward(grad_output, input, num_groups, mean, rstd, weight,
//                     bias, activation, negative_slope, output_mask)
//   -> (grad_input, grad_weight, grad_bias)
struct GroupNormBackward {
  static constexpr const char* kName = "torchnorm::group_norm_backward";
  // The gradients it returns, which are also the entries of its output_mask.
  enum Grad { kInput, kWeight, kBias, kNumGrads };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view, double,
      std::array<bool, kNumGrads>);
};

// instance_norm(input, weight, bias, running_mean!, running_var!, momentum, eps) -> (out, mean, rstd)
struct InstanceNorm {
  static constexpr const char* kName = "torchnorm::instance_norm";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double);
};

}  // namespace torchnorm::ops
