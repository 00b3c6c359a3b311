#include "common/online_norm_plan.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <utility>

#include "common/input_checks.h"

namespace torchnorm {
namespace {

void check_input(const char* op, const at::Tensor& input) {
  check_supported_input(op, input);
  TORCH_CHECK(input.dim() >= 2, op, ": expected an (N, C, *) input, got shape ", input.sizes());
  // A sample with no positions has no mean or variance to update the state with.
  TORCH_CHECK(input.size(0) * input.size(1) == 0 || input.numel() > 0, op,
              ": expected at least one position per sample, got shape ", input.sizes());
}

// The kernels write the state in place, element by element (CUDA) or with
// copy_ (CPU, which refuses internal overlap only once it is writing): refuse
// a state tensor with internal overlap (an expanded view), or two that partly
// overlap, before anything is written. The same tensor twice is fine.
void check_state_writable(const at::Tensor& first, const at::Tensor& second) {
  at::assert_no_internal_overlap(first);
  at::assert_no_internal_overlap(second);
  at::assert_no_partial_overlap(first, second);
}

void check_state(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> state,
                 const at::Tensor& input) {
  const int64_t C = input.size(1);
  for (const auto& [name, t] : state) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": expected the state ", name, " of shape (", C,
                ",), one per channel, got ", t->sizes());
    TORCH_CHECK(t->device() == input.device(), op, ": expected the state ", name, " on ", input.device(),
                " like the input, got it on ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": expected the state ",
                name, " in float32 or float64 (half state would round the running statistics away), got ",
                t->scalar_type());
  }
}

void check_alpha(const char* op, const char* name, double alpha) {
  TORCH_CHECK(alpha >= 0.0 && alpha < 1.0, op, ": expected 0 <= ", name, " < 1, got ", alpha);
}

}  // namespace

void check_online_norm(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& mu, const at::Tensor& var,
                       const at::Tensor& u, const at::Tensor& v, double alpha_fwd, double alpha_bkw, double eps) {
  check_input(op, input);
  if (weight) check_parameter(op, "weight", *weight, input, {input.size(1)}, "one per channel");
  if (bias) check_parameter(op, "bias", *bias, input, {input.size(1)}, "one per channel");
  check_state(op, {{"mu", &mu}, {"var", &var}, {"u", &u}, {"v", &v}}, input);
  check_state_writable(mu, var);
  check_alpha(op, "alpha_fwd", alpha_fwd);
  check_alpha(op, "alpha_bkw", alpha_bkw);
  TORCH_CHECK(eps > 0.0, op, ": expected eps > 0, got ", eps);
}

void check_online_norm_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& rstd, const at::Tensor& u, const at::Tensor& v, double alpha_bkw,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& layer_rstd) {
  check_input(op, input);
  check_like_input(op, "grad_output", grad_output, input);
  if (weight) check_parameter(op, "weight", *weight, input, {input.size(1)}, "one per channel");
  if (bias) check_parameter(op, "bias", *bias, input, {input.size(1)}, "one per channel");
  if (layer_rstd) {
    TORCH_CHECK(layer_rstd->dim() == 1 && layer_rstd->size(0) == input.size(0) &&
                    at::isFloatingType(layer_rstd->scalar_type()) && layer_rstd->device() == input.device(),
                op, ": expected layer_rstd a floating (N,) = (", input.size(0), ",) tensor on ", input.device(),
                ", got ", layer_rstd->scalar_type(), " ", layer_rstd->sizes(), " on ", layer_rstd->device());
  }
  check_state(op, {{"u", &u}, {"v", &v}}, input);
  check_state_writable(u, v);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"rstd", &rstd}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == input.size(0) && t->size(1) == input.size(1) &&
                    at::isFloatingType(t->scalar_type()) && t->device() == input.device(),
                op, ": expected ", name, " a floating (N, C) = (", input.size(0), ", ", input.size(1),
                ") tensor on ", input.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  check_alpha(op, "alpha_bkw", alpha_bkw);
}

}  // namespace torchnorm
