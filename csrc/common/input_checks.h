#pragma once
// Host-side argument checks and dtype rules shared by every op's CPU and CUDA
// entry points. Each check throws a clear error naming the op and the argument;
// the ops run all of them before writing anything, so a bad call leaves running
// statistics untouched.
#include <ATen/ATen.h>
#include <optional>
#include <string>

#include "activations.h"

namespace torchnorm {

// The activation named by an op's `activation` argument.
Activation parse_activation(const std::string& name);


// The dtype of saved statistics and accumulation: float for float, half and
// bfloat16 inputs, double for double.
at::ScalarType accumulate_type(at::ScalarType input_type);

bool is_supported_float(at::ScalarType t);

// The stand-in for an output that was not asked for (output_mask false): an
// empty tensor of shape (0,) with like's device and the given dtype.
at::Tensor empty_placeholder(const at::Tensor& like, at::ScalarType dtype);

// Argument checks shared by every op; each throws a clear error naming the
// argument. The input must be float32, float64, float16 or bfloat16:
void check_supported_input(const char* op, const at::Tensor& input);
// A parameter of the given shape (shape_meaning says why, for the message),
// on input's device, in input's dtype or float32 for a float16/bfloat16 input.
void check_parameter(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                     at::IntArrayRef shape, const char* shape_meaning);
// A tensor of the input's shape, dtype and device (residual, gradients).
void check_like_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input);

// The dtype grad_weight / grad_bias take: the weight's dtype, else the input's.
at::ScalarType parameter_type(const at::Tensor& input, const std::optional<at::Tensor>& weight);

}  // namespace torchnorm
