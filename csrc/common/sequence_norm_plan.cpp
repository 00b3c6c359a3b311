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
