// Autograd for torchnorm's forward ops, for every backend at once (the
// Autograd dispatch key). Each forward saves what its backward op needs and
// the backward calls its backward op (torchnorm::*_backward) through the dispatcher,
// so autograd, torch.fx, torch.compile and torch.export all see plain ops.
//
// This lives in C++ rather than in Python (torch.library.register_autograd)
// because the Python path cost about 0.1 ms per forward and as much again per
// backward (measured on a tiny tensor: 366 us vs ATen's 106 us per training
// step), which is more than a whole BatchNorm kernel on a GPU; and because
// register_autograd refuses ops that mutate, as batch_norm_train does.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/op_handles.h"

namespace torchnorm {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TrainSignature = BatchNormTrainSignature;
using EvalSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                             const optional<Tensor>&, double, c10::string_view, double, const optional<Tensor>&);
using BackwardSignature = BatchNormBackwardSignature;

optional<Tensor> as_optional(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }
Tensor or_undefined(const optional<Tensor>& t) { return t.value_or(Tensor()); }

bool requires_grad(const optional<Tensor>& t) { return t && t->requires_grad(); }

// Whether autograd has anything to record for an input: it requires grad
// under grad mode, or it carries a forward-mode tangent.
bool tracked(const Tensor& t) {
  return t.defined() && ((at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined());
}
bool tracked(const optional<Tensor>& t) { return t && tracked(*t); }

// Inference (no input tracked) skips the autograd Function: its node and
// context cost about 6 us a call, more than a small tensor's whole kernel.
// The wrappers then call the op below autograd directly.
template <typename... Inputs>
bool needs_autograd(const Inputs&... inputs) {
  return (tracked(inputs) || ...);
}

// The bits of ctx->saved_data["grad_wanted"] (bit i: input i needs a gradient).
template <size_t N>
std::array<bool, N> grad_wanted(AutogradContext* ctx) {
  const int64_t bits = ctx->saved_data["grad_wanted"].toInt();
  std::array<bool, N> wanted;
  for (size_t i = 0; i < N; ++i) wanted[i] = (bits >> i) & 1;
  return wanted;
}

// Stores which inputs need gradients (bit i: input i), for grad_wanted.
void save_grad_wanted(AutogradContext* ctx, std::initializer_list<bool> wanted) {
  int64_t bits = 0, i = 0;
  for (bool w : wanted) bits |= int64_t(w) << i++;
  ctx->saved_data["grad_wanted"] = bits;
}

// Without an activation the residual's gradient is grad_output itself: the
// backward hands it through instead of having the kernel copy it.
bool hands_residual_grad_through(bool wanted, const std::string& activation) {
  return wanted && activation == "none";
}

// Saves (input, weight, bias, residual, mean, rstd), the activation, and
// which of input, weight, bias, residual need gradients.
void save_for_grads(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                    const optional<Tensor>& bias, const optional<Tensor>& residual, const Tensor& mean,
                    const Tensor& rstd, c10::string_view activation, double negative_slope) {
  ctx->save_for_backward({input, or_undefined(weight), or_undefined(bias), or_undefined(residual), mean, rstd});
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["negative_slope"] = negative_slope;
  save_grad_wanted(ctx, {input.requires_grad(), requires_grad(weight), requires_grad(bias), requires_grad(residual)});
}

// Gradients (input, weight, bias, residual) through one BatchNorm forward.
std::array<Tensor, 4> batch_norm_grads(AutogradContext* ctx, const Tensor& grad_output, bool training) {
  const auto saved = ctx->get_saved_variables();
  const std::string activation = ctx->saved_data["activation"].toStringRef();
  const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
  const std::array<bool, 4> wanted = grad_wanted<4>(ctx);
  const bool pass_residual_grad = hands_residual_grad_through(wanted[3], activation);
  const std::array<bool, 4> mask{wanted[0], wanted[1], wanted[2], wanted[3] && !pass_residual_grad};
  std::array<Tensor, 4> grads;
  if (mask[0] || mask[1] || mask[2] || mask[3]) {
    static const auto backward = find_op<BackwardSignature>("torchnorm::batch_norm_backward");
    auto [gi, gw, gb, gr] = backward.call(grad_output, saved[0], as_optional(saved[1]), as_optional(saved[2]),
                                          as_optional(saved[3]), saved[4], saved[5], training, activation,
                                          negative_slope, mask);
    grads = {mask[0] ? gi : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor(), mask[3] ? gr : Tensor()};
  }
  if (pass_residual_grad) grads[3] = grad_output;
  return grads;
}

// batch_norm_train(input, weight, bias, running_mean, running_var, momentum,
//                  eps, activation, negative_slope, residual) -> (out, mean, rstd)
struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  // The op below autograd, looked up once.
  static const c10::TypedOperatorHandle<TrainSignature>& op() {
    static const auto handle = find_op<TrainSignature>("torchnorm::batch_norm_train");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, double momentum, double eps,
                               c10::string_view activation, double negative_slope, const optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] =
        op().call(input, weight, bias, running_mean, running_var, momentum, eps, activation, negative_slope, residual);
    save_for_grads(ctx, input, weight, bias, residual, mean, rstd, activation, negative_slope);
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [gi, gw, gb, gr] = batch_norm_grads(ctx, grads[0], /*training=*/true);
    return {gi, gw, gb, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), gr};
  }
};

