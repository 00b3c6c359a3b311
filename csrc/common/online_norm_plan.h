#pragma once
// Host-side checks of the Online Normalization ops, shared by the CPU and CUDA
// entry points; each op runs them before writing anything, so a bad call
// leaves the state untouched.
#include <ATen/ATen.h>

#include <optional>

namespace torchnorm {

// online_norm: an (N, C, *) supported input with at least one position per
// sample; weight and bias (C,) parameters; mu, var, u, v floating (C,) on
// its device, float32 or wider (the state must not round to half);
// mu and var (u and v) neither overlapping in part nor internally;
// 0 <= alpha_fwd, alpha_bkw < 1; eps > 0.
void check_online_norm(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& mu, const at::Tensor& var,
                       const at::Tensor& u, const at::Tensor& v, double alpha_fwd, double alpha_bkw, double eps);

// online_norm_backward: grad_output like the input; weight and bias (C,); mean and rstd (N, C);
// layer_rstd (N,); u, v as above; 0 <= alpha_bkw < 1.
void check_online_norm_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& rstd, const at::Tensor& u, const at::Tensor& v, double alpha_bkw,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& layer_rstd);

}  // namespace torchnorm
