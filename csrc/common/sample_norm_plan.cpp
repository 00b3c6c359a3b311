// Host-side plans and argument checks of the per-sample norms: LayerNorm,
// RMSNorm, GroupNorm, InstanceNorm (sample_norm_plan.h).
#include "sample_norm_plan.h"

#include <limits>
#include <vector>

namespace torchnorm {

namespace {

// The saved statistics of a row norm: one value per row, shaped as
// aten.native_layer_norm shapes them (leading dims, then ones).
std::vector<int64_t> row_stats_shape(const at::Tensor& input, int64_t normalized_dims) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - normalized_dims);
  shape.resize(input.dim(), 1);
  return shape;
}


void check_normalized_shape(const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape) {
  const int64_t k = normalized_shape.size();
  TORCH_CHECK(k >= 1, op, ": expected normalized_shape with at least one dimension, got ", normalized_shape);
  TORCH_CHECK(input.dim() >= k && input.sizes().slice(input.dim() - k) == normalized_shape, op,
              ": normalized_shape ", normalized_shape, " must match the trailing dimensions of the input, got input shape ",
              input.sizes());
}

// Checks the saved statistics handed to a backward.
void check_stats(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& input,
                 int64_t count) {
  const auto acc = accumulate_type(input.scalar_type());
  TORCH_CHECK(stat.numel() == count && stat.scalar_type() == acc && stat.device() == input.device(), op,
              ": expected saved ", name, " of ", count, " values of dtype ", acc, " on ", input.device(),
              ", got shape ", stat.sizes(), ", ", stat.scalar_type(), ", ", stat.device());
}

}  // namespace

double rms_norm_eps(const at::Tensor& input, std::optional<double> eps) {
  if (eps) return *eps;
  return input.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                            : std::numeric_limits<float>::epsilon();
}

RowNormPlan plan_row_norm(const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, double eps, bool rms) {
  check_supported_input(op, input);
  check_normalized_shape(op, input, normalized_shape);
  TORCH_CHECK(eps >= 0, op, ": expected eps >= 0, got ", eps);
  if (weight) check_parameter(op, "weight", *weight, input, normalized_shape, "normalized_shape");
  if (bias) check_parameter(op, "bias", *bias, input, normalized_shape, "normalized_shape");
  if (residual) check_like_input(op, "residual", *residual, input);
  RowNormPlan p;
  p.rms = rms;
  p.D = c10::multiply_integers(normalized_shape);
  p.M = p.D == 0 ? 0 : input.numel() / p.D;
  p.x = input.contiguous();
  if (residual) p.residual = residual->contiguous();
  if (weight) p.weight = weight->contiguous().view({-1});
  if (bias) p.bias = bias->contiguous().view({-1});
  p.out = at::empty_like(p.x, at::MemoryFormat::Contiguous);
  p.sum = residual ? at::empty_like(p.x, at::MemoryFormat::Contiguous) : empty_placeholder(input, input.scalar_type());
  const auto acc = accumulate_type(input.scalar_type());
  const auto stats_shape = row_stats_shape(input, normalized_shape.size());
  p.rstd = at::empty(stats_shape, input.options().dtype(acc));
  p.mean = rms ? empty_placeholder(input, acc) : at::empty(stats_shape, input.options().dtype(acc));
  return p;
}

RowNormBackwardPlan plan_row_norm_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum,
                                           const at::Tensor& input, at::IntArrayRef normalized_shape,
                                           const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                           const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask) {
  const char* op = "torchnorm.layer_norm_backward";
  check_supported_input(op, input);
  check_normalized_shape(op, input, normalized_shape);
  check_like_input(op, "grad_output", grad_out, input);
  if (grad_sum) check_like_input(op, "grad_sum", *grad_sum, input);
  if (weight) check_parameter(op, "weight", *weight, input, normalized_shape, "normalized_shape");
  RowNormBackwardPlan p;
  p.D = c10::multiply_integers(normalized_shape);
  p.M = p.D == 0 ? 0 : input.numel() / p.D;
  p.rms = !mean.has_value();
  if (mean) check_stats(op, "mean", *mean, input, p.M);
  check_stats(op, "rstd", rstd, input, p.M);
  p.x = input.contiguous();
  p.grad_out = grad_out.contiguous();
  if (grad_sum) p.grad_sum = grad_sum->contiguous();
  if (mean) p.mean = mean->contiguous();
  p.rstd = rstd.contiguous();
  if (weight) p.weight = weight->contiguous().view({-1});
  const auto param_type = parameter_type(input, weight);
  p.grad_input = output_mask[0] ? at::empty_like(p.x, at::MemoryFormat::Contiguous)
                                : empty_placeholder(input, input.scalar_type());
  p.grad_weight = output_mask[1] ? at::empty(normalized_shape, input.options().dtype(param_type))
                                 : empty_placeholder(input, param_type);
  p.grad_bias = output_mask[2] ? at::empty(normalized_shape, input.options().dtype(param_type))
                               : empty_placeholder(input, param_type);
  return p;
}

namespace {

void check_groups(const char* op, const at::Tensor& input, int64_t num_groups) {
  TORCH_CHECK(input.dim() >= 2, op, ": expected an input of shape (N, C, *), got shape ", input.sizes());
  const int64_t C = input.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, op, ": expected num_groups to divide the number of channels (",
              C, "), got num_groups=", num_groups);
}