// batch_norm_eval(input, running_mean, running_var, weight, bias, eps,
//                 activation, negative_slope, residual) -> out
struct BatchNormEval : public torch::autograd::Function<BatchNormEval> {
  // The op below autograd, looked up once.
  static const c10::TypedOperatorHandle<EvalSignature>& op() {
    static const auto handle = find_op<EvalSignature>("torchnorm::batch_norm_eval");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& running_mean,
                               const Tensor& running_var, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, double eps, c10::string_view activation,
                               double negative_slope, const optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op().call(input, running_mean, running_var, weight, bias, eps, activation, negative_slope, residual);
    // Copies: the running statistics may change before the backward runs.
    const auto stats_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor mean = running_mean.to(stats_type, /*non_blocking=*/false, /*copy=*/true);
    Tensor rstd = running_var.to(stats_type, /*non_blocking=*/false, /*copy=*/true).add_(eps).rsqrt_();
    save_for_grads(ctx, input, weight, bias, residual, mean, rstd, activation, negative_slope);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [gi, gw, gb, gr] = batch_norm_grads(ctx, grads[0], /*training=*/false);
    return {gi, Tensor(), Tensor(), gw, gb, Tensor(), Tensor(), Tensor(), gr};
  }
};

// The running statistics were written in place: bump their versions, as the
// ADInplaceOrView kernel of an ATen in-place op does, so a graph that saved
// them notices.
void bump_versions(const optional<Tensor>& running_mean, const optional<Tensor>& running_var) {
  for (const auto* running : {&running_mean, &running_var}) {
    if (*running) (*running)->unsafeGetTensorImpl()->bump_version();
  }
}

// A forward F (an autograd Function with op()) that returns (out, mean,
// rstd) and updates the running statistics in place: the op below autograd
// where no input is tracked, else the Function; the statistics' versions are
// bumped either way.
template <typename F, typename... Args>
std::tuple<Tensor, Tensor, Tensor> updating_running_stats(bool tracked, const optional<Tensor>& running_mean,
                                                          const optional<Tensor>& running_var, const Args&... args) {
  std::tuple<Tensor, Tensor, Tensor> r;
  if (tracked) {
    const variable_list v = F::apply(args...);
    r = {v[0], v[1], v[2]};
  } else {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = F::op().call(args...);
  }
  bump_versions(running_mean, running_var);
  return r;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var, double momentum, double eps,
    c10::string_view activation, double negative_slope, const optional<Tensor>& residual) {
  return updating_running_stats<BatchNormTrain>(needs_autograd(input, weight, bias, residual), running_mean,
                                                running_var, input, weight, bias, running_mean, running_var,
                                                momentum, eps, activation, negative_slope, residual);
}

