#include "common/weight_norm_plan.h"

#include <c10/util/Exception.h>

#include "common/input_checks.h"

namespace torchnorm {
namespace {

WeightNormPlan plan_of(const char* op, const at::Tensor& v, std::optional<int64_t> dim) {
  WeightNormPlan plan;
  if (!dim) {
    plan.inner = v.numel();
    return plan;
  }
  const int64_t rank = v.dim();
  TORCH_CHECK(rank > 0, op, ": a 0-d v has no dimension ", *dim, " to normalize along; pass dim=None");
  TORCH_CHECK(*dim >= -rank && *dim < rank, op, ": expected dim in [", -rank, ", ", rank, ") for v of shape ",
              v.sizes(), ", or None for the whole tensor, got ", *dim);
  const int64_t d = *dim < 0 ? *dim + rank : *dim;
  for (int64_t k = 0; k < d; ++k) plan.outer *= v.size(k);
  plan.slices = v.size(d);
  for (int64_t k = d + 1; k < rank; ++k) plan.inner *= v.size(k);
  return plan;
}

// g (or norms): one value per slice, as (slices,) or as v's shape with size
// 1 outside dim.
void check_per_slice(const char* op, const char* name, const at::Tensor& t, const at::Tensor& v,
                     std::optional<int64_t> dim, const WeightNormPlan& plan) {
  bool ok = t.numel() == plan.slices && t.dim() <= 1;
  if (!ok && t.numel() == plan.slices && t.dim() == v.dim()) {
    const int64_t d = dim ? (*dim < 0 ? *dim + v.dim() : *dim) : -1;
    ok = true;
    for (int64_t k = 0; k < t.dim(); ++k) ok = ok && (k == d || t.size(k) == 1);
  }
  TORCH_CHECK(ok, op, ": expected ", name, " to hold one value per slice of v along ",
              dim ? "dim " + std::to_string(*dim) : std::string("the whole tensor (dim=None)"), ": ", plan.slices,
              " values, shaped (", plan.slices, ",) or like v ", v.sizes(), " with size 1 ",
              dim ? "outside dim" : "everywhere", "; got shape ", t.sizes());
}

}  // namespace

WeightNormPlan check_weight_norm(const char* op, const at::Tensor& v, const at::Tensor& g,
                                 std::optional<int64_t> dim, double eps) {
  TORCH_CHECK(is_supported_float(v.scalar_type()), op, ": expected v of dtype float32, float64, float16 or bfloat16, got ",
              v.scalar_type());
  const WeightNormPlan plan = plan_of(op, v, dim);
  check_per_slice(op, "g", g, v, dim, plan);
  check_parameter(op, "g", g, v, g.sizes(), "v's slices");
  // eps keeps a zero slice from dividing 0 by 0.
  TORCH_CHECK(eps > 0.0, op, ": expected eps > 0 (the smallest norm a slice is divided by), got ", eps);
  return plan;
}

WeightNormPlan check_weight_norm_backward(const char* op, const at::Tensor& grad_w, const at::Tensor& v,
                                          const at::Tensor& g, const at::Tensor& norms,
                                          std::optional<int64_t> dim, double eps) {
  const WeightNormPlan plan = check_weight_norm(op, v, g, dim, eps);
  check_like_input(op, "grad_w", grad_w, v);
  check_per_slice(op, "norms", norms, v, dim, plan);
  const auto acc = accumulate_type(v.scalar_type());
  TORCH_CHECK(norms.scalar_type() == acc && norms.device() == v.device(), op, ": expected norms of dtype ", acc,
              " on ", v.device(), " (what weight_norm returned), got ", norms.scalar_type(), " on ", norms.device());
  return plan;
}

}  // namespace torchnorm
