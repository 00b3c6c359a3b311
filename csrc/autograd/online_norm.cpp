// Autograd of Online Normalization: online_norm's backward is the paper's
// control process (online_norm_backward), which updates the state u, v. So a
// graph's backward may run once: a second run over the same graph (e.g. with
// retain_graph=True) raises instead of updating the state twice. The shared
// pieces are in csrc/autograd/common.h.
#include <torch/library.h>

#include "autograd/common.h"
#include "ops/online_norm.h"

namespace torchnorm::autograd {
namespace {

struct OnlineNorm : public torch::autograd::Function<OnlineNorm> {
  using Op = ops::OnlineNorm;
  using Grad = ops::OnlineNormBackward::Grad;
  enum Input { kInput, kWeight, kBias, kMu, kVar, kU, kV, kAlphaFwd, kAlphaBkw, kEps, kLayerScale, kNumInputs };
  enum Saved { kSavedInput, kSavedWeight, kSavedMean, kSavedRstd, kSavedBias, kSavedLayerRstd, kNumSaved };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const Tensor& mu, const Tensor& var, const Tensor& u,
                               const Tensor& v, double alpha_fwd, double alpha_bkw, double eps, bool layer_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd, layer_rstd] =
        ops::handle<Op>().call(input, weight, bias, mu, var, u, v, alpha_fwd, alpha_bkw, eps, layer_scale);
    // Layer scaling's backward needs the affine output z = weight y + bias
    // (recomputed from the input) and each sample's scale.
    ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedInput, input},
                                                  {kSavedWeight, or_undefined(weight)},
                                                  {kSavedMean, mean},
                                                  {kSavedRstd, rstd},
                                                  {kSavedBias, layer_scale ? or_undefined(bias) : Tensor()},
                                                  {kSavedLayerRstd, layer_scale ? layer_rstd : Tensor()}}));
    // Held without a version check: the backward updates them in place, and
    // another forward's backward may have done so first.
    ctx->saved_data["u"] = u;
    ctx->saved_data["v"] = v;
    ctx->saved_data["alpha_bkw"] = alpha_bkw;
    ctx->saved_data["backward_ran"] = false;
    save_grad_wanted(ctx, mask_of<Grad::kNumGrads>({{Grad::kInput, input.requires_grad()},
                                                    {Grad::kWeight, requires_grad(weight)},
                                                    {Grad::kBias, requires_grad(bias)}}));
    ctx->mark_non_differentiable({mean, rstd, layer_rstd});
    return {out, mean, rstd, layer_rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!ctx->saved_data["backward_ran"].toBool(),
                "torchnorm.online_norm: this graph's backward already ran. Online Normalization's backward "
                "updates its state (u, v), so it runs once per forward: do not backpropagate twice through the "
                "same graph (retain_graph=True, or torch.autograd.grad called twice)");
    ctx->saved_data["backward_ran"] = true;
    const auto saved = ctx->get_saved_variables();
    // The control process runs (and updates u, v) whatever is wanted.
    const auto wanted = grad_wanted<Grad::kNumGrads>(ctx);
    auto [gi, gw, gb] = ops::handle<ops::OnlineNormBackward>().call(
        grad_outputs[0], saved[kSavedInput], as_optional(saved[kSavedWeight]), saved[kSavedMean], saved[kSavedRstd],
        ctx->saved_data["u"].toTensor(), ctx->saved_data["v"].toTensor(), ctx->saved_data["alpha_bkw"].toDouble(),
        wanted, as_optional(saved[kSavedBias]), as_optional(saved[kSavedLayerRstd]));
    return tensors_of<kNumInputs>({{kInput, wanted[Grad::kInput] ? gi : Tensor()},
                                   {kWeight, wanted[Grad::kWeight] ? gw : Tensor()},
                                   {kBias, wanted[Grad::kBias] ? gb : Tensor()}});
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> online_norm_autograd(const Tensor& input, const optional<Tensor>& weight,
                                                                const optional<Tensor>& bias, const Tensor& mu,
                                                                const Tensor& var, const Tensor& u, const Tensor& v,
                                                                double alpha_fwd, double alpha_bkw, double eps,
                                                                bool layer_scale) {
  return updating_running_stats<OnlineNorm>(needs_autograd(input, weight, bias), mu, var, input, weight, bias, mu,
                                            var, u, v, alpha_fwd, alpha_bkw, eps, layer_scale);
}

}  // namespace
}  // namespace torchnorm::autograd

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) { m.impl("online_norm", &torchnorm::autograd::online_norm_autograd); }
