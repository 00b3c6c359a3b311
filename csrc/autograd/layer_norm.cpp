// Autograd of the per-row norms, layer_norm and rms_norm; both backwards call
// layer_norm_backward (with mean None for RMSNorm). The shared pieces are in
// csrc/autograd/common.h.
#include <torch/library.h>

#include <array>

#include "autograd/common.h"
#include "ops/layer_norm.h"

namespace torchnorm::autograd {
namespace {

using Grad = ops::LayerNormBackward::Grad;

// What both forwards save for layer_norm_backward, in this order: the tensor
// that was normalized (the sum when a residual was fused), the weight and
// the statistics (mean undefined for RMSNorm).
enum Saved { kSavedNormalized, kSavedWeight, kSavedMean, kSavedRstd, kNumSaved };

// Saves the tensors above, normalized_shape, whether a residual was fused and
// which of (input or residual), weight, bias need gradients.
void save_row_norm(AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
                   const optional<Tensor>& weight, const optional<Tensor>& bias, const optional<Tensor>& residual,
                   const Tensor& normalized, const Tensor& mean, const Tensor& rstd) {
  ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedNormalized, normalized},
                                                {kSavedWeight, or_undefined(weight)},
                                                {kSavedMean, mean},
                                                {kSavedRstd, rstd}}));
  ctx->saved_data["normalized_shape"] = normalized_shape.vec();
  ctx->saved_data["has_residual"] = residual.has_value();
  save_grad_wanted(ctx, mask_of<Grad::kNumGrads>({{Grad::kInput, input.requires_grad() || requires_grad(residual)},
                                                  {Grad::kWeight, requires_grad(weight)},
                                                  {Grad::kBias, requires_grad(bias)}}));
}

// Gradients through one LayerNorm or RMSNorm forward, indexed by Grad;
// undefined where not wanted. The residual's gradient is the input's.
// grad_outputs: those of (out, sum, ...); the sum's reaches the normalized
// tensor directly.
std::array<Tensor, Grad::kNumGrads> row_norm_grads(AutogradContext* ctx, const variable_list& grad_outputs) {
  const auto saved = ctx->get_saved_variables();
  const auto normalized_shape = ctx->saved_data["normalized_shape"].toIntVector();
  const std::array<bool, Grad::kNumGrads> mask = grad_wanted<Grad::kNumGrads>(ctx);
  if (!any(mask)) return {};
  const optional<Tensor> grad_sum =
      ctx->saved_data["has_residual"].toBool() ? as_optional(grad_outputs[1]) : std::nullopt;
  auto [gi, gw, gb] = ops::handle<ops::LayerNormBackward>().call(
      grad_outputs[0], grad_sum, saved[kSavedNormalized], normalized_shape, as_optional(saved[kSavedMean]),
      saved[kSavedRstd], as_optional(saved[kSavedWeight]), mask);
  return {mask[Grad::kInput] ? gi : Tensor(), mask[Grad::kWeight] ? gw : Tensor(),
          mask[Grad::kBias] ? gb : Tensor()};
}

struct LayerNorm : public torch::autograd::Function<LayerNorm> {
  using Op = ops::LayerNorm;
  enum Input { kInput, kNormalizedShape, kWeight, kBias, kEps, kResidual, kNumInputs };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
                               const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                               const optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, sum, mean, rstd] = ops::handle<Op>().call(input, normalized_shape, weight, bias, eps, residual);
    save_row_norm(ctx, input, normalized_shape, weight, bias, residual, residual ? sum : input, mean, rstd);
    ctx->mark_non_differentiable(residual ? variable_list{mean, rstd} : variable_list{sum, mean, rstd});
    return {out, sum, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto grads = row_norm_grads(ctx, grad_outputs);
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    return tensors_of<kNumInputs>({{kInput, grads[Grad::kInput]},
                                   {kWeight, grads[Grad::kWeight]},
                                   {kBias, grads[Grad::kBias]},
                                   {kResidual, has_residual ? grads[Grad::kInput] : Tensor()}});
  }
};

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  using Op = ops::RmsNorm;
  enum Input { kInput, kNormalizedShape, kWeight, kEps, kResidual, kNumInputs };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
                               const optional<Tensor>& weight, optional<double> eps,
                               const optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, sum, rstd] = ops::handle<Op>().call(input, normalized_shape, weight, eps, residual);
    save_row_norm(ctx, input, normalized_shape, weight, std::nullopt, residual, residual ? sum : input, Tensor(),
                  rstd);
    ctx->mark_non_differentiable(residual ? variable_list{rstd} : variable_list{sum, rstd});
    return {out, sum, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto grads = row_norm_grads(ctx, grad_outputs);
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    return tensors_of<kNumInputs>({{kInput, grads[Grad::kInput]},
                                   {kWeight, grads[Grad::kWeight]},
                                   {kResidual, has_residual ? grads[Grad::kInput] : Tensor()}});
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                                                               const optional<Tensor>& weight,
                                                               const optional<Tensor>& bias, double eps,
                                                               const optional<Tensor>& residual) {
  return run_forward<LayerNorm>(needs_autograd(input, weight, bias, residual), input, normalized_shape, weight, bias,
                                eps, residual);
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                                                     const optional<Tensor>& weight, optional<double> eps,
                                                     const optional<Tensor>& residual) {
  return run_forward<RmsNorm>(needs_autograd(input, weight, residual), input, normalized_shape, weight, eps,
                              residual);
}

}  // namespace
}  // namespace torchnorm::autograd

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) {
  m.impl("layer_norm", &torchnorm::autograd::layer_norm_autograd);
  m.impl("rms_norm", &torchnorm::autograd::rms_norm_autograd);
}
