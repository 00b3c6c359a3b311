#pragma once
// Host-side pieces of BatchNorm shared by the CPU and CUDA implementations:
// argument checks (all done before anything is written, so a bad call leaves
// running statistics untouched) and the memory-layout classification the
// kernels are written against.
#include <ATen/ATen.h>
#include <array>
#include <string>
#include "activations.h"

namespace torchnorm {

Activation parse_activation(const std::string& name);

// How an (N, C, *) input is laid out in memory.
//  Planar:  element (n, c, s) at (n * C + c) * S + s      (NCHW contiguous)
//  Rowwise: element (r, c)    at r * C + c, r = n * S + s (channels_last, or (N, C))
enum class Layout { Planar, Rowwise };

struct BatchNormGeometry {
  int64_t N = 0;  // batch
  int64_t C = 0;  // channels
  int64_t S = 1;  // spatial positions per (n, c)
  Layout layout = Layout::Planar;
  int64_t count_per_channel() const { return N * S; }
};

// Classifies input's layout. Returns the tensor the kernel should read: input
// itself when it is planar or rowwise already, else a contiguous copy.
at::Tensor as_kernel_layout(const at::Tensor& input, BatchNormGeometry& geometry);

// Returns t laid out with exactly like's strides (t itself when it already is),
// so residual / grad_output can be indexed with the input's offsets.
at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& like);

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

// Checks every argument of a BatchNorm forward; throws a clear error naming
// the argument on the first problem.
void check_batch_norm_args(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual,
    bool training,
    double eps);

// Checks of the backward's saved tensors and incoming gradient.
void check_batch_norm_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& mean,
    const at::Tensor& rstd);

// Everything a backend needs to run a forward, prepared once for CPU and CUDA:
// arguments checked, input/residual in the kernel layout, outputs allocated.
struct ForwardPlan {
  BatchNormGeometry g;
  at::Tensor x;         // input in the kernel layout
  at::Tensor residual;  // undefined, or residual with x's strides
  at::Tensor out;       // like x
  Activation activation = Activation::None;
};

ForwardPlan plan_forward(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual,
    bool training,
    double eps,
    const std::string& activation);

// plan_forward for batch_norm_apply: checks mean and rstd under their own
// names (per channel, like running statistics).
ForwardPlan plan_apply(
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::string& activation);

struct BackwardPlan {
  BatchNormGeometry g;
  at::Tensor x, grad_out, residual;  // grad_out and residual with x's strides
  // Each is allocated when its output_mask entry is set, else empty of shape (0,).
  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;
  Activation activation = Activation::None;
};

BackwardPlan plan_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::string& activation,
    std::array<bool, 4> output_mask);

// The dtype grad_weight / grad_bias take: the weight's dtype, else the input's.
at::ScalarType parameter_type(const at::Tensor& input, const std::optional<at::Tensor>& weight);

}  // namespace torchnorm
