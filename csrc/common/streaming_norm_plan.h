#pragma once
// Host-side checks of the Streaming Normalization ops, shared by the CPU and
// CUDA entry points, on top of BatchNorm's plans (batch_norm_plan.h), whose
// passes the kernels share: every argument is checked before anything is
// written, so a bad call leaves the state untouched.
#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "batch_norm_plan.h"

namespace torchnorm {

// streaming_norm: the input as BatchNorm's ((N, C, *) of 2 to 5 dims) with at
// least one value per channel (one is allowed: its std is sqrt(eps)); weight
// and bias (C,); the history short_stats (2, C) with short_count (), written
// in place, and long_stats (2, C) with long_count (): float32 or float64 on
// the input's device, the written ones without internal overlap; the
// gradient histories (which the backward takes) the same way; eps > 0.
ForwardPlan plan_streaming_norm(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& short_stats,
                                const at::Tensor& short_count, const at::Tensor& long_stats,
                                const at::Tensor& long_count, const at::Tensor& grad_short,
                                const at::Tensor& grad_short_count, const at::Tensor& grad_long,
                                const at::Tensor& grad_long_count, double eps);

// streaming_norm_backward: grad_output like the input; mean, rstd, mean_hat,
// rstd_hat (C,) in the accumulation dtype; the gradient histories as the
// forward's histories. output_mask: grad_input, grad_weight, grad_bias.
BackwardPlan plan_streaming_norm_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                          const at::Tensor& rstd, const at::Tensor& mean_hat,
                                          const at::Tensor& rstd_hat, const at::Tensor& grad_short,
                                          const at::Tensor& grad_short_count, const at::Tensor& grad_long,
                                          const at::Tensor& grad_long_count, std::array<bool, 3> output_mask);

}  // namespace torchnorm
