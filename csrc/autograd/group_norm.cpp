// Autograd of GroupNorm and InstanceNorm (group_norm, instance_norm):
// InstanceNorm is GroupNorm with one group per channel, so both backwards
// call group_norm_backward. The shared pieces are in csrc/autograd/common.h.
#include <torch/library.h>

#include <array>
#include <string>

#include "autograd/common.h"
#include "ops/group_norm.h"

namespace torchnorm::autograd {
namespace {

using Grad = ops::GroupNormBackward::Grad;

// What both forwards save for group_norm_backward, in this order.
enum Saved { kSavedInput, kSavedWeight, kSavedBias, kSavedMean, kSavedRstd, kNumSaved };

// Saves the tensors above, the group count, the activation and which of
// input, weight, bias need gradients; returns the forward's outputs (out,
// mean, rstd), the statistics marked non-differentiable.
variable_list save_group_norm(AutogradContext* ctx, const Tensor& input, int64_t num_groups,
                              const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& out,
                              const Tensor& mean, const Tensor& rstd, c10::string_view activation,
                              double negative_slope) {
  ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedInput, input},
                                                {kSavedWeight, or_undefined(weight)},
                                                {kSavedBias, or_undefined(bias)},
                                                {kSavedMean, mean},
                                                {kSavedRstd, rstd}}));
  ctx->saved_data["num_groups"] = num_groups;
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["negative_slope"] = negative_slope;
  save_grad_wanted(ctx, mask_of<Grad::kNumGrads>({{Grad::kInput, input.requires_grad()},
                                                  {Grad::kWeight, requires_grad(weight)},
                                                  {Grad::kBias, requires_grad(bias)}}));
  ctx->mark_non_differentiable({mean, rstd});
  return {out, mean, rstd};
}

// Gradients through one GroupNorm or InstanceNorm forward, indexed by Grad;
// undefined where not wanted.
std::array<Tensor, Grad::kNumGrads> group_norm_grads(AutogradContext* ctx, const Tensor& grad_output) {
  const auto saved = ctx->get_saved_variables();
  const std::array<bool, Grad::kNumGrads> mask = grad_wanted<Grad::kNumGrads>(ctx);
  if (!any(mask)) return {};
  auto [gi, gw, gb] = ops::handle<ops::GroupNormBackward>().call(
      grad_output, saved[kSavedInput], ctx->saved_data["num_groups"].toInt(), saved[kSavedMean], saved[kSavedRstd],
      as_optional(saved[kSavedWeight]), as_optional(saved[kSavedBias]), ctx->saved_data["activation"].toStringRef(),
      ctx->saved_data["negative_slope"].toDouble(), mask);
  return {mask[Grad::kInput] ? gi : Tensor(), mask[Grad::kWeight] ? gw : Tensor(),
          mask[Grad::kBias] ? gb : Tensor()};
}

// The backward of F (GroupNorm or InstanceNorm below): group_norm_grads at
// F's own input slots.
template <typename F>
variable_list input_grads(AutogradContext* ctx, const Tensor& grad_output) {
  const auto grads = group_norm_grads(ctx, grad_output);
  return tensors_of<F::kNumInputs>(
      {{F::kInput, grads[Grad::kInput]}, {F::kWeight, grads[Grad::kWeight]}, {F::kBias, grads[Grad::kBias]}});
}

struct GroupNorm : public torch::autograd::Function<GroupNorm> {
  using Op = ops::GroupNorm;
  enum Input { kInput, kNumGroups, kWeight, kBias, kEps, kActivation, kNegativeSlope, kNumInputs };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, int64_t num_groups,
                               const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                               c10::string_view activation, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] =
        ops::handle<Op>().call(input, num_groups, weight, bias, eps, activation, negative_slope);
    return save_group_norm(ctx, input, num_groups, weight, bias, out, mean, rstd, activation, negative_slope);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return input_grads<GroupNorm>(ctx, grad_outputs[0]);
  }
};

struct InstanceNorm : public torch::autograd::Function<InstanceNorm> {
  using Op = ops::InstanceNorm;
  enum Input { kInput, kWeight, kBias, kRunningMean, kRunningVar, kMomentum, kEps, kNumInputs };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = ops::handle<Op>().call(input, weight, bias, running_mean, running_var, momentum, eps);
    return save_group_norm(ctx, input, /*num_groups=*/input.size(1), weight, bias, out, mean, rstd, "none", 0.0);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return input_grads<InstanceNorm>(ctx, grad_outputs[0]);
  }
};

std::tuple<Tensor, Tensor, Tensor> group_norm_autograd(const Tensor& input, int64_t num_groups,
                                                       const optional<Tensor>& weight, const optional<Tensor>& bias,
                                                       double eps, c10::string_view activation,
                                                       double negative_slope) {
  return run_forward<GroupNorm>(needs_autograd(input, weight, bias), input, num_groups, weight, bias, eps,
                                activation, negative_slope);
}

std::tuple<Tensor, Tensor, Tensor> instance_norm_autograd(const Tensor& input, const optional<Tensor>& weight,
                                                          const optional<Tensor>& bias,
                                                          const optional<Tensor>& running_mean,
                                                          const optional<Tensor>& running_var, double momentum,
                                                          double eps) {
  return updating_running_stats<InstanceNorm>(needs_autograd(input, weight, bias), running_mean, running_var, input,
                                              weight, bias, running_mean, running_var, momentum, eps);
}

}  // namespace
}  // namespace torchnorm::autograd

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) {
  m.impl("group_norm", &torchnorm::autograd::group_norm_autograd);
  m.impl("instance_norm", &torchnorm::autograd::instance_norm_autograd);
}
