// The C++ signatures of the Online Normalization ops (online_norm,
// online_norm_backward), for C++ that calls them through ops::handle<>()
// (csrc/ops/handle.h). Schemas, and what each op computes, are in
// csrc/registration.cpp; kernels in csrc/{cpu,cuda}/online_norm.*; autograd
// in csrc/autograd/online_norm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "ops/handle.h"

namespace torchnorm::ops {

// online_norm(input, mu!, var!, u, v, alpha_fwd, alpha_bkw, eps) -> (out, mean, rstd)
struct OnlineNorm {
  static constexpr const char* kName = "torchnorm::online_norm";
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, double, double, double);
};

// online_norm_backward(grad_output, input, mean, rstd, u!, v!, alpha_bkw) -> grad_input
struct OnlineNormBackward {
  static constexpr const char* kName = "torchnorm::online_norm_backward";
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, double);
};

}  // namespace torchnorm::ops
