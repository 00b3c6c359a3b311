// The argument checks and dtype rules every op shares (input_checks.h).
#include "input_checks.h"

namespace torchnorm {

Activation parse_activation(const std::string& name) {
  if (name == "none" || name.empty()) return Activation::None;
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "silu") return Activation::SiLU;
  TORCH_CHECK_VALUE(false, "torchnorm: activation must be one of 'none', 'relu', 'leaky_relu', 'silu'; got '", name, "'");
}

at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor empty_placeholder(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({0}, like.options().dtype(dtype));
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_supported_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(is_supported_float(input.scalar_type()), op,
              ": expected a float32, float64, float16 or bfloat16 input, got ", input.scalar_type());
}

void check_parameter(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                     at::IntArrayRef shape, const char* shape_meaning) {
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, " to match ", shape_meaning,
              ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on ", input.device(),
              " like the input, got it on ", t.device());
  const bool reduced_input = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || (reduced_input && t.scalar_type() == at::kFloat), op,
              ": expected ", name, " of dtype ", input.scalar_type(),
              reduced_input ? " or float32" : "", " to match the input, got ", t.scalar_type());
}

void check_like_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": expected ", name, " of the input's shape ", input.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on ", input.device(),
              " like the input, got it on ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name, " of dtype ",
              input.scalar_type(), " like the input, got ", t.scalar_type());
}

at::ScalarType parameter_type(const at::Tensor& input, const std::optional<at::Tensor>& weight) {
  return weight ? weight->scalar_type() : input.scalar_type();
}

}  // namespace torchnorm
