#pragma once
// Host-side plans of SyncBatchNorm's per-rank ops (batch_norm_stats,
// batch_norm_gather_stats, batch_norm_backward_elemt), shared by the CPU and
// CUDA implementations: every argument checked before anything is written.
#include <ATen/ATen.h>
#include <array>
#include <optional>
#include <string>

#include "batch_norm_plan.h"

namespace torchnorm {

// batch_norm_stats: the input (with the other tensors of the layer) checked
// as a BatchNorm forward's and brought into the kernel layout; `stats` the
// zeroed float64 (3, C) result.
struct StatsPlan {
  ChannelGeometry g;
  at::Tensor x;
  at::Tensor stats;
};

StatsPlan plan_stats(const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual);

// batch_norm_gather_stats: the (W, 3, C) table of partials, contiguous.
at::Tensor plan_gather_stats(const at::Tensor& stats, const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, double eps);

// batch_norm_backward_elemt: batch_norm_backward's plan with grad_input and
// grad_residual only, and the global means checked like the statistics.
BackwardPlan plan_backward_elemt(const at::Tensor& grad_out, const at::Tensor& input,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& mean_dz, const at::Tensor& mean_dz_xhat, const std::string& activation,
    std::array<bool, 2> output_mask);

}  // namespace torchnorm
