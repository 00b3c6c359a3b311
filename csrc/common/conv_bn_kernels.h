#pragma once
// The per-channel loops of conv_bn_frozen (csrc/conv_bn.cpp) for CUDA
// tensors. csrc/cuda/conv_bn.cu fills the table when the extension loads; a
// build without CUDA leaves it empty, and ATen ops do the same arithmetic.
// The formulas are batch_norm_math.h's, as in the CPU loops.
#include <ATen/ATen.h>

namespace torchnorm {

struct FrozenCudaKernels {
  // scale, shift, inv_std (preallocated, mean's dtype) from the per-channel
  // vectors; an undefined bn_weight counts as 1, other undefined ones as 0.
  void (*affine)(const at::Tensor& conv_bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                 const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& scale,
                 const at::Tensor& shift, const at::Tensor& inv_std) = nullptr;
  // dot[c] (preallocated) = the sum of g * w over output channel c's
  // weights, then g *= scale per output channel where scale is defined; the
  // layout is channel_dot's: `groups` groups of `rows` rows of `outs` blocks
  // of `block` contiguous entries.
  void (*channel_dot)(const at::Tensor& g, const at::Tensor& w, const at::Tensor& scale, int64_t groups,
                      int64_t rows, int64_t outs, int64_t block, const at::Tensor& dot) = nullptr;
  // The parameter gradients (preallocated, or undefined where not wanted).
  void (*parameter_grads)(const at::Tensor& scale, const at::Tensor& inv_std, const at::Tensor& grad_scale,
                          const at::Tensor& grad_shift, const at::Tensor& conv_bias, const at::Tensor& mean,
                          const at::Tensor& grad_conv_bias, const at::Tensor& grad_bn_weight) = nullptr;
};

FrozenCudaKernels& frozen_cuda_kernels();

}  // namespace torchnorm
