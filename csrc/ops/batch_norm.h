// The C++ signatures of the BatchNorm ops (batch_norm_train, batch_norm_eval,
// batch_norm_apply, batch_norm_backward), for C++ that calls them through
// ops::handle<>() (csrc/ops/handle.h). Their schemas, and what each op
// computes, are in csrc/registration.cpp; their kernels in
// csrc/{cpu,cuda}/batch_norm.*; their autograd in csrc/autograd/batch_norm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// batch_norm_train(input, weight, bias, running_mean!, running_var!, momentum,
//                  eps, activation, negative_slope, residual) -> (out, mean, rstd)
struct BatchNormTrain {
  static constexpr const char* kName = "torchnorm::batch_norm_train";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double, c10::string_view, double,
      const std::optional<at::Tensor>&);
};

// batch_norm_eval(input, running_mean, running_var, weight, bias, eps,
//                 activation, negative_slope, residual) -> out
struct BatchNormEval {
  static constexpr const char* kName = "torchnorm::batch_norm_eval";
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                               c10::string_view, double, const std::optional<at::Tensor>&);
};

// batch_norm_apply(input, mean, rstd, weight, bias, activation,
//                  negative_slope, residual) -> out
struct BatchNormApply {
  static constexpr const char* kName = "torchnorm::batch_norm_apply";
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view,
                               double, const std::optional<at::Tensor>&);
};

// batch_norm_backward(grad_output, input, weight, bias, residual, mean, rstd,
//                     training, activation, negative_slope, output_mask)
//   -> (grad_input, grad_weight, grad_bias, grad_residual)
struct BatchNormBackward {
  static constexpr const char* kName = "torchnorm::batch_norm_backward";
  // The gradients it returns, which are also the entries of its output_mask.
  enum Grad { kInput, kWeight, kBias, kResidual, kNumGrads };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, bool, c10::string_view, double,
      std::array<bool, kNumGrads>);
};

}  // namespace torchnorm::ops
