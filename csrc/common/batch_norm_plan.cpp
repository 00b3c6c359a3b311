// BatchNorm's host-side plans and argument checks (batch_norm_plan.h).
#include "batch_norm_plan.h"

namespace torchnorm {

// A per-channel tensor must be 1-D of length C, on input's device, in input's
// dtype or (for float16/bfloat16 inputs) float32.
static void check_per_channel(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  check_parameter(op, name, t, input, {input.size(1)}, "the input's channels");
}

void check_batch_norm_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual, bool training,
    double eps) {
  check_supported_input(op, input);
  TORCH_CHECK(input.dim() >= 2 && input.dim() <= 5, op,
              ": expected an input of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(input.size(1) > 0, op, ": expected at least one channel, got input shape ", input.sizes());
  TORCH_CHECK(eps >= 0, op, ": expected eps >= 0, got ", eps);
  if (weight) check_per_channel(op, "weight", *weight, input);
  if (bias) check_per_channel(op, "bias", *bias, input);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  if (running_mean) check_per_channel(op, "running_mean", *running_mean, input);
  if (running_var) check_per_channel(op, "running_var", *running_var, input);
  if (residual) check_like_input(op, "residual", *residual, input);
  if (training) {
    const int64_t per_channel = input.size(0) * spatial_size(input);
    // Same condition and message as torch.nn.functional.batch_norm.
    TORCH_CHECK_VALUE(per_channel != 1, "Expected more than 1 value per channel when training, got input size ",
                      input.sizes());
  }
}

void check_channel_statistic(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& input) {
  const auto acc = accumulate_type(input.scalar_type());
  TORCH_CHECK(stat.dim() == 1 && stat.size(0) == input.size(1) && stat.scalar_type() == acc &&
                  stat.device() == input.device(),
              op, ": expected ", name, " of shape (", input.size(1), ",) and dtype ", acc, " on ", input.device(),
              ", got ", stat.sizes(), ", ", stat.scalar_type(), ", ", stat.device());
}

// Checks of the backward's saved tensors and incoming gradient.
static void check_batch_norm_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& rstd) {
  check_batch_norm_args(op, input, weight, bias, std::nullopt, std::nullopt, residual, false, 0.0);
  TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.scalar_type() == input.scalar_type() &&
                  grad_out.device() == input.device(),
              op, ": expected grad_output like the input (", input.sizes(), ", ", input.scalar_type(), ", ",
              input.device(), "), got ", grad_out.sizes(), ", ", grad_out.scalar_type(), ", ", grad_out.device());
  check_channel_statistic(op, "saved statistics", mean, input);
  check_channel_statistic(op, "saved statistics", rstd, input);
}

ForwardPlan plan_forward(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual, bool training, double eps,
    const std::string& activation) {
  check_batch_norm_args(op, input, weight, bias, running_mean, running_var, residual, training, eps);
  ForwardPlan p;
  p.activation = parse_activation(activation);
  p.x = as_kernel_layout(input, p.g);
  if (residual) p.residual = with_strides_of(*residual, p.x);
  p.out = at::empty_like(p.x);
  return p;
}

ForwardPlan plan_apply(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::string& activation) {
  const char* op = "torchnorm.batch_norm_apply";
  check_batch_norm_args(op, input, weight, bias, std::nullopt, std::nullopt, residual, false, 0.0);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "rstd", rstd, input);
  return plan_forward(op, input, weight, bias, mean, rstd, residual, /*training=*/false, 0.0, activation);
}

BackwardPlan plan_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& mean,
    const at::Tensor& rstd, const std::string& activation, std::array<bool, 4> output_mask) {
  check_batch_norm_backward_args(op, grad_out, input, weight, bias, residual, mean, rstd);
  BackwardPlan p;
  p.activation = parse_activation(activation);
  p.x = as_kernel_layout(input, p.g);
  p.grad_out = with_strides_of(grad_out, p.x);
  if (residual) p.residual = with_strides_of(*residual, p.x);
  const auto none = [&](at::ScalarType t) { return empty_placeholder(input, t); };
  const auto param_type = parameter_type(input, weight);
  p.grad_input = output_mask[0] ? at::empty_like(p.x) : none(input.scalar_type());
  p.grad_weight = output_mask[1] ? at::empty({p.g.C}, input.options().dtype(param_type)) : none(param_type);
  const auto bias_type = bias ? bias->scalar_type() : param_type;
  p.grad_bias = output_mask[2] ? at::empty({p.g.C}, input.options().dtype(bias_type)) : none(bias_type);
  p.grad_residual = output_mask[3] ? at::empty_like(p.x) : none(input.scalar_type());
  return p;
}

}  // namespace torchnorm