Tensor batch_norm_eval_autograd(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                                const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                                c10::string_view activation, double negative_slope,
                                const optional<Tensor>& residual) {
  if (!needs_autograd(input, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return BatchNormEval::op().call(input, running_mean, running_var, weight, bias, eps, activation, negative_slope,
                                    residual);
  }
  return BatchNormEval::apply(input, running_mean, running_var, weight, bias, eps, activation, negative_slope,
                              residual)[0];
}

// ------------------------------------------------------ per-sample norms --

using LayerNormSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, at::IntArrayRef, const optional<Tensor>&, const optional<Tensor>&, double, const optional<Tensor>&);
using RmsNormSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, at::IntArrayRef, const optional<Tensor>&,
                                                            optional<double>, const optional<Tensor>&);
using LayerNormBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const optional<Tensor>&, const Tensor&, at::IntArrayRef, const optional<Tensor>&, const Tensor&,
    const optional<Tensor>&, std::array<bool, 3>);
using GroupNormSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, const optional<Tensor>&,
                                                              const optional<Tensor>&, double, c10::string_view,
                                                              double);
using GroupNormBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, c10::string_view, double, std::array<bool, 3>);
using InstanceNormSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const optional<Tensor>&,
                                                                 const optional<Tensor>&, const optional<Tensor>&,
                                                                 const optional<Tensor>&, double, double);

// LayerNorm (mean defined) and RMSNorm (mean undefined): saves the tensor that
// was normalized (the sum when a residual was fused), the statistics and the
// weight. Returns (grad of input, grad_weight, grad_bias); the residual's
// gradient is the input's.
void save_row_norm(AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
                   const optional<Tensor>& weight, const optional<Tensor>& bias, const optional<Tensor>& residual,
                   const Tensor& normalized, const Tensor& mean, const Tensor& rstd) {
  ctx->save_for_backward({normalized, or_undefined(weight), mean, rstd});
  ctx->saved_data["normalized_shape"] = normalized_shape.vec();
  ctx->saved_data["has_residual"] = residual.has_value();
  save_grad_wanted(ctx, {input.requires_grad() || requires_grad(residual), requires_grad(weight), requires_grad(bias)});
}

std::array<Tensor, 3> row_norm_grads(AutogradContext* ctx, const variable_list& grads) {
  const auto saved = ctx->get_saved_variables();
  const auto normalized_shape = ctx->saved_data["normalized_shape"].toIntVector();
  const std::array<bool, 3> mask = grad_wanted<3>(ctx);
  if (!(mask[0] || mask[1] || mask[2])) return {};
  const optional<Tensor> grad_sum =
      ctx->saved_data["has_residual"].toBool() ? as_optional(grads[1]) : std::nullopt;
  static const auto backward = find_op<LayerNormBackwardSignature>("torchnorm::layer_norm_backward");
  auto [gi, gw, gb] = backward.call(grads[0], grad_sum, saved[0], normalized_shape, as_optional(saved[2]), saved[3],
                                    as_optional(saved[1]), mask);
  return {mask[0] ? gi : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor()};
}

// layer_norm(input, normalized_shape, weight, bias, eps, residual) -> (out, sum, mean, rstd)
struct LayerNorm : public torch::autograd::Function<LayerNorm> {
  // The op below autograd, looked up once.
  static const c10::TypedOperatorHandle<LayerNormSignature>& op() {
    static const auto handle = find_op<LayerNormSignature>("torchnorm::layer_norm");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
                               const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                               const optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, sum, mean, rstd] = op().call(input, normalized_shape, weight, bias, eps, residual);
    save_row_norm(ctx, input, normalized_shape, weight, bias, residual, residual ? sum : input, mean, rstd);
    ctx->mark_non_differentiable(residual ? variable_list{mean, rstd} : variable_list{sum, mean, rstd});
    return {out, sum, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [gi, gw, gb] = row_norm_grads(ctx, grads);
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    return {gi, Tensor(), gw, gb, Tensor(), has_residual ? gi : Tensor()};
  }
};

