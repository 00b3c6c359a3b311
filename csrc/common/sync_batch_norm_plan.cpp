// Host-side plans of SyncBatchNorm's per-rank ops (sync_batch_norm_plan.h).
#include "sync_batch_norm_plan.h"

namespace torchnorm {

StatsPlan plan_stats(const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual) {
  // As a training forward's arguments, except that one value per channel is
  // fine: that is one rank's share of a larger global batch.
  check_batch_norm_args("torchnorm.batch_norm_stats", input, weight, bias, running_mean, running_var, residual,
                        /*training=*/false, 0.0);
  StatsPlan p;
  p.x = as_kernel_layout(input, p.g);
  p.stats = at::zeros({3, p.g.C}, input.options().dtype(at::kDouble));
  return p;
}

at::Tensor plan_gather_stats(const at::Tensor& stats, const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, double eps) {
  const char* op = "torchnorm.batch_norm_gather_stats";
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) >= 1 && stats.size(1) == 3 && stats.size(2) >= 1, op,
              ": expected stats of shape (W, 3, C) (count, mean, M2 of W partials), W >= 1, C >= 1, got shape ",
              stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 stats, got ", stats.scalar_type());
  TORCH_CHECK(eps >= 0, op, ": expected eps >= 0, got ", eps);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  const int64_t C = stats.size(2);
  for (const auto& [name, t] : {std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
    if (!t->has_value()) continue;
    const at::Tensor& r = **t;
    TORCH_CHECK(r.dim() == 1 && r.size(0) == C && at::isFloatingType(r.scalar_type()) && r.device() == stats.device(),
                op, ": expected ", name, " of shape (", C, ",), floating point, on ", stats.device(), ", got ",
                r.sizes(), ", ", r.scalar_type(), ", ", r.device());
  }
  return stats.contiguous();
}

BackwardPlan plan_backward_elemt(const at::Tensor& grad_out, const at::Tensor& input,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& mean_dz, const at::Tensor& mean_dz_xhat, const std::string& activation,
    std::array<bool, 2> output_mask) {
  const char* op = "torchnorm.batch_norm_backward_elemt";
  BackwardPlan p = plan_backward(op, grad_out, input, weight, bias, residual, mean, rstd, activation,
                                 {output_mask[0], false, false, output_mask[1]});
  check_channel_statistic(op, "mean_dz", mean_dz, input);
  check_channel_statistic(op, "mean_dz_xhat", mean_dz_xhat, input);
  return p;
}

}  // namespace torchnorm
