#include "common/sequence_norm_plan.h"

#include <c10/util/Exception.h>

#include "common/input_checks.h"

namespace torchnorm {

void check_valid_rows(const char* op, const std::optional<at::Tensor>& valid, const at::Tensor& input, int64_t rows) {
  if (!valid) return;
  TORCH_CHECK(valid->scalar_type() == at::kBool, op, ": expected valid to be a bool tensor, got ",
              valid->scalar_type());
  TORCH_CHECK(valid->dim() == 1 && valid->size(0) == rows, op, ": expected valid of shape (", rows,
              ",), one entry per row, got ", valid->sizes());
  TORCH_CHECK(valid->device() == input.device(), op, ": expected valid on ", input.device(),
              " like the input, got it on ", valid->device());
}

void check_running_stats(const char* op, const char* name, const std::optional<at::Tensor>& running_mean,
                         const std::optional<at::Tensor>& running_var, const at::Tensor& input, int64_t features,
                         bool training) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op, ": give both ", name,
              " running statistics (mean and var) or neither");
  TORCH_CHECK(training || running_mean.has_value(), op, ": evaluation needs the ", name, " running statistics");
  if (!running_mean) return;
  for (const at::Tensor* running : {&*running_mean, &*running_var}) {
    const bool per_step = running->dim() == 2 && running->size(0) >= 1 && running->size(1) == features;
    const bool shared = running->dim() == 1 && running->size(0) == features;
    TORCH_CHECK(per_step || shared, op, ": expected the ", name, " running statistics of shape (", features,
                ",) or (max_length, ", features, ") with max_length >= 1, got ", running->sizes());
    TORCH_CHECK(running->device() == input.device(), op, ": expected the ", name, " running statistics on ",
                input.device(), " like the input, got them on ", running->device());
    TORCH_CHECK(at::isFloatingType(running->scalar_type()), op, ": expected floating-point ", name,
                " running statistics, got ", running->scalar_type());
  }
}

void check_masked_batch_norm(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& valid,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, int64_t step, bool training) {
  check_supported_input(op, input);
  TORCH_CHECK(input.dim() == 2, op, ": expected a 2-d (rows, features) input, got shape ", input.sizes());
  TORCH_CHECK(step >= 0, op, ": expected time step >= 0, got ", step);
  const int64_t features = input.size(1);
  check_valid_rows(op, valid, input, input.size(0));
  if (weight) check_parameter(op, "weight", *weight, input, {features}, "one per feature");
  if (bias) check_parameter(op, "bias", *bias, input, {features}, "one per feature");
  check_running_stats(op, "", running_mean, running_var, input, features, training);
}

void check_bn_lstm_step(const char* op, const at::Tensor& input_gates, const at::Tensor& hidden_gates,
                        const at::Tensor& cx, const std::optional<at::Tensor>& bias, const at::Tensor& bn_ih_weight,
                        const at::Tensor& bn_hh_weight, const at::Tensor& bn_c_weight, const at::Tensor& bn_c_bias,
                        const std::optional<at::Tensor>& valid) {
  check_supported_input(op, input_gates);
  TORCH_CHECK(cx.dim() == 2, op, ": expected a 2-d (batch, hidden_size) cell state, got shape ", cx.sizes());
  const int64_t N = cx.size(0), H = cx.size(1);
  TORCH_CHECK(input_gates.dim() == 2 && input_gates.size(0) == N && input_gates.size(1) == 4 * H, op,
              ": expected input_gates of shape (", N, ", ", 4 * H, ") = (batch, 4 * hidden_size), got ",
              input_gates.sizes());
  check_like_input(op, "hidden_gates", hidden_gates, input_gates);
  TORCH_CHECK(cx.scalar_type() == input_gates.scalar_type() && cx.device() == input_gates.device(), op,
              ": expected the cell state in ", input_gates.scalar_type(), " on ", input_gates.device(),
              " like the gates, got ", cx.scalar_type(), " on ", cx.device());
  if (bias) check_parameter(op, "bias", *bias, input_gates, {4 * H}, "one per gate column");
  check_parameter(op, "bn_ih_weight", bn_ih_weight, input_gates, {4 * H}, "one per gate column");
  check_parameter(op, "bn_hh_weight", bn_hh_weight, input_gates, {4 * H}, "one per gate column");
  check_parameter(op, "bn_c_weight", bn_c_weight, input_gates, {H}, "one per hidden unit");
  check_parameter(op, "bn_c_bias", bn_c_bias, input_gates, {H}, "one per hidden unit");
  check_valid_rows(op, valid, input_gates, N);
}

