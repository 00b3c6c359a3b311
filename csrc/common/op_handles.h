// Typed handles of torchnorm's ops, for C++ that calls one op from another
// (the autograd wrappers, the conv + BatchNorm ops) through the dispatcher,
// so each call reaches the kernel of its tensors' device.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchnorm {

using BatchNormTrainSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double, c10::string_view, double,
    const std::optional<at::Tensor>&);
using BatchNormBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, bool, c10::string_view, double,
    std::array<bool, 4>);
// conv_bn_frozen's internal per-channel ops (csrc/registration.cpp).
using FrozenBnAffineSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, double);
using FrozenBnParameterGradsSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, std::array<bool, 2>);
using ConvWeightChannelDotSignature = at::Tensor(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 int64_t, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace torchnorm
