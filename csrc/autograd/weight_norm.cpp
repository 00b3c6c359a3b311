// Autograd of Weight Normalization: weight_norm saves v, g and the per-slice
// norms (S values; w itself is not kept), and its backward calls
// weight_norm_backward. The norms are an output for the backward's sake and
// have no gradient. The shared pieces are in csrc/autograd/common.h.
#include <torch/library.h>

#include "autograd/common.h"
#include "ops/weight_norm.h"

namespace torchnorm::autograd {
namespace {

struct WeightNorm : public torch::autograd::Function<WeightNorm> {
  using Op = ops::WeightNorm;
  using Grad = ops::WeightNormBackward::Grad;
  enum Input { kV, kG, kDim, kEps, kNumInputs };
  enum Saved { kSavedV, kSavedG, kSavedNorms, kNumSaved };

  static variable_list forward(AutogradContext* ctx, const Tensor& v, const Tensor& g, optional<int64_t> dim,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w, norms] = ops::handle<Op>().call(v, g, dim, eps);
    ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedV, v}, {kSavedG, g}, {kSavedNorms, norms}}));
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["eps"] = eps;
    save_grad_wanted(ctx, mask_of<Grad::kNumGrads>({{Grad::kV, v.requires_grad()}, {Grad::kG, g.requires_grad()}}));
    ctx->mark_non_differentiable({norms});
    return {w, norms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto wanted = grad_wanted<Grad::kNumGrads>(ctx);
    if (!grad_outputs[0].defined()) return variable_list(kNumInputs);  // w took no part in the loss
    auto [grad_v, grad_g] = ops::handle<ops::WeightNormBackward>().call(
        grad_outputs[0], saved[kSavedV], saved[kSavedG], saved[kSavedNorms],
        ctx->saved_data["dim"].toOptional<int64_t>(), ctx->saved_data["eps"].toDouble(), wanted);
    return tensors_of<kNumInputs>({{kV, wanted[Grad::kV] ? grad_v : Tensor()},
                                   {kG, wanted[Grad::kG] ? grad_g : Tensor()}});
  }
};

std::tuple<Tensor, Tensor> weight_norm_autograd(const Tensor& v, const Tensor& g, optional<int64_t> dim,
                                                double eps) {
  return run_forward<WeightNorm>(needs_autograd(v, g), v, g, dim, eps);
}

}  // namespace
}  // namespace torchnorm::autograd

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) { m.impl("weight_norm", &torchnorm::autograd::weight_norm_autograd); }
