// Autograd of the sequence norms: masked_batch_norm (recurrent and
// sequence-wise BatchNorm), whose backward calls masked_batch_norm_backward,
// and bn_lstm_layer, whose backward calls bn_lstm_layer_backward. The shared
// pieces are in csrc/autograd/common.h.
#include <torch/library.h>

#include <array>

#include "autograd/common.h"
#include "ops/sequence_norm.h"

namespace torchnorm::autograd {
namespace {

struct MaskedBatchNorm : public torch::autograd::Function<MaskedBatchNorm> {
  using Op = ops::MaskedBatchNorm;
  using Grad = ops::MaskedBatchNormBackward::Grad;
  enum Input {
    kInput, kValid, kWeight, kBias, kRunningMean, kRunningVar, kStep, kTraining, kMomentum, kEps, kNumInputs
  };
  enum Saved { kSavedInput, kSavedValid, kSavedWeight, kSavedMean, kSavedRstd, kNumSaved };

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& valid,
                               const optional<Tensor>& weight, const optional<Tensor>& bias,
                               const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
                               int64_t step, bool training, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] =
        ops::handle<Op>().call(input, valid, weight, bias, running_mean, running_var, step, training, momentum, eps);
    ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedInput, input},
                                                  {kSavedValid, or_undefined(valid)},
                                                  {kSavedWeight, or_undefined(weight)},
                                                  {kSavedMean, mean},
                                                  {kSavedRstd, rstd}}));
    ctx->saved_data["training"] = training;
    save_grad_wanted(ctx, mask_of<Grad::kNumGrads>({{Grad::kInput, input.requires_grad()},
                                                    {Grad::kWeight, requires_grad(weight)},
                                                    {Grad::kBias, requires_grad(bias)}}));
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto mask = grad_wanted<Grad::kNumGrads>(ctx);
    if (!any(mask) || !grad_outputs[0].defined()) return variable_list(kNumInputs);
    auto [gi, gw, gb] = ops::handle<ops::MaskedBatchNormBackward>().call(
        grad_outputs[0], saved[kSavedInput], as_optional(saved[kSavedValid]), as_optional(saved[kSavedWeight]),
        saved[kSavedMean], saved[kSavedRstd], ctx->saved_data["training"].toBool(), mask);
    return tensors_of<kNumInputs>({{kInput, mask[Grad::kInput] ? gi : Tensor()},
                                   {kWeight, mask[Grad::kWeight] ? gw : Tensor()},
                                   {kBias, mask[Grad::kBias] ? gb : Tensor()}});
  }
};

struct BNLSTMLayer : public torch::autograd::Function<BNLSTMLayer> {
  using Op = ops::BNLSTMLayer;
  using Out = ops::BNLSTMLayer::Output;
  using Grad = ops::BNLSTMLayerBackward::Grad;
  enum Input {
    kInputGates, kHx, kCx, kWeightHH, kBias, kBNIHWeight, kBNHHWeight, kBNCWeight, kBNCBias,
    kRunningMeanIH, kRunningVarIH, kRunningMeanHH, kRunningVarHH, kRunningMeanC, kRunningVarC,
    kLengths, kFirstStep, kTraining, kMomentum, kEps, kNumInputs
  };
  enum Saved {
    kSavedInputGates, kSavedHx, kSavedCx, kSavedWeightHH, kSavedBias, kSavedBNIHWeight, kSavedBNHHWeight,
    kSavedBNCWeight, kSavedBNCBias, kSavedOutput, kSavedHiddenGates, kSavedCells, kSavedStats, kSavedLengths,
    kNumSaved
  };

