// Autograd of Cosine Normalization (cosine_linear, cosine_conv2d): each
// forward keeps its input, the parameters, its output and the two norms
// (input_rnorm, weight_rnorm), and its backward op (cosine_*_backward) takes
// the dot product's gradient (ATen's) and adds the norms' terms. The shared
// pieces are in csrc/autograd/common.h.
#include <torch/library.h>

#include <vector>

#include "autograd/common.h"
#include "ops/cosine_norm.h"

namespace torchnorm::autograd {
namespace {

using Grad = ops::CosineGrad;
// What both forwards save for their backward op, in this order.
enum Saved { kSavedInput, kSavedWeight, kSavedBias, kSavedOutput, kSavedInputRnorm, kSavedWeightRnorm, kNumSaved };

// Saves what the backward op needs and which gradients it must compute;
// the norms are not differentiable outputs.
void save_cosine(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                 const Tensor& out, const Tensor& input_rnorm, const Tensor& weight_rnorm) {
  ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedInput, input},
                                                {kSavedWeight, weight},
                                                {kSavedBias, or_undefined(bias)},
                                                {kSavedOutput, out},
                                                {kSavedInputRnorm, input_rnorm},
                                                {kSavedWeightRnorm, weight_rnorm}}));
  save_grad_wanted(ctx, mask_of<Grad::kCosineNumGrads>({{Grad::kCosineInput, input.requires_grad()},
                                                        {Grad::kCosineWeight, weight.requires_grad()},
                                                        {Grad::kCosineBias, requires_grad(bias)}}));
  ctx->mark_non_differentiable({input_rnorm, weight_rnorm});
}

// The backward's result: the wanted gradients at the input, weight and bias
// slots of a forward with num_inputs inputs.
template <size_t kNumInputs>
variable_list cosine_grads(const std::array<bool, Grad::kCosineNumGrads>& wanted,
                           const std::tuple<Tensor, Tensor, Tensor>& grads) {
  const auto& [gi, gw, gb] = grads;
  return tensors_of<kNumInputs>({{0, wanted[Grad::kCosineInput] ? gi : Tensor()},
                                 {1, wanted[Grad::kCosineWeight] ? gw : Tensor()},
                                 {2, wanted[Grad::kCosineBias] ? gb : Tensor()}});
}

struct CosineLinear : public torch::autograd::Function<CosineLinear> {
  using Op = ops::CosineLinear;
  static constexpr size_t kNumInputs = 4;  // input, weight, bias, eps

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const optional<Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, rx, rw] = ops::handle<Op>().call(input, weight, bias, eps);
    save_cosine(ctx, input, weight, bias, out, rx, rw);
    return {out, rx, rw};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto wanted = grad_wanted<Grad::kCosineNumGrads>(ctx);
    if (!any(wanted)) return variable_list(kNumInputs);
    const auto s = ctx->get_saved_variables();
    return cosine_grads<kNumInputs>(
        wanted, ops::handle<ops::CosineLinearBackward>().call(grad_outputs[0], s[kSavedInput], s[kSavedWeight],
                                                              as_optional(s[kSavedBias]), s[kSavedOutput],
                                                              s[kSavedInputRnorm], s[kSavedWeightRnorm], wanted));
  }
};

struct CosineConv2d : public torch::autograd::Function<CosineConv2d> {
  using Op = ops::CosineConv2d;
  static constexpr size_t kNumInputs = 8;  // input, weight, bias, stride, padding, dilation, groups, eps

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, rx, rw] = ops::handle<Op>().call(input, weight, bias, stride, padding, dilation, groups, eps);
    save_cosine(ctx, input, weight, bias, out, rx, rw);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    return {out, rx, rw};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto wanted = grad_wanted<Grad::kCosineNumGrads>(ctx);
    if (!any(wanted)) return variable_list(kNumInputs);
    const auto s = ctx->get_saved_variables();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector(),
                               padding = ctx->saved_data["padding"].toIntVector(),
                               dilation = ctx->saved_data["dilation"].toIntVector();
    return cosine_grads<kNumInputs>(
        wanted, ops::handle<ops::CosineConv2dBackward>().call(
                    grad_outputs[0], s[kSavedInput], s[kSavedWeight], as_optional(s[kSavedBias]), s[kSavedOutput],
                    s[kSavedInputRnorm], s[kSavedWeightRnorm], stride, padding, dilation,
                    ctx->saved_data["groups"].toInt(), wanted));
  }
};

std::tuple<Tensor, Tensor, Tensor> cosine_linear_autograd(const Tensor& input, const Tensor& weight,
                                                          const optional<Tensor>& bias, double eps) {
  return run_forward<CosineLinear>(needs_autograd(input, weight, bias), input, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor> cosine_conv2d_autograd(const Tensor& input, const Tensor& weight,
                                                          const optional<Tensor>& bias, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          int64_t groups, double eps) {
  return run_forward<CosineConv2d>(needs_autograd(input, weight, bias), input, weight, bias, stride, padding, dilation,
                                   groups, eps);
}

}  // namespace
}  // namespace torchnorm::autograd

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) {
  m.impl("cosine_linear", &torchnorm::autograd::cosine_linear_autograd);
  m.impl("cosine_conv2d", &torchnorm::autograd::cosine_conv2d_autograd);
}
