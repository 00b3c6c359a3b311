#include "common/streaming_norm_plan.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include "common/input_checks.h"

namespace torchnorm {
namespace {

// A history (2, C) and its count (): float32 or float64 (half would round
// the averages away) on the input's device.
void check_history(const char* op, const char* name, const at::Tensor& values, const char* count_name,
                   const at::Tensor& count, const at::Tensor& input) {
  const int64_t C = input.size(1);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == 2 && values.size(1) == C, op, ": expected ", name,
              " of shape (2, ", C, "), rows (mean, std) per channel, got ", values.sizes());
  TORCH_CHECK(count.dim() == 0, op, ": expected ", count_name, " a 0-dim tensor, got shape ", count.sizes());
  for (const auto& [n, t] : {std::pair<const char*, const at::Tensor*>{name, &values}, {count_name, &count}}) {
    TORCH_CHECK(t->device() == input.device(), op, ": expected ", n, " on ", input.device(),
                " like the input, got it on ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": expected ", n,
                " in float32 or float64 (the state must not round to half), got ", t->scalar_type());
  }
}

// A history the op writes in place: no element may alias another.
void check_writable(const at::Tensor& values, const at::Tensor& count) {
  at::assert_no_internal_overlap(values);
  at::assert_no_partial_overlap(values, count);
}

void check_values_per_channel(const char* op, const at::Tensor& input) {
  const int64_t per_channel = input.size(0) * spatial_size(input);
  TORCH_CHECK(per_channel > 0, op, ": expected at least one value per channel, got input shape ", input.sizes());
}

}  // namespace

ForwardPlan plan_streaming_norm(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& short_stats,
                                const at::Tensor& short_count, const at::Tensor& long_stats,
                                const at::Tensor& long_count, const at::Tensor& grad_short,
                                const at::Tensor& grad_short_count, const at::Tensor& grad_long,
                                const at::Tensor& grad_long_count, double eps) {
  TORCH_CHECK(eps > 0.0, op, ": expected eps > 0 (a batch of one value per channel has std sqrt(eps)), got ", eps);
  // BatchNorm's evaluation-mode checks: training's refuses one value per
  // channel, which Streaming Normalization takes.
  ForwardPlan p = plan_forward(op, input, weight, bias, std::nullopt, std::nullopt, std::nullopt,
                               /*training=*/false, eps, "none");
  check_values_per_channel(op, input);
  check_history(op, "short_stats", short_stats, "short_count", short_count, input);
  check_history(op, "long_stats", long_stats, "long_count", long_count, input);
  check_history(op, "grad_short", grad_short, "grad_short_count", grad_short_count, input);
  check_history(op, "grad_long", grad_long, "grad_long_count", grad_long_count, input);
  check_writable(short_stats, short_count);
  check_writable(grad_short, grad_short_count);
  return p;
}

BackwardPlan plan_streaming_norm_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                          const at::Tensor& rstd, const at::Tensor& mean_hat,
                                          const at::Tensor& rstd_hat, const at::Tensor& grad_short,
                                          const at::Tensor& grad_short_count, const at::Tensor& grad_long,
                                          const at::Tensor& grad_long_count, std::array<bool, 3> output_mask) {
  // BatchNorm's backward checks the input, grad_output, weight and the
  // statistics the element-wise pass centres on (mean_hat, rstd_hat) ...
  BackwardPlan p = plan_backward(op, grad_output, input, weight, std::nullopt, std::nullopt, mean_hat, rstd_hat,
                                 "none", {output_mask[0], output_mask[1], output_mask[2], false});
  // ... and here the batch statistics the same way.
  const auto acc = accumulate_type(input.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"rstd", &rstd}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == input.size(1) && t->scalar_type() == acc &&
                    t->device() == input.device(),
                op, ": expected the batch statistic ", name, " of shape (", input.size(1), ",) and dtype ", acc,
                " on ", input.device(), ", got ", t->sizes(), ", ", t->scalar_type(), ", ", t->device());
  }
  check_values_per_channel(op, input);
  check_history(op, "grad_short", grad_short, "grad_short_count", grad_short_count, input);
  check_history(op, "grad_long", grad_long, "grad_long_count", grad_long_count, input);
  check_writable(grad_short, grad_short_count);
  return p;
}

}  // namespace torchnorm