  static variable_list forward(AutogradContext* ctx, const Tensor& input_gates, const Tensor& hx, const Tensor& cx,
                               const Tensor& weight_hh, const optional<Tensor>& bias, const Tensor& bn_ih_weight,
                               const Tensor& bn_hh_weight, const Tensor& bn_c_weight, const Tensor& bn_c_bias,
                               const optional<Tensor>& rm_ih, const optional<Tensor>& rv_ih,
                               const optional<Tensor>& rm_hh, const optional<Tensor>& rv_hh,
                               const optional<Tensor>& rm_c, const optional<Tensor>& rv_c,
                               const optional<Tensor>& lengths, int64_t first_step, bool training, double momentum,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, hy, cy, hidden_gates, cells, stats] =
        ops::handle<Op>().call(input_gates, hx, cx, weight_hh, bias, bn_ih_weight, bn_hh_weight, bn_c_weight,
                               bn_c_bias, rm_ih, rv_ih, rm_hh, rv_hh, rm_c, rv_c, lengths, first_step, training,
                               momentum, eps);
    ctx->save_for_backward(tensors_of<kNumSaved>({{kSavedInputGates, input_gates},
                                                  {kSavedHx, hx},
                                                  {kSavedCx, cx},
                                                  {kSavedWeightHH, weight_hh},
                                                  {kSavedBias, or_undefined(bias)},
                                                  {kSavedBNIHWeight, bn_ih_weight},
                                                  {kSavedBNHHWeight, bn_hh_weight},
                                                  {kSavedBNCWeight, bn_c_weight},
                                                  {kSavedBNCBias, bn_c_bias},
                                                  {kSavedOutput, output},
                                                  {kSavedHiddenGates, hidden_gates},
                                                  {kSavedCells, cells},
                                                  {kSavedStats, stats},
                                                  {kSavedLengths, or_undefined(lengths)}}));
    ctx->saved_data["training"] = training;
    ctx->mark_non_differentiable({hidden_gates, cells, stats});
    // Absent gradients stay undefined (the backward op takes them as None):
    // zeros for the non-differentiable outputs alone would be a (T, N, 4H) fill.
    ctx->set_materialize_grads(false);
    return {output, hy, cy, hidden_gates, cells, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    auto grads = ops::handle<ops::BNLSTMLayerBackward>().call(
        as_optional(grad_outputs[Out::kOutput]), as_optional(grad_outputs[Out::kHy]),
        as_optional(grad_outputs[Out::kCy]), s[kSavedInputGates], s[kSavedHx], s[kSavedCx], s[kSavedWeightHH],
        as_optional(s[kSavedBias]), s[kSavedBNIHWeight], s[kSavedBNHHWeight], s[kSavedBNCWeight], s[kSavedBNCBias],
        s[kSavedOutput], s[kSavedHiddenGates], s[kSavedCells], s[kSavedStats], as_optional(s[kSavedLengths]),
        ctx->saved_data["training"].toBool());
    const bool has_bias = s[kSavedBias].defined();
    return tensors_of<kNumInputs>({{kInputGates, std::get<Grad::kInputGates>(grads)},
                                   {kHx, std::get<Grad::kHx>(grads)},
                                   {kCx, std::get<Grad::kCx>(grads)},
                                   {kWeightHH, std::get<Grad::kWeightHH>(grads)},
                                   {kBias, has_bias ? std::get<Grad::kBias>(grads) : Tensor()},
                                   {kBNIHWeight, std::get<Grad::kBNIHWeight>(grads)},
                                   {kBNHHWeight, std::get<Grad::kBNHHWeight>(grads)},
                                   {kBNCWeight, std::get<Grad::kBNCWeight>(grads)},
                                   {kBNCBias, std::get<Grad::kBNCBias>(grads)}});
  }
};

std::tuple<Tensor, Tensor, Tensor> masked_batch_norm_autograd(const Tensor& input, const optional<Tensor>& valid,
                                                              const optional<Tensor>& weight,
                                                              const optional<Tensor>& bias,
                                                              const optional<Tensor>& running_mean,
                                                              const optional<Tensor>& running_var, int64_t step,
                                                              bool training, double momentum, double eps) {
  const bool record = needs_autograd(input, weight, bias);
  if (!training) {
    return run_forward<MaskedBatchNorm>(record, input, valid, weight, bias, running_mean, running_var, step, training,
                                        momentum, eps);
  }
  return updating_running_stats<MaskedBatchNorm>(record, running_mean, running_var, input, valid, weight, bias,
                                                 running_mean, running_var, step, training, momentum, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_lstm_layer_autograd(
    const Tensor& input_gates, const Tensor& hx, const Tensor& cx, const Tensor& weight_hh,
    const optional<Tensor>& bias, const Tensor& bn_ih_weight, const Tensor& bn_hh_weight, const Tensor& bn_c_weight,
    const Tensor& bn_c_bias, const optional<Tensor>& rm_ih, const optional<Tensor>& rv_ih,
    const optional<Tensor>& rm_hh, const optional<Tensor>& rv_hh, const optional<Tensor>& rm_c,
    const optional<Tensor>& rv_c, const optional<Tensor>& lengths, int64_t first_step, bool training,
    double momentum, double eps) {
  const bool record =
      needs_autograd(input_gates, hx, cx, weight_hh, bias, bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias);
  auto result = run_forward<BNLSTMLayer>(record, input_gates, hx, cx, weight_hh, bias, bn_ih_weight, bn_hh_weight,
                                         bn_c_weight, bn_c_bias, rm_ih, rv_ih, rm_hh, rv_hh, rm_c, rv_c, lengths,
                                         first_step, training, momentum, eps);
  if (training) {
    bump_versions(rm_ih, rv_ih);
    bump_versions(rm_hh, rv_hh);
    bump_versions(rm_c, rv_c);
  }
  return result;
}

}  // namespace
}  // namespace torchnorm::autograd

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) {
  m.impl("masked_batch_norm", &torchnorm::autograd::masked_batch_norm_autograd);
  m.impl("bn_lstm_layer", &torchnorm::autograd::bn_lstm_layer_autograd);
}
