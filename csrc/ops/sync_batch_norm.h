// The C++ signatures of SyncBatchNorm's per-rank ops (batch_norm_stats,
// batch_norm_gather_stats, batch_norm_backward_elemt), for C++ that calls
// them through ops::handle<>() (csrc/ops/handle.h). Their schemas, and what
// each op computes, are in csrc/registration.cpp; their kernels in
// csrc/cpu/sync_batch_norm.cpp and csrc/cuda/batch_norm.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// batch_norm_stats(input, weight, bias, running_mean, running_var, residual)
//   -> (3, C) [count; mean; M2]
struct BatchNormStats {
  static constexpr const char* kName = "torchnorm::batch_norm_stats";
  using Signature = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&);
};

// batch_norm_gather_stats(stats, running_mean!, running_var!, momentum, eps)
//   -> (mean, rstd, count)
struct BatchNormGatherStats {
  static constexpr const char* kName = "torchnorm::batch_norm_gather_stats";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double);
};

// batch_norm_backward_elemt(grad_output, input, weight, bias, residual, mean,
//   rstd, mean_dz, mean_dz_xhat, activation, negative_slope, output_mask)
//   -> (grad_input, grad_residual)
struct BatchNormBackwardElemt {
  static constexpr const char* kName = "torchnorm::batch_norm_backward_elemt";
  using Signature = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      c10::string_view, double, std::array<bool, 2>);
};

}  // namespace torchnorm::ops
