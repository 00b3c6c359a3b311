#pragma once
// The activations a normalization op may fuse into its epilogue, shared by the
// CPU and CUDA kernels so both compute the same function and derivative.
#include <cmath>
#include "macros.h"

namespace torchnorm {

enum class Activation : int { None = 0, ReLU = 1, LeakyReLU = 2, SiLU = 3 };

// y = act(z)
template <typename T>
TN_HOST_DEVICE T activation_forward(Activation act, T z, T negative_slope) {
  switch (act) {
    // Written so that NaN passes through, as torch.relu lets it.
    case Activation::ReLU:
      return z < T(0) ? T(0) : z;
    case Activation::LeakyReLU:
      return z < T(0) ? z * negative_slope : z;
    case Activation::SiLU:
      return z / (T(1) + exp(-z));
    default:
      return z;
  }
}

// dy/dz at the pre-activation value z. The backward recomputes z from the saved
// statistics instead of saving it, so no activation needs an extra tensor kept
// alive between forward and backward.
template <typename T>
TN_HOST_DEVICE T activation_derivative(Activation act, T z, T negative_slope) {
  switch (act) {
    case Activation::ReLU:
      return z > T(0) ? T(1) : T(0);
    case Activation::LeakyReLU:
      return z > T(0) ? T(1) : negative_slope;
    case Activation::SiLU: {
      const T s = T(1) / (T(1) + exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    default:
      return T(1);
  }
}

}  // namespace torchnorm
