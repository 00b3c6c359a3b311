#include "common/cpu_products.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torchnorm {
namespace {

using at::Tensor;

// oneDNN's linear op and its weight packing, when this torch has them.
struct OneDnnOps {
  std::optional<c10::OperatorHandle> linear, reorder;
};

const OneDnnOps& onednn() {
  static const OneDnnOps ops{c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""}),
                             c10::Dispatcher::singleton().findOp({"mkldnn::_reorder_linear_weight", ""})};
  return ops;
}

bool takes_onednn_path(const Tensor& input, const Tensor& weight) {
  return input.device().is_cpu() && input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
         input.numel() > 0 && weight.numel() > 0 && at::hasMKLDNN() && onednn().linear && onednn().reorder;
}

// oneDNN's input @ weight.T + bias; weight (out, in) contiguous or packed.
Tensor onednn_linear(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  torch::jit::Stack stack{input.contiguous(), weight, bias ? c10::IValue(*bias) : c10::IValue(), c10::IValue("none"),
                          c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue("")};
  onednn().linear->callBoxed(stack);
  return stack.at(0).toTensor();
}

}  // namespace

Tensor linear_product(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  const bool bias_ok = !bias || (bias->device().is_cpu() && bias->scalar_type() == at::kFloat);
  if (!takes_onednn_path(input, weight) || !bias_ok) return at::linear(input, weight, bias);
  return onednn_linear(input, weight.contiguous(), bias ? std::optional<Tensor>(bias->contiguous()) : std::nullopt);
}

RepeatedProduct::RepeatedProduct(const Tensor& weight, int64_t rows) : weight_t_(weight.t()) {
  if (rows == 0 || !takes_onednn_path(weight, weight)) return;
  torch::jit::Stack stack{weight.contiguous(), c10::IValue(rows)};
  onednn().reorder->callBoxed(stack);
  packed_ = stack.at(0).toTensor();
}

void RepeatedProduct::run(const Tensor& input, Tensor& out) const {
  if (!packed_.defined()) {
    at::mm_out(out, input, weight_t_);
    return;
  }
  out.copy_(onednn_linear(input, packed_, std::nullopt));
}

}  // namespace torchnorm