// rms_norm(input, normalized_shape, weight, eps, residual) -> (out, sum, rstd)
struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  // The op below autograd, looked up once.
  static const c10::TypedOperatorHandle<RmsNormSignature>& op() {
    static const auto handle = find_op<RmsNormSignature>("torchnorm::rms_norm");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
                               const optional<Tensor>& weight, optional<double> eps,
                               const optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, sum, rstd] = op().call(input, normalized_shape, weight, eps, residual);
    save_row_norm(ctx, input, normalized_shape, weight, std::nullopt, residual, residual ? sum : input, Tensor(),
                  rstd);
    ctx->mark_non_differentiable(residual ? variable_list{rstd} : variable_list{sum, rstd});
    return {out, sum, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [gi, gw, gb] = row_norm_grads(ctx, grads);
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    return {gi, Tensor(), gw, Tensor(), has_residual ? gi : Tensor()};
  }
};

// Saves what group_norm_backward needs; shared by GroupNorm and InstanceNorm.
void save_group_norm(AutogradContext* ctx, const Tensor& input, int64_t num_groups, const optional<Tensor>& weight,
                     const optional<Tensor>& bias, const Tensor& mean, const Tensor& rstd,
                     c10::string_view activation, double negative_slope) {
  ctx->save_for_backward({input, or_undefined(weight), or_undefined(bias), mean, rstd});
  ctx->saved_data["num_groups"] = num_groups;
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["negative_slope"] = negative_slope;
  save_grad_wanted(ctx, {input.requires_grad(), requires_grad(weight), requires_grad(bias)});
}

std::array<Tensor, 3> group_norm_grads(AutogradContext* ctx, const Tensor& grad_output) {
  const auto saved = ctx->get_saved_variables();
  const std::array<bool, 3> mask = grad_wanted<3>(ctx);
  if (!(mask[0] || mask[1] || mask[2])) return {};
  static const auto backward = find_op<GroupNormBackwardSignature>("torchnorm::group_norm_backward");
  auto [gi, gw, gb] = backward.call(grad_output, saved[0], ctx->saved_data["num_groups"].toInt(), saved[3], saved[4],
                                    as_optional(saved[1]), as_optional(saved[2]),
                                    ctx->saved_data["activation"].toStringRef(),
                                    ctx->saved_data["negative_slope"].toDouble(), mask);
  return {mask[0] ? gi : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor()};
}

// group_norm(input, num_groups, weight, bias, eps, activation, negative_slope) -> (out, mean, rstd)
struct GroupNorm : public torch::autograd::Function<GroupNorm> {
  // The op below autograd, looked up once.
  static const c10::TypedOperatorHandle<GroupNormSignature>& op() {
    static const auto handle = find_op<GroupNormSignature>("torchnorm::group_norm");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, int64_t num_groups,
                               const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                               c10::string_view activation, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = op().call(input, num_groups, weight, bias, eps, activation, negative_slope);
    save_group_norm(ctx, input, num_groups, weight, bias, mean, rstd, activation, negative_slope);
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [gi, gw, gb] = group_norm_grads(ctx, grads[0]);
    return {gi, Tensor(), gw, gb, Tensor(), Tensor(), Tensor()};
  }
};

