// Autograd of the fused convolution + BatchNorm ops, conv_bn_frozen and
// conv_bn_train: each keeps the conv input and the parameters, not the conv
// output, and its backward op (conv_bn_*_backward) runs what it needs again.
// The shared pieces are in csrc/autograd/common.h.
#include <torch/library.h>

#include <array>
#include <string>
#include <vector>

#include "autograd/common.h"
#include "ops/conv_bn.h"

namespace torchnorm::autograd {
namespace {

// A convolution's arguments, kept in a node's saved_data.
void save_conv_args(AutogradContext* ctx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t groups, bool transposed, at::IntArrayRef output_padding) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["transposed"] = transposed;
  ctx->saved_data["output_padding"] = output_padding.vec();
}

// What save_conv_args kept.
struct SavedConv {
  std::vector<int64_t> stride, padding, dilation, output_padding;
  int64_t groups;
  bool transposed;

  explicit SavedConv(AutogradContext* ctx)
      : stride(ctx->saved_data["stride"].toIntVector()),
        padding(ctx->saved_data["padding"].toIntVector()),
        dilation(ctx->saved_data["dilation"].toIntVector()),
        output_padding(ctx->saved_data["output_padding"].toIntVector()),
        groups(ctx->saved_data["groups"].toInt()),
        transposed(ctx->saved_data["transposed"].toBool()) {}
};

// Saves the conv input, the parameters and the (frozen) running statistics.
struct ConvBNFrozen : public torch::autograd::Function<ConvBNFrozen> {
  using Op = ops::ConvBNFrozen;
  using Grad = ops::ConvBNFrozenBackward::Grad;
  enum Input {
    kInput, kWeight, kConvBias, kBNWeight, kBNBias, kRunningMean, kRunningVar, kEps, kStride, kPadding, kDilation,
    kGroups, kTransposed, kOutputPadding, kNumInputs
  };
  // What forward saves for conv_bn_frozen_backward, in this order.
  enum Saved { kSavedInput, kSavedWeight, kSavedConvBias, kSavedBNWeight, kSavedRunningMean, kSavedRunningVar,
               kNumSaved };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const optional<Tensor>& conv_bias, const optional<Tensor>& bn_weight,
                               const optional<Tensor>& bn_bias, const Tensor& running_mean,
                               const Tensor& running_var, double eps, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool transposed,
                               at::IntArrayRef output_padding) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = ops::handle<Op>().call(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                        stride, padding, dilation, groups, transposed, output_padding);
    ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedInput, input},
                                                  {kSavedWeight, weight},
                                                  {kSavedConvBias, or_undefined(conv_bias)},
                                                  {kSavedBNWeight, or_undefined(bn_weight)},
                                                  {kSavedRunningMean, running_mean},
                                                  {kSavedRunningVar, running_var}}));
    ctx->saved_data["eps"] = eps;
    save_conv_args(ctx, stride, padding, dilation, groups, transposed, output_padding);
    save_grad_wanted(ctx, mask_of<Grad::kNumGrads>({{Grad::kInput, input.requires_grad()},
                                                    {Grad::kWeight, weight.requires_grad()},
                                                    {Grad::kConvBias, requires_grad(conv_bias)},
                                                    {Grad::kBNWeight, requires_grad(bn_weight)},
                                                    {Grad::kBNBias, requires_grad(bn_bias)}}));
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, Grad::kNumGrads> mask = grad_wanted<Grad::kNumGrads>(ctx);
    if (!any(mask)) return variable_list(kNumInputs);
    const SavedConv conv(ctx);
    auto [gi, gw, gcb, gbw, gbb] = ops::handle<ops::ConvBNFrozenBackward>().call(
        grad_outputs[0], saved[kSavedInput], saved[kSavedWeight], as_optional(saved[kSavedConvBias]),
        as_optional(saved[kSavedBNWeight]), saved[kSavedRunningMean], saved[kSavedRunningVar],
        ctx->saved_data["eps"].toDouble(), conv.stride, conv.padding, conv.dilation, conv.groups, conv.transposed,
        conv.output_padding, mask);
    return tensors_of<kNumInputs>({{kInput, mask[Grad::kInput] ? gi : Tensor()},
                                   {kWeight, mask[Grad::kWeight] ? gw : Tensor()},
                                   {kConvBias, mask[Grad::kConvBias] ? gcb : Tensor()},
                                   {kBNWeight, mask[Grad::kBNWeight] ? gbw : Tensor()},
                                   {kBNBias, mask[Grad::kBNBias] ? gbb : Tensor()}});
  }
};

