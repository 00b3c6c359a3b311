#pragma once
// Host-side pieces of the per-sample norms (LayerNorm, RMSNorm, GroupNorm,
// InstanceNorm), shared by the CPU and CUDA implementations: argument checks
// (all done before anything is written), layouts, and output allocation.
//
// The statistics are taken per sample, never across the batch:
//  - LayerNorm / RMSNorm: M rows of D = prod(normalized_shape) contiguous
//    elements, with per-element affine parameters of length D.
//  - GroupNorm / InstanceNorm: (N, C, S) with C split into G groups of
//    K = C / G channels; the statistics of (n, g) cover K * S elements and
//    the affine parameters are per channel. InstanceNorm is G = C.
#include <ATen/ATen.h>
#include <array>
#include <optional>
#include <string>

#include "input_checks.h"
#include "layout.h"

namespace torchnorm {

// --------------------------------------------------------- LayerNorm/RMS --

struct RowNormPlan {
  int64_t M = 0;  // rows
  int64_t D = 0;  // elements per row
  bool rms = false;
  at::Tensor x;         // contiguous input
  at::Tensor residual;  // undefined, or contiguous residual
  at::Tensor weight;    // undefined, or contiguous (D,) view
  at::Tensor bias;      // undefined, or contiguous (D,) view
  at::Tensor out;       // contiguous, input's shape
  at::Tensor sum;       // contiguous x + residual when a residual is fused, else empty (0,)
  at::Tensor mean;      // M values (stats shape); empty (0,) for RMSNorm
  at::Tensor rstd;      // M values (stats shape)
};

// eps of an RMSNorm call: the given value, or the machine epsilon of the
// computation type (float32 for float32/float16/bfloat16, float64 for float64),
// as torch.nn.functional.rms_norm resolves None.
double rms_norm_eps(const at::Tensor& input, std::optional<double> eps);

// rms: RMSNorm (no mean, no bias). bias must be nullopt then.
RowNormPlan plan_row_norm(const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, double eps, bool rms);

struct RowNormBackwardPlan {
  int64_t M = 0, D = 0;
  bool rms = false;                  // no mean was saved
  at::Tensor x, grad_out, grad_sum;  // contiguous; grad_sum undefined when absent
  at::Tensor mean, rstd;             // contiguous M values; mean undefined for RMSNorm
  at::Tensor weight;                 // undefined, or contiguous (D,)
  // Each allocated (contiguous) when its output_mask entry is set, else empty (0,).
  at::Tensor grad_input, grad_weight, grad_bias;
};

RowNormBackwardPlan plan_row_norm_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum,
                                           const at::Tensor& input, at::IntArrayRef normalized_shape,
                                           const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                           const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask);

// ----------------------------------------------------- GroupNorm/Instance --

struct GroupNormGeometry {
  int64_t N = 0, C = 0, S = 1, G = 1;
  Layout layout = Layout::Planar;  // Planar: (N, C, S) contiguous; Rowwise: (N, S, C) contiguous
  int64_t channels_per_group() const { return C / G; }
  int64_t count_per_group() const { return C / G * S; }
};

struct GroupNormPlan {
  GroupNormGeometry g;
  at::Tensor x;       // input in the kernel layout
  at::Tensor weight;  // undefined, or (C,)
  at::Tensor bias;    // undefined, or (C,)
  at::Tensor out;     // like x
  at::Tensor mean, rstd;  // (N, G), accumulate type, contiguous
  at::Tensor var;         // undefined, or (N, G) biased variance (InstanceNorm's running statistics need it)
  Activation activation = Activation::None;
};

GroupNormPlan plan_group_norm(const char* op, const at::Tensor& input, int64_t num_groups,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              double eps, const std::string& activation, bool want_var);

// InstanceNorm is GroupNorm with one group per channel; this checks its own
// arguments (rank >= 3, running statistics) and asks for the variance when
// running statistics are to be updated.
GroupNormPlan plan_instance_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, double eps);

// After the kernel filled p.mean and p.var: running = (1 - momentum) * running
// + momentum * (average over the batch of each instance's mean / unbiased
// variance), as torch.nn.functional.instance_norm updates them.
void update_instance_running_stats(const GroupNormPlan& p, const std::optional<at::Tensor>& running_mean,
                                   const std::optional<at::Tensor>& running_var, double momentum);

struct GroupNormBackwardPlan {
  GroupNormGeometry g;
  at::Tensor x, grad_out;  // grad_out with x's strides
  at::Tensor mean, rstd;   // (N, G) contiguous
  at::Tensor weight, bias; // undefined, or (C,)
  at::Tensor grad_input, grad_weight, grad_bias;  // empty (0,) when not wanted
  Activation activation = Activation::None;
};

GroupNormBackwardPlan plan_group_norm_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                               int64_t num_groups, const at::Tensor& mean, const at::Tensor& rstd,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias, const std::string& activation,
                                               std::array<bool, 3> output_mask);

}  // namespace torchnorm
