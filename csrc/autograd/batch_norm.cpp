// Autograd of the BatchNorm forwards, batch_norm_train and batch_norm_eval;
// both backwards call batch_norm_backward. (batch_norm_apply is not
// differentiable and has no autograd kernel.) The shared pieces are in
// csrc/autograd/common.h.
#include <torch/library.h>

#include <array>
#include <string>

#include "autograd/common.h"
#include "ops/batch_norm.h"

namespace torchnorm::autograd {
namespace {

using Grad = ops::BatchNormBackward::Grad;

// What both forwards save for batch_norm_backward, in this order.
enum Saved { kSavedInput, kSavedWeight, kSavedBias, kSavedResidual, kSavedMean, kSavedRstd, kNumSaved };

// Saves the tensors above, the activation, and which of input, weight, bias,
// residual need gradients.
void save_for_grads(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                    const optional<Tensor>& bias, const optional<Tensor>& residual, const Tensor& mean,
                    const Tensor& rstd, c10::string_view activation, double negative_slope) {
  ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedInput, input},
                                                {kSavedWeight, or_undefined(weight)},
                                                {kSavedBias, or_undefined(bias)},
                                                {kSavedResidual, or_undefined(residual)},
                                                {kSavedMean, mean},
                                                {kSavedRstd, rstd}}));
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["negative_slope"] = negative_slope;
  save_grad_wanted(ctx, mask_of<Grad::kNumGrads>({{Grad::kInput, input.requires_grad()},
                                                  {Grad::kWeight, requires_grad(weight)},
                                                  {Grad::kBias, requires_grad(bias)},
                                                  {Grad::kResidual, requires_grad(residual)}}));
}

// Gradients through one BatchNorm forward, indexed by Grad; undefined where
// not wanted.
std::array<Tensor, Grad::kNumGrads> batch_norm_grads(AutogradContext* ctx, const Tensor& grad_output,
                                                     bool training) {
  const auto saved = ctx->get_saved_variables();
  const std::string activation = ctx->saved_data["activation"].toStringRef();
  const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
  std::array<bool, Grad::kNumGrads> mask = grad_wanted<Grad::kNumGrads>(ctx);
  const bool pass_residual_grad = hands_residual_grad_through(mask[Grad::kResidual], activation);
  if (pass_residual_grad) mask[Grad::kResidual] = false;
  std::array<Tensor, Grad::kNumGrads> grads;
  if (any(mask)) {
    auto [gi, gw, gb, gr] = ops::handle<ops::BatchNormBackward>().call(
        grad_output, saved[kSavedInput], as_optional(saved[kSavedWeight]), as_optional(saved[kSavedBias]),
        as_optional(saved[kSavedResidual]), saved[kSavedMean], saved[kSavedRstd], training, activation,
        negative_slope, mask);
    grads = {gi, gw, gb, gr};
    for (int i = 0; i < Grad::kNumGrads; ++i) {
      if (!mask[i]) grads[i] = Tensor();
    }
  }
  if (pass_residual_grad) grads[Grad::kResidual] = grad_output;
  return grads;
}

// The backward of F (BatchNormTrain or BatchNormEval below): batch_norm_grads
// at F's own input slots.
template <typename F>
variable_list input_grads(AutogradContext* ctx, const Tensor& grad_output, bool training) {
  const auto grads = batch_norm_grads(ctx, grad_output, training);
  return tensors_of<F::kNumInputs>({{F::kInput, grads[Grad::kInput]},
                                    {F::kWeight, grads[Grad::kWeight]},
                                    {F::kBias, grads[Grad::kBias]},
                                    {F::kResidual, grads[Grad::kResidual]}});
}

struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  using Op = ops::BatchNormTrain;
  enum Input {
    kInput, kWeight, kBias, kRunningMean, kRunningVar, kMomentum, kEps, kActivation, kNegativeSlope, kResidual,
    kNumInputs
  };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, double momentum, double eps,
                               c10::string_view activation, double negative_slope, const optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = ops::handle<Op>().call(input, weight, bias, running_mean, running_var, momentum, eps,
                                                    activation, negative_slope, residual);
    save_for_grads(ctx, input, weight, bias, residual, mean, rstd, activation, negative_slope);
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return input_grads<BatchNormTrain>(ctx, grad_outputs[0], /*training=*/true);
  }
};

struct BatchNormEval : public torch::autograd::Function<BatchNormEval> {
  using Op = ops::BatchNormEval;
  enum Input {
    kInput, kRunningMean, kRunningVar, kWeight, kBias, kEps, kActivation, kNegativeSlope, kResidual, kNumInputs
  };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& running_mean,
                               const Tensor& running_var, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, double eps, c10::string_view activation,
                               double negative_slope, const optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = ops::handle<Op>().call(input, running_mean, running_var, weight, bias, eps, activation,
                                        negative_slope, residual);
    // Copies: the running statistics may change before the backward runs.
    const auto stats_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor mean = running_mean.to(stats_type, /*non_blocking=*/false, /*copy=*/true);
    Tensor rstd = running_var.to(stats_type, /*non_blocking=*/false, /*copy=*/true).add_(eps).rsqrt_();
    save_for_grads(ctx, input, weight, bias, residual, mean, rstd, activation, negative_slope);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return input_grads<BatchNormEval>(ctx, grad_outputs[0], /*training=*/false);
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var, double momentum, double eps,
    c10::string_view activation, double negative_slope, const optional<Tensor>& residual) {
  return updating_running_stats<BatchNormTrain>(needs_autograd(input, weight, bias, residual), running_mean,
                                                running_var, input, weight, bias, running_mean, running_var,
                                                momentum, eps, activation, negative_slope, residual);
}

Tensor batch_norm_eval_autograd(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                                const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                                c10::string_view activation, double negative_slope,
                                const optional<Tensor>& residual) {
  return run_forward<BatchNormEval>(needs_autograd(input, weight, bias, residual), input, running_mean, running_var,
                                    weight, bias, eps, activation, negative_slope, residual);
}

}  // namespace
}  // namespace torchnorm::autograd

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) {
  m.impl("batch_norm_train", &torchnorm::autograd::batch_norm_train_autograd);
  m.impl("batch_norm_eval", &torchnorm::autograd::batch_norm_eval_autograd);
}