// instance_norm(input, weight, bias, running_mean, running_var, momentum, eps) -> (out, mean, rstd)
struct InstanceNorm : public torch::autograd::Function<InstanceNorm> {
  // The op below autograd, looked up once.
  static const c10::TypedOperatorHandle<InstanceNormSignature>& op() {
    static const auto handle = find_op<InstanceNormSignature>("torchnorm::instance_norm");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = op().call(input, weight, bias, running_mean, running_var, momentum, eps);
    save_group_norm(ctx, input, input.size(1), weight, bias, mean, rstd, "none", 0.0);
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [gi, gw, gb] = group_norm_grads(ctx, grads[0]);
    return {gi, gw, gb, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                                                               const optional<Tensor>& weight,
                                                               const optional<Tensor>& bias, double eps,
                                                               const optional<Tensor>& residual) {
  if (!needs_autograd(input, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return LayerNorm::op().call(input, normalized_shape, weight, bias, eps, residual);
  }
  auto r = LayerNorm::apply(input, normalized_shape, weight, bias, eps, residual);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                                                     const optional<Tensor>& weight, optional<double> eps,
                                                     const optional<Tensor>& residual) {
  if (!needs_autograd(input, weight, residual)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return RmsNorm::op().call(input, normalized_shape, weight, eps, residual);
  }
  auto r = RmsNorm::apply(input, normalized_shape, weight, eps, residual);
  return {r[0], r[1], r[2]};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_autograd(const Tensor& input, int64_t num_groups,
                                                       const optional<Tensor>& weight, const optional<Tensor>& bias,
                                                       double eps, c10::string_view activation,
                                                       double negative_slope) {
  if (!needs_autograd(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return GroupNorm::op().call(input, num_groups, weight, bias, eps, activation, negative_slope);
  }
  auto r = GroupNorm::apply(input, num_groups, weight, bias, eps, activation, negative_slope);
  return {r[0], r[1], r[2]};
}

std::tuple<Tensor, Tensor, Tensor> instance_norm_autograd(const Tensor& input, const optional<Tensor>& weight,
                                                          const optional<Tensor>& bias,
                                                          const optional<Tensor>& running_mean,
                                                          const optional<Tensor>& running_var, double momentum,
                                                          double eps) {
  return updating_running_stats<InstanceNorm>(needs_autograd(input, weight, bias), running_mean, running_var, input,
                                              weight, bias, running_mean, running_var, momentum, eps);
}

// ------------------------------------------------------ conv + frozen BN --

using ConvBNFrozenSignature = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                     const optional<Tensor>&, const Tensor&, const Tensor&, double, at::IntArrayRef,
                                     at::IntArrayRef, at::IntArrayRef, int64_t, bool, at::IntArrayRef);
using ConvBNFrozenBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
    const Tensor&, double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool, at::IntArrayRef,
    std::array<bool, 5>);

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

// conv_bn_frozen(input, weight, conv_bias, bn_weight, bn_bias, running_mean,
//                running_var, eps, stride, padding, dilation, groups,
//                transposed, output_padding) -> out
// Saves the conv input, the parameters and the (frozen) running statistics.
struct ConvBNFrozen : public torch::autograd::Function<ConvBNFrozen> {
  // The op below autograd, looked up once.
  static const c10::TypedOperatorHandle<ConvBNFrozenSignature>& op() {
    static const auto handle = find_op<ConvBNFrozenSignature>("torchnorm::conv_bn_frozen");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const optional<Tensor>& conv_bias, const optional<Tensor>& bn_weight,
                               const optional<Tensor>& bn_bias, const Tensor& running_mean,
                               const Tensor& running_var, double eps, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool transposed,
                               at::IntArrayRef output_padding) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op().call(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride,
                           padding, dilation, groups, transposed, output_padding);
    ctx->save_for_backward({input, weight, or_undefined(conv_bias), or_undefined(bn_weight), running_mean,
                            running_var});
    ctx->saved_data["eps"] = eps;
    save_conv_args(ctx, stride, padding, dilation, groups, transposed, output_padding);
    save_grad_wanted(ctx, {input.requires_grad(), weight.requires_grad(), requires_grad(conv_bias),
                           requires_grad(bn_weight), requires_grad(bn_bias)});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 5> mask = grad_wanted<5>(ctx);
    variable_list result(14);
    if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) return result;
    static const auto backward = find_op<ConvBNFrozenBackwardSignature>("torchnorm::conv_bn_frozen_backward");
    const SavedConv conv(ctx);
    auto [gi, gw, gcb, gbw, gbb] = backward.call(grads[0], saved[0], saved[1], as_optional(saved[2]),
                                                 as_optional(saved[3]), saved[4], saved[5],
                                                 ctx->saved_data["eps"].toDouble(), conv.stride, conv.padding,
                                                 conv.dilation, conv.groups, conv.transposed, conv.output_padding,
                                                 mask);
    const std::array<Tensor, 5> all{gi, gw, gcb, gbw, gbb};
    for (int i = 0; i < 5; ++i) {
      if (mask[i]) result[i] = all[i];
    }
    return result;
  }
};

Tensor conv_bn_frozen_autograd(const Tensor& input, const Tensor& weight, const optional<Tensor>& conv_bias,
                               const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias,
                               const Tensor& running_mean, const Tensor& running_var, double eps,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool transposed, at::IntArrayRef output_padding) {
  if (!needs_autograd(input, weight, conv_bias, bn_weight, bn_bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ConvBNFrozen::op().call(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                   stride, padding, dilation, groups, transposed, output_padding);
  }
  return ConvBNFrozen::apply(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride,
                             padding, dilation, groups, transposed, output_padding)[0];
}


// ------------------------------------------------------ conv + training BN --

using ConvBNTrainSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, double, double, c10::string_view, double,
    const optional<Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool, at::IntArrayRef);
using ConvBNTrainBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, const Tensor&, const Tensor&, c10::string_view, double,
    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool, at::IntArrayRef, std::array<bool, 6>);