GroupNormGeometry group_geometry(const at::Tensor& input, int64_t num_groups, at::Tensor& x) {
  ChannelGeometry bg;
  x = as_kernel_layout(input, bg);
  GroupNormGeometry g;
  g.N = bg.N;
  g.C = bg.C;
  g.S = bg.S;
  g.G = num_groups;
  // A contiguous input is planar even where BatchNorm would call it rowwise
  // (one position per channel): a group is then one contiguous run.
  g.layout = x.is_contiguous() ? Layout::Planar : bg.layout;
  return g;
}

}  // namespace

// The plan of both group_norm and instance_norm (which allows what
// group_norm refuses below, as torch's does).
static GroupNormPlan plan_groups(const char* op, const at::Tensor& input, int64_t num_groups,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 double eps, const std::string& activation, bool want_var) {
  check_supported_input(op, input);
  check_groups(op, input, num_groups);
  TORCH_CHECK(eps >= 0, op, ": expected eps >= 0, got ", eps);
  if (weight) check_parameter(op, "weight", *weight, input, {input.size(1)}, "the input's channels");
  if (bias) check_parameter(op, "bias", *bias, input, {input.size(1)}, "the input's channels");
  GroupNormPlan p;
  p.activation = parse_activation(activation);
  p.g = group_geometry(input, num_groups, p.x);
  if (weight) p.weight = weight->contiguous();
  if (bias) p.bias = bias->contiguous();
  p.out = at::empty_like(p.x);
  const auto stats_options = input.options().dtype(accumulate_type(input.scalar_type()));
  p.mean = at::empty({p.g.N, p.g.G}, stats_options);
  p.rstd = at::empty({p.g.N, p.g.G}, stats_options);
  if (want_var) p.var = at::empty({p.g.N, p.g.G}, stats_options);
  return p;
}

GroupNormPlan plan_group_norm(const char* op, const at::Tensor& input, int64_t num_groups,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              double eps, const std::string& activation, bool want_var) {
  // torch.nn.functional.group_norm refuses these (an empty batch is fine).
  TORCH_CHECK(input.dim() < 2 || input.size(1) > 0, op, ": expected the number of channels to be greater than 0, got ",
              input.sizes());
  const int64_t spatial = spatial_size(input);
  TORCH_CHECK(spatial > 0, op, ": expected the spatial size (H x W ...) to be greater than 0, got input size ",
              input.sizes());
  return plan_groups(op, input, num_groups, weight, bias, eps, activation, want_var);
}

GroupNormPlan plan_instance_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, double eps) {
  const char* op = "torchnorm.instance_norm";
  TORCH_CHECK(input.dim() >= 3, op, ": expected an input of shape (N, C, L), (N, C, H, W) or (N, C, D, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  for (const auto& [name, t] : {std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
    if (*t) check_parameter(op, name, **t, input, {input.size(1)}, "the input's channels");
  }
  const int64_t spatial = spatial_size(input);
  // Same condition and message as torch.nn.functional.instance_norm.
  TORCH_CHECK_VALUE(spatial != 1, "Expected more than 1 spatial element when training, got input size ",
                    input.sizes());
  return plan_groups(op, input, std::max<int64_t>(input.size(1), 1), weight, bias, eps, "none",
                     running_mean.has_value());
}

void update_instance_running_stats(const GroupNormPlan& p, const std::optional<at::Tensor>& running_mean,
                                   const std::optional<at::Tensor>& running_var, double momentum) {
  if (!running_mean || p.g.N == 0) return;
  const double count = static_cast<double>(p.g.S);
  const double unbiased = count > 1 ? count / (count - 1) : 1.0;
  const auto batch_mean = p.mean.mean(0);
  const auto batch_var = p.var.mean(0).mul_(unbiased);
  running_mean->mul_(1 - momentum).add_(batch_mean.to(running_mean->scalar_type()), momentum);
  running_var->mul_(1 - momentum).add_(batch_var.to(running_var->scalar_type()), momentum);
}

GroupNormBackwardPlan plan_group_norm_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                               int64_t num_groups, const at::Tensor& mean, const at::Tensor& rstd,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias, const std::string& activation,
                                               std::array<bool, 3> output_mask) {
  const char* op = "torchnorm.group_norm_backward";
  check_supported_input(op, input);
  check_groups(op, input, num_groups);
  check_like_input(op, "grad_output", grad_out, input);
  if (weight) check_parameter(op, "weight", *weight, input, {input.size(1)}, "the input's channels");
  if (bias) check_parameter(op, "bias", *bias, input, {input.size(1)}, "the input's channels");
  GroupNormBackwardPlan p;
  p.activation = parse_activation(activation);
  p.g = group_geometry(input, num_groups, p.x);
  check_stats(op, "mean", mean, input, p.g.N * p.g.G);
  check_stats(op, "rstd", rstd, input, p.g.N * p.g.G);
  p.grad_out = with_strides_of(grad_out, p.x);
  p.mean = mean.contiguous();
  p.rstd = rstd.contiguous();
  if (weight) p.weight = weight->contiguous();
  if (bias) p.bias = bias->contiguous();
  const auto param_type = parameter_type(input, weight);
  const auto bias_type = bias ? bias->scalar_type() : param_type;
  p.grad_input = output_mask[0] ? at::empty_like(p.x) : empty_placeholder(input, input.scalar_type());
  p.grad_weight = output_mask[1] ? at::empty({p.g.C}, input.options().dtype(param_type))
                                 : empty_placeholder(input, param_type);
  p.grad_bias = output_mask[2] ? at::empty({p.g.C}, input.options().dtype(bias_type))
                               : empty_placeholder(input, bias_type);
  return p;
}

}  // namespace torchnorm