// Saves the conv input, the parameters, the residual and the batch
// statistics: not the conv output, which backward recomputes.
struct ConvBNTrain : public torch::autograd::Function<ConvBNTrain> {
  using Op = ops::ConvBNTrain;
  using Grad = ops::ConvBNTrainBackward::Grad;
  enum Input {
    kInput, kWeight, kConvBias, kBNWeight, kBNBias, kRunningMean, kRunningVar, kMomentum, kEps, kActivation,
    kNegativeSlope, kResidual, kStride, kPadding, kDilation, kGroups, kTransposed, kOutputPadding, kNumInputs
  };
  // What forward saves for conv_bn_train_backward, in this order.
  enum Saved { kSavedInput, kSavedWeight, kSavedConvBias, kSavedBNWeight, kSavedBNBias, kSavedResidual, kSavedMean,
               kSavedRstd, kNumSaved };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const optional<Tensor>& conv_bias, const optional<Tensor>& bn_weight,
                               const optional<Tensor>& bn_bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, double momentum, double eps,
                               c10::string_view activation, double negative_slope, const optional<Tensor>& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool transposed, at::IntArrayRef output_padding) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = ops::handle<Op>().call(input, weight, conv_bias, bn_weight, bn_bias, running_mean,
                                                    running_var, momentum, eps, activation, negative_slope, residual,
                                                    stride, padding, dilation, groups, transposed, output_padding);
    ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedInput, input},
                                                  {kSavedWeight, weight},
                                                  {kSavedConvBias, or_undefined(conv_bias)},
                                                  {kSavedBNWeight, or_undefined(bn_weight)},
                                                  {kSavedBNBias, or_undefined(bn_bias)},
                                                  {kSavedResidual, or_undefined(residual)},
                                                  {kSavedMean, mean},
                                                  {kSavedRstd, rstd}}));
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    save_conv_args(ctx, stride, padding, dilation, groups, transposed, output_padding);
    save_grad_wanted(ctx, mask_of<Grad::kNumGrads>({{Grad::kInput, input.requires_grad()},
                                                    {Grad::kWeight, weight.requires_grad()},
                                                    {Grad::kConvBias, requires_grad(conv_bias)},
                                                    {Grad::kBNWeight, requires_grad(bn_weight)},
                                                    {Grad::kBNBias, requires_grad(bn_bias)},
                                                    {Grad::kResidual, requires_grad(residual)}}));
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad_output = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    std::array<bool, Grad::kNumGrads> mask = grad_wanted<Grad::kNumGrads>(ctx);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const bool pass_residual_grad = hands_residual_grad_through(mask[Grad::kResidual], activation);
    if (pass_residual_grad) mask[Grad::kResidual] = false;
    variable_list result(kNumInputs);
    if (any(mask)) {
      const SavedConv conv(ctx);
      auto [gi, gw, gcb, gbw, gbb, gr] = ops::handle<ops::ConvBNTrainBackward>().call(
          grad_output, saved[kSavedInput], saved[kSavedWeight], as_optional(saved[kSavedConvBias]),
          as_optional(saved[kSavedBNWeight]), as_optional(saved[kSavedBNBias]), as_optional(saved[kSavedResidual]),
          saved[kSavedMean], saved[kSavedRstd], activation, ctx->saved_data["negative_slope"].toDouble(),
          conv.stride, conv.padding, conv.dilation, conv.groups, conv.transposed, conv.output_padding, mask);
      result = tensors_of<kNumInputs>({{kInput, mask[Grad::kInput] ? gi : Tensor()},
                                       {kWeight, mask[Grad::kWeight] ? gw : Tensor()},
                                       {kConvBias, mask[Grad::kConvBias] ? gcb : Tensor()},
                                       {kBNWeight, mask[Grad::kBNWeight] ? gbw : Tensor()},
                                       {kBNBias, mask[Grad::kBNBias] ? gbb : Tensor()},
                                       {kResidual, mask[Grad::kResidual] ? gr : Tensor()}});
    }
    if (pass_residual_grad) result[kResidual] = grad_output;
    return result;
  }
};

Tensor conv_bn_frozen_autograd(const Tensor& input, const Tensor& weight, const optional<Tensor>& conv_bias,
                               const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias,
                               const Tensor& running_mean, const Tensor& running_var, double eps,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool transposed, at::IntArrayRef output_padding) {
  return run_forward<ConvBNFrozen>(needs_autograd(input, weight, conv_bias, bn_weight, bn_bias), input, weight,
                                   conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
                                   dilation, groups, transposed, output_padding);
}

std::tuple<Tensor, Tensor, Tensor> conv_bn_train_autograd(
    const Tensor& input, const Tensor& weight, const optional<Tensor>& conv_bias, const optional<Tensor>& bn_weight,
    const optional<Tensor>& bn_bias, const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    double momentum, double eps, c10::string_view activation, double negative_slope, const optional<Tensor>& residual,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool transposed,
    at::IntArrayRef output_padding) {
  return updating_running_stats<ConvBNTrain>(needs_autograd(input, weight, conv_bias, bn_weight, bn_bias, residual),
                                             running_mean, running_var, input, weight, conv_bias, bn_weight, bn_bias,
                                             running_mean, running_var, momentum, eps, activation, negative_slope,
                                             residual, stride, padding, dilation, groups, transposed,
                                             output_padding);
}

}  // namespace
}  // namespace torchnorm::autograd

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) {
  m.impl("conv_bn_frozen", &torchnorm::autograd::conv_bn_frozen_autograd);
  m.impl("conv_bn_train", &torchnorm::autograd::conv_bn_train_autograd);
}
