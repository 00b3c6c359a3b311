#include "batch_norm_host.h"

#include <vector>

namespace torchnorm {

Activation parse_activation(const std::string& name) {
  if (name == "none" || name.empty()) return Activation::None;
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "silu") return Activation::SiLU;
  TORCH_CHECK_VALUE(false, "torchnorm: activation must be one of 'none', 'relu', 'leaky_relu', 'silu'; got '", name, "'");
}

at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

// True when a and b address the same elements at the same offsets (strides of
// size-1 dimensions do not matter).
static bool same_element_offsets(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

at::Tensor as_kernel_layout(const at::Tensor& input, BatchNormGeometry& g) {
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.S *= input.size(d);
  if (input.is_contiguous()) {
    // With one position per channel a contiguous input is already (rows, C).
    g.layout = g.S == 1 ? Layout::Rowwise : Layout::Planar;
    return input;
  }
  // Channels-last family: (N, *spatial, C) contiguous, at any rank.
  std::vector<int64_t> channels_last_order{0};
  for (int64_t d = 2; d < input.dim(); ++d) channels_last_order.push_back(d);
  channels_last_order.push_back(1);
  if (input.permute(channels_last_order).is_contiguous()) {
    g.layout = Layout::Rowwise;
    return input;
  }
  // Any other stride pattern: one copy into the planar layout.
  g.layout = g.S == 1 ? Layout::Rowwise : Layout::Planar;
  return input.contiguous();
}

at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& like) {
  if (same_element_offsets(t, like)) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

at::Tensor empty_placeholder(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({0}, like.options().dtype(dtype));
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_supported_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(is_supported_float(input.scalar_type()), op,
              ": expected a float32, float64, float16 or bfloat16 input, got ", input.scalar_type());
}

void check_parameter(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                     at::IntArrayRef shape, const char* shape_meaning) {
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, " to match ", shape_meaning,
              ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on ", input.device(),
              " like the input, got it on ", t.device());
  const bool reduced_input = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || (reduced_input && t.scalar_type() == at::kFloat), op,
              ": expected ", name, " of dtype ", input.scalar_type(),
              reduced_input ? " or float32" : "", " to match the input, got ", t.scalar_type());
}

void check_like_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": expected ", name, " of the input's shape ", input.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on ", input.device(),
              " like the input, got it on ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name, " of dtype ",
              input.scalar_type(), " like the input, got ", t.scalar_type());
}

// A per-channel tensor must be 1-D of length C, on input's device, in input's
// dtype or (for float16/bfloat16 inputs) float32.
static void check_per_channel(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  check_parameter(op, name, t, input, {input.size(1)}, "the input's channels");
}

void check_batch_norm_args(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual,
    bool training,
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
    int64_t per_channel = input.size(0);
    for (int64_t d = 2; d < input.dim(); ++d) per_channel *= input.size(d);
    // Same condition and message as torch.nn.functional.batch_norm.
    TORCH_CHECK_VALUE(per_channel != 1, "Expected more than 1 value per channel when training, got input size ",
                      input.sizes());
  }
}

void check_batch_norm_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& mean,
    const at::Tensor& rstd) {
  const char* op = "torchnorm.batch_norm_backward";
  check_batch_norm_args(op, input, weight, bias, std::nullopt, std::nullopt, residual, false, 0.0);
  TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.scalar_type() == input.scalar_type() &&
                  grad_out.device() == input.device(),
              op, ": expected grad_output like the input (", input.sizes(), ", ", input.scalar_type(), ", ",
              input.device(), "), got ", grad_out.sizes(), ", ", grad_out.scalar_type(), ", ", grad_out.device());
  const auto acc = accumulate_type(input.scalar_type());
  for (const auto* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->dim() == 1 && stat->size(0) == input.size(1) && stat->scalar_type() == acc &&
                    stat->device() == input.device(),
                op, ": expected saved statistics of shape (", input.size(1), ",) and dtype ", acc, " on ",
                input.device(), ", got ", stat->sizes(), ", ", stat->scalar_type(), ", ", stat->device());
  }
}

ForwardPlan plan_forward(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual,
    bool training,
    double eps,
    const std::string& activation) {
  check_batch_norm_args(op, input, weight, bias, running_mean, running_var, residual, training, eps);
  ForwardPlan p;
  p.activation = parse_activation(activation);
  p.x = as_kernel_layout(input, p.g);
  if (residual) p.residual = with_strides_of(*residual, p.x);
  p.out = at::empty_like(p.x);
  return p;
}

ForwardPlan plan_apply(
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::string& activation) {
  const char* op = "torchnorm.batch_norm_apply";
  check_batch_norm_args(op, input, weight, bias, std::nullopt, std::nullopt, residual, false, 0.0);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "rstd", rstd, input);
  return plan_forward(op, input, weight, bias, mean, rstd, residual, /*training=*/false, 0.0, activation);
}

at::ScalarType parameter_type(const at::Tensor& input, const std::optional<at::Tensor>& weight) {
  return weight ? weight->scalar_type() : input.scalar_type();
}

BackwardPlan plan_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::string& activation,
    std::array<bool, 4> output_mask) {
  check_batch_norm_backward_args(grad_out, input, weight, bias, residual, mean, rstd);
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
