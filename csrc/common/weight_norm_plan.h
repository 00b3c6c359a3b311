#pragma once
// Host-side checks and geometry of the Weight Normalization ops
// (weight_norm, weight_norm_backward), shared by the CPU and CUDA entry
// points; each op runs them before computing anything.
#include <ATen/ATen.h>

#include <optional>

namespace torchnorm {

// v, taken as contiguous, viewed as (outer, slices, inner): slice s is
// v[:, s, :], and each slice has one norm. dim d: outer = prod(v.shape[:d]),
// slices = v.shape[d], inner = prod(v.shape[d+1:]); dim None: one slice of
// every element (outer = slices = 1).
struct WeightNormPlan {
  int64_t outer = 1, slices = 1, inner = 1;
  int64_t numel() const { return outer * slices * inner; }
};

// weight_norm: v float32/float64/float16/bfloat16; dim None or in
// [-v.dim(), v.dim()); g with one value per slice, shaped (slices,), or like
// v with size 1 outside dim (a single value for dim None: any shape of one
// element), in v's dtype (or float32 for float16/bfloat16 v), on v's device;
// eps > 0.
WeightNormPlan check_weight_norm(const char* op, const at::Tensor& v, const at::Tensor& g,
                                 std::optional<int64_t> dim, double eps);

// weight_norm_backward: the same, grad_w like v, and norms (one per slice)
// in v's accumulation dtype (float64 for float64 v, else float32).
WeightNormPlan check_weight_norm_backward(const char* op, const at::Tensor& grad_w, const at::Tensor& v,
                                          const at::Tensor& g, const at::Tensor& norms,
                                          std::optional<int64_t> dim, double eps);

}  // namespace torchnorm
