// Autograd of Streaming Normalization: streaming_norm's backward is the
// paper's streamed gradient (streaming_norm_backward), which pushes this
// batch's gradient of the statistics into the gradient history. So a graph's
// backward may run once: a second run over the same graph (e.g. with
// retain_graph=True) raises instead of pushing twice. The shared pieces are
// in csrc/autograd/common.h.
#include <torch/library.h>

#include "autograd/common.h"
#include "ops/streaming_norm.h"

namespace torchnorm::autograd {
namespace {

struct StreamingNorm : public torch::autograd::Function<StreamingNorm> {
  using Op = ops::StreamingNorm;
  using Grad = ops::StreamingNormBackward::Grad;
  enum Input {
    kInput, kWeight, kBias, kShortStats, kShortCount, kLongStats, kLongCount, kGradShort, kGradShortCount,
    kGradLong, kGradLongCount, kAlphaLong, kAlphaShort, kBetaLong, kBetaShort, kBetaCurrent, kEps, kNumInputs
  };
  enum Saved { kSavedInput, kSavedWeight, kSavedMean, kSavedRstd, kSavedMeanHat, kSavedRstdHat, kNumSaved };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const Tensor& short_stats, const Tensor& short_count,
                               const Tensor& long_stats, const Tensor& long_count, const Tensor& grad_short,
                               const Tensor& grad_short_count, const Tensor& grad_long, const Tensor& grad_long_count,
                               double alpha_long, double alpha_short, double beta_long, double beta_short,
                               double beta_current, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd, mean_hat, rstd_hat] =
        ops::handle<Op>().call(input, weight, bias, short_stats, short_count, long_stats, long_count, grad_short,
                               grad_short_count, grad_long, grad_long_count, alpha_long, alpha_short, beta_long,
                               beta_short, beta_current, eps);
    ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedInput, input},
                                                  {kSavedWeight, or_undefined(weight)},
                                                  {kSavedMean, mean},
                                                  {kSavedRstd, rstd},
                                                  {kSavedMeanHat, mean_hat},
                                                  {kSavedRstdHat, rstd_hat}}));
    // Held without a version check: the backward updates the short-term
    // history in place, and another forward's backward may have done so
    // first; weight_update() changes them all between steps.
    ctx->saved_data["grad_short"] = grad_short;
    ctx->saved_data["grad_short_count"] = grad_short_count;
    ctx->saved_data["grad_long"] = grad_long;
    ctx->saved_data["grad_long_count"] = grad_long_count;
    ctx->saved_data["beta_long"] = beta_long;
    ctx->saved_data["beta_short"] = beta_short;
    ctx->saved_data["beta_current"] = beta_current;
    ctx->saved_data["backward_ran"] = false;
    save_grad_wanted(ctx, mask_of<Grad::kNumGrads>({{Grad::kInput, input.requires_grad()},
                                                    {Grad::kWeight, requires_grad(weight)},
                                                    {Grad::kBias, requires_grad(bias)}}));
    ctx->mark_non_differentiable({mean, rstd, mean_hat, rstd_hat});
    return {out, mean, rstd, mean_hat, rstd_hat};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!ctx->saved_data["backward_ran"].toBool(),
                "torchnorm.streaming_norm: backward already ran for this graph. Streaming Normalization pushes the "
                "statistics' gradient into its history in backward, so a graph may be backpropagated once (not "
                "with retain_graph=True twice, or torch.autograd.grad called twice)");
    ctx->saved_data["backward_ran"] = true;
    const auto saved = ctx->get_saved_variables();
    const auto& h = ctx->saved_data;
    // The history is pushed whatever is wanted.
    const auto wanted = grad_wanted<Grad::kNumGrads>(ctx);
    auto [gi, gw, gb] = ops::handle<ops::StreamingNormBackward>().call(
        grad_outputs[0], saved[kSavedInput], as_optional(saved[kSavedWeight]), saved[kSavedMean], saved[kSavedRstd],
        saved[kSavedMeanHat], saved[kSavedRstdHat], h.at("grad_short").toTensor(),
        h.at("grad_short_count").toTensor(), h.at("grad_long").toTensor(), h.at("grad_long_count").toTensor(),
        h.at("beta_long").toDouble(), h.at("beta_short").toDouble(), h.at("beta_current").toDouble(), wanted);
    return tensors_of<kNumInputs>({{kInput, wanted[Grad::kInput] ? gi : Tensor()},
                                   {kWeight, wanted[Grad::kWeight] ? gw : Tensor()},
                                   {kBias, wanted[Grad::kBias] ? gb : Tensor()}});
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> streaming_norm_autograd(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& short_stats,
    const Tensor& short_count, const Tensor& long_stats, const Tensor& long_count, const Tensor& grad_short,
    const Tensor& grad_short_count, const Tensor& grad_long, const Tensor& grad_long_count, double alpha_long,
    double alpha_short, double beta_long, double beta_short, double beta_current, double eps) {
  return updating_running_stats<StreamingNorm>(needs_autograd(input, weight, bias), short_stats, short_count, input,
                                               weight, bias, short_stats, short_count, long_stats, long_count,
                                               grad_short, grad_short_count, grad_long, grad_long_count, alpha_long,
                                               alpha_short, beta_long, beta_short, beta_current, eps);
}

}  // namespace
}  // namespace torchnorm::autograd

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) {
  m.impl("streaming_norm", &torchnorm::autograd::streaming_norm_autograd);
}
