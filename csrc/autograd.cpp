// Autograd for torchnorm's forward ops, for every backend at once (the
// Autograd dispatch key). Each forward saves what its backward op needs and
// the backward calls torchnorm::batch_norm_backward through the dispatcher,
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

namespace torchnorm {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TrainSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, double, double, c10::string_view, double, const optional<Tensor>&);
using EvalSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                             const optional<Tensor>&, double, c10::string_view, double, const optional<Tensor>&);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const Tensor&, const Tensor&, bool, c10::string_view, double, std::array<bool, 4>);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

optional<Tensor> as_optional(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }
Tensor or_undefined(const optional<Tensor>& t) { return t.value_or(Tensor()); }

bool requires_grad(const optional<Tensor>& t) { return t && t->requires_grad(); }

// Saves (input, weight, bias, residual, mean, rstd), the activation, and
// which of input, weight, bias, residual need gradients.
void save_for_grads(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                    const optional<Tensor>& bias, const optional<Tensor>& residual, const Tensor& mean,
                    const Tensor& rstd, c10::string_view activation, double negative_slope) {
  const std::array<bool, 4> grad_wanted{input.requires_grad(), requires_grad(weight), requires_grad(bias),
                                        requires_grad(residual)};
  ctx->save_for_backward({input, or_undefined(weight), or_undefined(bias), or_undefined(residual), mean, rstd});
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["negative_slope"] = negative_slope;
  int64_t wanted_bits = 0;
  for (int i = 0; i < 4; ++i) wanted_bits |= int64_t(grad_wanted[i]) << i;
  ctx->saved_data["grad_wanted"] = wanted_bits;
}

// Gradients (input, weight, bias, residual) through one BatchNorm forward.
std::array<Tensor, 4> batch_norm_grads(AutogradContext* ctx, const Tensor& grad_output, bool training) {
  const auto saved = ctx->get_saved_variables();
  const std::string activation = ctx->saved_data["activation"].toStringRef();
  const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
  const int64_t wanted_bits = ctx->saved_data["grad_wanted"].toInt();
  std::array<bool, 4> wanted;
  for (int i = 0; i < 4; ++i) wanted[i] = (wanted_bits >> i) & 1;
  // Without an activation the residual's gradient is grad_output itself:
  // hand it through instead of having the kernel copy it.
  const bool copy_residual_grad = wanted[3] && activation != "none";
  const std::array<bool, 4> mask{wanted[0], wanted[1], wanted[2], copy_residual_grad};
  std::array<Tensor, 4> grads;
  if (mask[0] || mask[1] || mask[2] || mask[3]) {
    static const auto backward = find_op<BackwardSignature>("torchnorm::batch_norm_backward");
    auto [gi, gw, gb, gr] = backward.call(grad_output, saved[0], as_optional(saved[1]), as_optional(saved[2]),
                                          as_optional(saved[3]), saved[4], saved[5], training, activation,
                                          negative_slope, mask);
    grads = {mask[0] ? gi : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor(), mask[3] ? gr : Tensor()};
  }
  if (wanted[3] && !copy_residual_grad) grads[3] = grad_output;
  return grads;
}

// batch_norm_train(input, weight, bias, running_mean, running_var, momentum,
//                  eps, activation, negative_slope, residual) -> (out, mean, rstd)
struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, double momentum, double eps,
                               c10::string_view activation, double negative_slope, const optional<Tensor>& residual) {
    static const auto op = find_op<TrainSignature>("torchnorm::batch_norm_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] =
        op.call(input, weight, bias, running_mean, running_var, momentum, eps, activation, negative_slope, residual);
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
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& running_mean,
                               const Tensor& running_var, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, double eps, c10::string_view activation,
                               double negative_slope, const optional<Tensor>& residual) {
    static const auto op = find_op<EvalSignature>("torchnorm::batch_norm_eval");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(input, running_mean, running_var, weight, bias, eps, activation, negative_slope, residual);
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

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var, double momentum, double eps,
    c10::string_view activation, double negative_slope, const optional<Tensor>& residual) {
  auto r = BatchNormTrain::apply(input, weight, bias, running_mean, running_var, momentum, eps, activation,
                                 negative_slope, residual);
  // The running statistics were written in place: bump their versions, as
  // the ADInplaceOrView kernel of an ATen in-place op does, so a graph that
  // saved them notices.
  for (const auto* running : {&running_mean, &running_var}) {
    if (*running) (*running)->unsafeGetTensorImpl()->bump_version();
  }
  return {r[0], r[1], r[2]};
}

Tensor batch_norm_eval_autograd(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                                const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                                c10::string_view activation, double negative_slope,
                                const optional<Tensor>& residual) {
  return BatchNormEval::apply(input, running_mean, running_var, weight, bias, eps, activation, negative_slope,
                              residual)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnorm, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
}

}  // namespace torchnorm
