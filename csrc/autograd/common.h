// What every autograd Function of torchnorm shares: whether a call needs
// recording at all (the no-grad fast path), the grad-wanted masks a forward
// saves for its backward, the named slots gradients are handed back in, the
// residual gradient handed through, and forwards that update running
// statistics in place. The Functions themselves are in the other files of
// this folder, one per op family, each registering its ops' kernels for the
// Autograd dispatch key (every backend at once). Each forward saves what its
// backward op needs and the backward calls that op (torchnorm::*_backward)
// through the dispatcher, so autograd, torch.fx, torch.compile and
// torch.export all see plain ops.
//
// Autograd lives in C++ rather than in Python (torch.library.register_autograd)
// because the Python path cost about 0.1 ms per forward and as much again per
// backward (measured on a tiny tensor: 366 us vs ATen's 106 us per training
// step), which is more than a whole BatchNorm kernel on a GPU; and because
// register_autograd refuses ops that mutate, as batch_norm_train does.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/autograd.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "ops/handle.h"

namespace torchnorm::autograd {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline optional<Tensor> as_optional(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }
inline Tensor or_undefined(const optional<Tensor>& t) { return t.value_or(Tensor()); }

inline bool requires_grad(const optional<Tensor>& t) { return t && t->requires_grad(); }

// ------------------------------------------------- what needs recording --

// Whether autograd has anything to record for an input: it requires grad
// under grad mode, or it carries a forward-mode tangent.
inline bool tracked(const Tensor& t) {
  return t.defined() && ((at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined());
}
inline bool tracked(const optional<Tensor>& t) { return t && tracked(*t); }

// Inference (no input tracked) skips the autograd Function: its node and
// context cost about 6 us a call, more than a small tensor's whole kernel.
// The kernels then call the op below autograd directly (run_forward).
template <typename... Inputs>
bool needs_autograd(const Inputs&... inputs) {
  return (tracked(inputs) || ...);
}

// What an op of signature R(Args...) returns: R.
template <typename Signature>
struct ReturnOf;
template <typename R, typename... Args>
struct ReturnOf<R(Args...)> {
  using type = R;
};

// A Function's outputs (a variable_list) as its op returns them: one tensor
// or a tuple of tensors.
template <typename Result>
Result as_result(const variable_list& outputs) {
  if constexpr (std::is_same_v<Result, Tensor>) {
    return outputs[0];
  } else {
    Result result;
    std::apply([&](auto&... out) {
      size_t i = 0;
      ((out = outputs[i++]), ...);
    }, result);
    return result;
  }
}

// The forward of F, an autograd Function whose F::Op (csrc/ops/*.h) is the op
// it wraps: through F, which records a node, when `record`, else the op below
// autograd.
template <typename F, typename... Args>
typename ReturnOf<typename F::Op::Signature>::type run_forward(bool record, const Args&... args) {
  using Result = typename ReturnOf<typename F::Op::Signature>::type;
  if (record) return as_result<Result>(F::apply(args...));
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::handle<typename F::Op>().call(args...);
}

// ------------------------------------------------ running statistics --

// The running statistics were written in place: bump their versions, as the
// ADInplaceOrView kernel of an ATen in-place op does, so a graph that saved
// them notices.
inline void bump_versions(const optional<Tensor>& running_mean, const optional<Tensor>& running_var) {
  for (const auto* running : {&running_mean, &running_var}) {
    if (*running) (*running)->unsafeGetTensorImpl()->bump_version();
  }
}

// run_forward for an op that updates the running statistics in place
// (batch_norm_train, instance_norm, conv_bn_train): the statistics' versions
// are bumped whether or not a node was recorded.
template <typename F, typename... Args>
typename ReturnOf<typename F::Op::Signature>::type updating_running_stats(bool record,
                                                                          const optional<Tensor>& running_mean,
                                                                          const optional<Tensor>& running_var,
                                                                          const Args&... args) {
  auto result = run_forward<F>(record, args...);
  bump_versions(running_mean, running_var);
  return result;
}

// ---------------------------------------------------- named slots --

// An N-entry mask with each given bit at its named slot (an enum value) and
// false elsewhere.
template <size_t N>
std::array<bool, N> mask_of(std::initializer_list<std::pair<int, bool>> bits) {
  std::array<bool, N> mask{};
  for (const auto& [slot, bit] : bits) mask[slot] = bit;
  return mask;
}

template <size_t N>
bool any(const std::array<bool, N>& mask) {
  for (bool bit : mask) {
    if (bit) return true;
  }
  return false;
}

// N tensors with each given one at its named slot and undefined tensors
// elsewhere. As a backward's result (N: the forward's number of inputs), an
// undefined tensor is "no gradient for this input".
template <size_t N>
variable_list tensors_of(std::initializer_list<std::pair<int, Tensor>> tensors) {
  variable_list list(N);
  for (const auto& [slot, tensor] : tensors) list[slot] = tensor;
  return list;
}

// ------------------------------------------------- grad-wanted masks --

// A forward saves which gradients its backward must compute, as a mask in
// the order of its backward op's outputs (that op's output_mask); the
// backward reads it back with grad_wanted.
template <size_t N>
void save_grad_wanted(AutogradContext* ctx, const std::array<bool, N>& wanted) {
  int64_t bits = 0;
  for (size_t i = 0; i < N; ++i) bits |= int64_t(wanted[i]) << i;
  ctx->saved_data["grad_wanted"] = bits;
}

template <size_t N>
std::array<bool, N> grad_wanted(AutogradContext* ctx) {
  const int64_t bits = ctx->saved_data["grad_wanted"].toInt();
  std::array<bool, N> wanted;
  for (size_t i = 0; i < N; ++i) wanted[i] = (bits >> i) & 1;
  return wanted;
}

// Without an activation the residual's gradient is grad_output itself: the
// backward hands it through instead of having the kernel copy it.
inline bool hands_residual_grad_through(bool wanted, const std::string& activation) {
  return wanted && activation == "none";
}

}  // namespace torchnorm::autograd
