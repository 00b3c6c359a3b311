#pragma once
// BatchNorm's host-side plans, shared by the CPU and CUDA implementations:
// every argument checked before anything is written, input and residual
// brought into the kernel layout (layout.h), outputs allocated.
#include <ATen/ATen.h>
#include <array>
#include <optional>
#include <string>

#include "activations.h"
#include "input_checks.h"
#include "layout.h"

namespace torchnorm {

// Checks every argument of a BatchNorm forward; throws a clear error naming
// the argument on the first problem. (Also used by SyncBatchNorm's per-rank
// ops, csrc/common/sync_batch_norm_plan.cpp.)
void check_batch_norm_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual, bool training,
    double eps);

// Everything a backend needs to run a forward, prepared once for CPU and CUDA:
// arguments checked, input/residual in the kernel layout, outputs allocated.
struct ForwardPlan {
  ChannelGeometry g;
  at::Tensor x;         // input in the kernel layout
  at::Tensor residual;  // undefined, or residual with x's strides
  at::Tensor out;       // like x
  Activation activation = Activation::None;
};

ForwardPlan plan_forward(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual, bool training, double eps,
    const std::string& activation);

// plan_forward for batch_norm_apply: checks mean and rstd under their own
// names (per channel, like running statistics).
ForwardPlan plan_apply(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::string& activation);

struct BackwardPlan {
  ChannelGeometry g;
  at::Tensor x, grad_out, residual;  // grad_out and residual with x's strides
  // Each is allocated when its output_mask entry is set, else empty of shape (0,).
  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;
  Activation activation = Activation::None;
};

BackwardPlan plan_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& mean,
    const at::Tensor& rstd, const std::string& activation, std::array<bool, 4> output_mask);

// A per-channel statistic (saved mean / rstd, or another (C,) vector in the
// accumulation dtype) of a BatchNorm input: shape (C,), dtype
// accumulate_type(input), input's device.
void check_channel_statistic(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& input);

}  // namespace torchnorm