// conv_bn_train(input, weight, conv_bias, bn_weight, bn_bias, running_mean,
//               running_var, momentum, eps, activation, negative_slope,
//               residual, stride, padding, dilation, groups, transposed,
//               output_padding) -> (out, mean, rstd)
// Saves the conv input, the parameters, the residual and the batch
// statistics: not the conv output, which backward recomputes.
struct ConvBNTrain : public torch::autograd::Function<ConvBNTrain> {
  // Where each gradient of conv_bn_train_backward goes among the inputs.
  static constexpr std::array<int, 6> kGradInputIndex{0, 1, 2, 3, 4, 11};

  // The op below autograd, looked up once.
  static const c10::TypedOperatorHandle<ConvBNTrainSignature>& op() {
    static const auto handle = find_op<ConvBNTrainSignature>("torchnorm::conv_bn_train");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const optional<Tensor>& conv_bias, const optional<Tensor>& bn_weight,
                               const optional<Tensor>& bn_bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, double momentum, double eps,
                               c10::string_view activation, double negative_slope, const optional<Tensor>& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool transposed, at::IntArrayRef output_padding) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = op().call(input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                       momentum, eps, activation, negative_slope, residual, stride, padding,
                                       dilation, groups, transposed, output_padding);
    ctx->save_for_backward({input, weight, or_undefined(conv_bias), or_undefined(bn_weight), or_undefined(bn_bias),
                            or_undefined(residual), mean, rstd});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    save_conv_args(ctx, stride, padding, dilation, groups, transposed, output_padding);
    save_grad_wanted(ctx, {input.requires_grad(), weight.requires_grad(), requires_grad(conv_bias),
                           requires_grad(bn_weight), requires_grad(bn_bias), requires_grad(residual)});
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 6> wanted = grad_wanted<6>(ctx);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const bool pass_residual_grad = hands_residual_grad_through(wanted[5], activation);
    std::array<bool, 6> mask = wanted;
    mask[5] = wanted[5] && !pass_residual_grad;
    variable_list result(18);
    if (mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5]) {
      static const auto backward = find_op<ConvBNTrainBackwardSignature>("torchnorm::conv_bn_train_backward");
      const SavedConv conv(ctx);
      auto [gi, gw, gcb, gbw, gbb, gr] = backward.call(
          grads[0], saved[0], saved[1], as_optional(saved[2]), as_optional(saved[3]), as_optional(saved[4]),
          as_optional(saved[5]), saved[6], saved[7], activation, ctx->saved_data["negative_slope"].toDouble(),
          conv.stride, conv.padding, conv.dilation, conv.groups, conv.transposed, conv.output_padding, mask);
      const std::array<Tensor, 6> all{gi, gw, gcb, gbw, gbb, gr};
      for (int i = 0; i < 6; ++i) {
        if (mask[i]) result[kGradInputIndex[i]] = all[i];
      }
    }
    if (pass_residual_grad) result[kGradInputIndex[5]] = grads[0];
    return result;
  }
};

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

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("group_norm", &group_norm_autograd);
  m.impl("instance_norm", &instance_norm_autograd);
  m.impl("conv_bn_frozen", &conv_bn_frozen_autograd);
  m.impl("conv_bn_train", &conv_bn_train_autograd);
}

}  // namespace torchnorm