void check_step_outputs(const char* op, const at::Tensor& input_gates, const at::Tensor& cx,
                        std::initializer_list<NamedOutput> outputs, const at::Tensor& stats, int64_t stats_width) {
  for (const NamedOutput& out : outputs) {
    const bool gate_sized = out.tensor->sizes() == input_gates.sizes();
    check_like_input(op, out.name, *out.tensor, gate_sized ? input_gates : cx);
    TORCH_CHECK(out.tensor->is_contiguous(), op, ": expected ", out.name, " to be contiguous");
  }
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == stats_width && stats.is_contiguous(), op,
              ": expected contiguous stats of shape (2, ", stats_width, "), got ", stats.sizes());
  check_accumulator(op, "stats", stats.view({-1}), input_gates, 2 * stats_width);
}

void check_accumulator(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input, int64_t width) {
  const auto acc = accumulate_type(input.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == width && t.is_contiguous() && t.scalar_type() == acc &&
                  t.device() == input.device(),
              op, ": expected ", name, " a contiguous ", acc, " tensor of shape (", width, ") on ", input.device(),
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

namespace {

// mean / rstd given to masked_batch_norm_backward: (C,), floating, on the
// input's device (any floating dtype: the kernels read them as acc_t).
void check_statistics(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input, int64_t C) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": expected ", name, " of shape (", C, ",), one per feature, got ",
              t.sizes());
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on ", input.device(),
              " like the input, got it on ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected a floating-point ", name, ", got ",
              t.scalar_type());
}

}  // namespace

void check_masked_batch_norm_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                      const std::optional<at::Tensor>& valid,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                      const at::Tensor& rstd) {
  check_masked_batch_norm(op, input, valid, weight, std::nullopt, std::nullopt, std::nullopt, /*step=*/0,
                          /*training=*/true);
  check_like_input(op, "grad_output", grad_output, input);
  check_statistics(op, "mean", mean, input, input.size(1));
  check_statistics(op, "rstd", rstd, input, input.size(1));
}

void check_bn_lstm_step_forward(const char* op, const at::Tensor& input_gates, const at::Tensor& hidden_gates,
                                const at::Tensor& cx, const std::optional<at::Tensor>& bias,
                                const at::Tensor& bn_ih_weight, const at::Tensor& bn_hh_weight,
                                const at::Tensor& bn_c_weight, const at::Tensor& bn_c_bias,
                                const std::optional<at::Tensor>& running_mean_ih,
                                const std::optional<at::Tensor>& running_var_ih,
                                const std::optional<at::Tensor>& running_mean_hh,
                                const std::optional<at::Tensor>& running_var_hh,
                                const std::optional<at::Tensor>& running_mean_c,
                                const std::optional<at::Tensor>& running_var_c, int64_t step,
                                const std::optional<at::Tensor>& valid, bool training, const at::Tensor& hy,
                                const at::Tensor& cy, const at::Tensor& stats) {
  check_bn_lstm_step(op, input_gates, hidden_gates, cx, bias, bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias,
                     valid);
  TORCH_CHECK(step >= 0, op, ": expected time step >= 0, got ", step);
  const int64_t H = cx.size(1);
  check_running_stats(op, "ih", running_mean_ih, running_var_ih, input_gates, 4 * H, training);
  check_running_stats(op, "hh", running_mean_hh, running_var_hh, input_gates, 4 * H, training);
  check_running_stats(op, "c", running_mean_c, running_var_c, input_gates, H, training);
  check_step_outputs(op, input_gates, cx, {{"hy", &hy}, {"cy", &cy}}, stats, 9 * H);
}

