// The C++ signatures of the sequence-norm ops (masked_batch_norm, bn_lstm_layer,
// their backward ops, and the internal per-step kernels _bn_lstm_step and
// _bn_lstm_step_backward), for C++ that calls them through ops::handle<>()
// (csrc/ops/handle.h). Schemas, and what each op computes, are in
// csrc/registration.cpp; the per-device kernels in
// csrc/{cpu,cuda}/sequence_norm.*; the BN-LSTM layer composite in
// csrc/bn_lstm_layer.cpp; autograd in csrc/autograd/sequence_norm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

using OptionalTensor = std::optional<at::Tensor>;

// masked_batch_norm(input, valid, weight, bias, running_mean!, running_var!,
//                   step, training, momentum, eps) -> (out, mean, rstd)
struct MaskedBatchNorm {
  static constexpr const char* kName = "torchnorm::masked_batch_norm";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
      const OptionalTensor&, int64_t, bool, double, double);
};

// masked_batch_norm_backward(grad_output, input, valid, weight, mean, rstd,
//                            training, output_mask) -> (grad_input, grad_weight, grad_bias)
struct MaskedBatchNormBackward {
  static constexpr const char* kName = "torchnorm::masked_batch_norm_backward";
  enum Grad { kInput, kWeight, kBias, kNumGrads };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&,
      const at::Tensor&, bool, std::array<bool, kNumGrads>);
};

// bn_lstm_layer(input_gates, hx, cx, weight_hh, bias, bn_ih_weight,
//               bn_hh_weight, bn_c_weight, bn_c_bias, running_{mean,var}_{ih,hh,c}!,
//               lengths, first_step, training, momentum, eps)
//   -> (output, h_n, c_n, hidden_gates, cells, stats)
struct BNLSTMLayer {
  static constexpr const char* kName = "torchnorm::bn_lstm_layer";
  enum Output { kOutput, kHy, kCy, kHiddenGates, kCells, kStats, kNumOutputs };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
      const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
      const OptionalTensor&, const OptionalTensor&, int64_t, bool, double, double);
};

// bn_lstm_layer_backward(grad_output, grad_hy, grad_cy, input_gates, hx, cx,
//                        weight_hh, bias, bn_ih_weight, bn_hh_weight,
//                        bn_c_weight, bn_c_bias, output, hidden_gates, cells,
//                        stats, lengths, training) -> the gradients below
struct BNLSTMLayerBackward {
  static constexpr const char* kName = "torchnorm::bn_lstm_layer_backward";
  enum Grad {
    kInputGates, kHx, kCx, kWeightHH, kBias, kBNIHWeight, kBNHHWeight, kBNCWeight, kBNCBias, kNumGrads
  };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor>(
      const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const OptionalTensor&, bool);
};

// _bn_lstm_step(input_gates, hidden_gates, cx, bias, bn_ih_weight,
//               bn_hh_weight, bn_c_weight, bn_c_bias, running_{mean,var}_{ih,hh,c}!,
//               step, valid, training, momentum, eps, hy!, cy!, stats!)
struct BNLSTMStep {
  static constexpr const char* kName = "torchnorm::_bn_lstm_step";
  using Signature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                         const OptionalTensor&, const OptionalTensor&, int64_t, const OptionalTensor&, bool, double,
                         double, const at::Tensor&, const at::Tensor&, const at::Tensor&);
};

// _bn_lstm_step_backward(grad_hy, grad_cy, input_gates, hidden_gates, cx, cy,
//                        bias, bn_ih_weight, bn_hh_weight, bn_c_weight,
//                        bn_c_bias, stats, valid, training,
//                        grad_input_gates!, grad_hidden_gates!, grad_cx!, grad_params!)
struct BNLSTMStepBackward {
  static constexpr const char* kName = "torchnorm::_bn_lstm_step_backward";
  using Signature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const OptionalTensor&, bool, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&);
};

}  // namespace torchnorm::ops
