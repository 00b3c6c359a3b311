#pragma once
// Matrix products of our ops on the CPU in float32 through oneDNN
// (mkldnn::_linear_pointwise, the op torch.compile's CPU backend uses for a
// Linear, looked up at run time), where ATen's at::mm reaches MKL. On this
// project's AVX-512 AMD machine MKL ran the shapes our layers use at 155-190
// GFLOP/s against 195-217 for oneDNN (python -m benchmarks.gemm_backends),
// except a left factor given transposed (a weight gradient, dy.T @ x), where
// oneDNN needs a copy and lost: those stay at::mm. Everywhere else (CUDA,
// other dtypes, a torch without oneDNN, empty operands) ATen's product.
#include <ATen/ATen.h>

#include <optional>

namespace torchnorm {

// input @ weight.T (+ bias): at::linear's result for a 2-d input and a
// (out, in) weight.
at::Tensor linear_product(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// input @ weight.T for one weight and many inputs of `rows` rows (a
// recurrence's product, once per step): on the oneDNN path the weight is
// packed once, at construction.
class RepeatedProduct {
 public:
  RepeatedProduct(const at::Tensor& weight, int64_t rows);
  // out = input @ weight.T, into out (rows x out_features).
  void run(const at::Tensor& input, at::Tensor& out) const;

 private:
  at::Tensor weight_t_, packed_;
};

}  // namespace torchnorm