void check_bn_lstm_step_backward(const char* op, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                                 const at::Tensor& input_gates, const at::Tensor& hidden_gates, const at::Tensor& cx,
                                 const at::Tensor& cy, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& bn_ih_weight, const at::Tensor& bn_hh_weight,
                                 const at::Tensor& bn_c_weight, const at::Tensor& bn_c_bias, const at::Tensor& stats,
                                 const std::optional<at::Tensor>& valid, const at::Tensor& grad_input_gates,
                                 const at::Tensor& grad_hidden_gates, const at::Tensor& grad_cx,
                                 const at::Tensor& grad_params) {
  check_bn_lstm_step(op, input_gates, hidden_gates, cx, bias, bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias,
                     valid);
  const int64_t H = cx.size(1);
  check_like_input(op, "cy", cy, cx);
  check_like_input(op, "grad_hy", grad_hy, cx);
  check_like_input(op, "grad_cy", grad_cy, cx);
  check_step_outputs(op, input_gates, cx,
                     {{"grad_input_gates", &grad_input_gates},
                      {"grad_hidden_gates", &grad_hidden_gates},
                      {"grad_cx", &grad_cx}},
                     stats, 9 * H);
  check_accumulator(op, "grad_params", grad_params, input_gates, 14 * H);
}

at::Tensor running_row(const at::Tensor& running, int64_t step) {
  if (running.dim() == 1) return running;
  return running.select(0, std::min(step, running.size(0) - 1));
}

std::tuple<at::Tensor, at::Tensor> normalizing_stats(bool training, const std::optional<ColumnMoments>& batch,
                                                     const std::optional<at::Tensor>& running_mean,
                                                     const std::optional<at::Tensor>& running_var, int64_t step,
                                                     double eps, at::ScalarType acc_type) {
  if (training) return {batch->mean, batch->var.add(eps).rsqrt_()};
  at::Tensor mean = running_row(*running_mean, step).to(acc_type, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor rstd = running_row(*running_var, step).to(acc_type, /*non_blocking=*/false, /*copy=*/true);
  return {mean, rstd.add_(eps).rsqrt_()};
}

void update_running_stats(const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var, int64_t step, const ColumnMoments& batch,
                          double momentum) {
  if (!running_mean) return;
  at::Tensor mean_row = running_row(*running_mean, step);
  at::Tensor var_row = running_row(*running_var, step);
  if (batch.host_count) {
    const int64_t n = *batch.host_count;
    if (n == 0) return;
    const double correction = n > 1 ? double(n) / double(n - 1) : 1.0;
    mean_row.mul_(1 - momentum).add_(batch.mean, momentum);
    var_row.mul_(1 - momentum).add_(batch.var, momentum * correction);
    return;
  }
  // count / (count - 1), or 1 where that is undefined (one row: variance 0).
  const at::Tensor correction = at::where(batch.count > 1, batch.count / (batch.count - 1), at::ones_like(batch.count));
  const at::Tensor any_row = batch.count > 0;
  // As update_running_stats of common/batch_norm_math.h, on whole rows.
  const at::Tensor new_mean = mean_row.to(batch.mean.scalar_type()) * (1 - momentum) + batch.mean * momentum;
  const at::Tensor new_var = var_row.to(batch.var.scalar_type()) * (1 - momentum) + batch.var * correction * momentum;
  mean_row.copy_(at::where(any_row, new_mean, mean_row));
  var_row.copy_(at::where(any_row, new_var, var_row));
}

}  // namespace torchnorm
