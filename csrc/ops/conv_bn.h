// The C++ signatures of the fused convolution + BatchNorm ops (conv_bn_frozen,
// conv_bn_train and their backward ops) and of the internal per-channel ops
// conv_bn_frozen calls (_frozen_bn_affine, _frozen_bn_parameter_grads,
// _conv_weight_channel_dot), for C++ that calls them through ops::handle<>()
// (csrc/ops/handle.h). _conv_weight_channel_scale has no entry: C++ calls its
// function (common/conv_bn_channels.h) directly, only Python goes through the
// op. Schemas, and what each op computes, are in csrc/registration.cpp; the
// composites in csrc/conv_bn.cpp, the internal ops' kernels in
// csrc/{cpu,cuda}/conv_bn.*; autograd in csrc/autograd/conv_bn.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// conv_bn_frozen(input, weight, conv_bias, bn_weight, bn_bias, running_mean,
//                running_var, eps, stride, padding, dilation, groups,
//                transposed, output_padding) -> out
struct ConvBNFrozen {
  static constexpr const char* kName = "torchnorm::conv_bn_frozen";
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
                               const at::Tensor&, double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                               bool, at::IntArrayRef);
};

// conv_bn_frozen_backward(grad_output, input, weight, conv_bias, bn_weight,
//                         running_mean, running_var, eps, stride, padding,
//                         dilation, groups, transposed, output_padding, output_mask)
//   -> (grad_input, grad_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias)
struct ConvBNFrozenBackward {
  static constexpr const char* kName = "torchnorm::conv_bn_frozen_backward";
  // The gradients it returns, which are also the entries of its output_mask.
  enum Grad { kInput, kWeight, kConvBias, kBNWeight, kBNBias, kNumGrads };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double, at::IntArrayRef,
      at::IntArrayRef, at::IntArrayRef, int64_t, bool, at::IntArrayRef, std::array<bool, kNumGrads>);
};

// conv_bn_train(input, weight, conv_bias, bn_weight, bn_bias, running_mean!,
//               running_var!, momentum, eps, activation, negative_slope,
//               residual, stride, padding, dilation, groups, transposed,
//               output_padding) -> (out, mean, rstd)
struct ConvBNTrain {
  static constexpr const char* kName = "torchnorm::conv_bn_train";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
      double, c10::string_view, double, const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
      at::IntArrayRef, int64_t, bool, at::IntArrayRef);
};

// conv_bn_train_backward(grad_output, input, weight, conv_bias, bn_weight,
//                        bn_bias, residual, mean, rstd, activation,
//                        negative_slope, stride, padding, dilation, groups,
//                        transposed, output_padding, output_mask)
//   -> (grad_input, grad_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias, grad_residual)
struct ConvBNTrainBackward {
  static constexpr const char* kName = "torchnorm::conv_bn_train_backward";
  // The gradients it returns, which are also the entries of its output_mask.
  enum Grad { kInput, kWeight, kConvBias, kBNWeight, kBNBias, kResidual, kNumGrads };
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const at::Tensor&, const at::Tensor&, c10::string_view, double, at::IntArrayRef, at::IntArrayRef,
      at::IntArrayRef, int64_t, bool, at::IntArrayRef, std::array<bool, kNumGrads>);
};

// The internal per-channel ops conv_bn_frozen is built from (schemas and
// meaning in csrc/registration.cpp; kernels in csrc/cpu/conv_bn.cpp and
// csrc/cuda/conv_bn.cu).

// _frozen_bn_affine(conv_bias, bn_weight, bn_bias, running_mean, running_var,
//                   eps) -> (scale, shift, inv_std)
struct FrozenBnAffine {
  static constexpr const char* kName = "torchnorm::_frozen_bn_affine";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const at::Tensor&, const at::Tensor&, double);
};

// _frozen_bn_parameter_grads(grad_shift, grad_scale, scale, inv_std,
//                            conv_bias, running_mean, output_mask)
//   -> (grad_conv_bias, grad_bn_weight)
struct FrozenBnParameterGrads {
  static constexpr const char* kName = "torchnorm::_frozen_bn_parameter_grads";
  using Signature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                       const at::Tensor&, const at::Tensor&,
                                                       const std::optional<at::Tensor>&, const at::Tensor&,
                                                       std::array<bool, 2>);
};

// _conv_weight_channel_dot(grad_weight!, weight, scale, groups, transposed) -> dot
struct ConvWeightChannelDot {
  static constexpr const char* kName = "torchnorm::_conv_weight_channel_dot";
  using Signature = at::Tensor(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, bool);
};

}  // namespace torchnorm::ops
