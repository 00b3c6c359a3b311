#pragma once
// Host-side pieces of conv_bn_frozen's internal per-channel ops
// (_frozen_bn_affine, _frozen_bn_parameter_grads, _conv_weight_channel_dot,
// _conv_weight_channel_scale; schemas in csrc/registration.cpp) that their
// CPU kernels (csrc/cpu/conv_bn.cpp) and CUDA kernels (csrc/cuda/conv_bn.cu)
// share: argument checks, the per-channel vectors brought into the form the
// kernels read, and a conv or transposed-conv weight seen per output channel
// (the one place that knows a transposed weight's layout).
//
// Not here: the per-channel formulas (common/batch_norm_math.h) and the
// loops and kernels that evaluate them.
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include "macros.h"

namespace torchnorm {

// ------------------------------------------------------ per-channel vectors --

// Checks the per-channel vectors of a frozen BatchNorm op (name, tensor;
// an undefined tensor is an absent vector) and replaces each defined one by
// the form the kernels read: contiguous and in one dtype, the
// torch.result_type of them all (converting a float type to a wider one is
// exact). Each must be a 1-d floating-point tensor of `channels` entries on
// `device`. Returns that dtype, the dtype of the op's outputs.
at::ScalarType prepare_channel_vectors(const char* op, int64_t channels, at::Device device,
                                       std::initializer_list<std::pair<const char*, at::Tensor*>> vectors);

// Element c of a per-channel vector prepared as above, in double; `absent`
// (the value that leaves the formula unchanged) when the vector is absent.
template <typename scalar_t>
struct ChannelValues {
  const scalar_t* data;
  double absent;
  TN_HOST_DEVICE double operator[](int64_t c) const { return data ? double(data[c]) : absent; }
};

template <typename scalar_t>
ChannelValues<scalar_t> channel_values(const at::Tensor& t, double absent) {
  return {t.defined() ? t.const_data_ptr<scalar_t>() : nullptr, absent};
}

// _frozen_bn_affine's arguments checked and prepared (absent vectors
// undefined), and its outputs allocated: scale, shift and inv_std, one entry
// per channel of the running mean, in the vectors' result dtype.
struct FrozenAffineCall {
  at::Tensor conv_bias, bn_weight, bn_bias, mean, var;
  at::Tensor scale, shift, inv_std;
  int64_t channels;
};
FrozenAffineCall frozen_affine_call(const std::optional<at::Tensor>& conv_bias,
                                    const std::optional<at::Tensor>& bn_weight,
                                    const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
                                    const at::Tensor& running_var);

// _frozen_bn_parameter_grads's arguments checked and prepared, and its
// outputs allocated: grad_conv_bias and grad_bn_weight where wanted (else
// the empty placeholder of shape (0,), as every backward op's), in the
// vectors' result dtype. grad_scale is needed for grad_bn_weight only.
struct ParameterGradsCall {
  at::Tensor grad_shift, grad_scale, scale, inv_std, conv_bias, mean;
  at::Tensor grad_conv_bias, grad_bn_weight;
  int64_t channels;
  bool want_conv_bias, want_bn_weight;
};
ParameterGradsCall parameter_grads_call(const at::Tensor& grad_shift, const std::optional<at::Tensor>& grad_scale,
                                        const at::Tensor& scale, const at::Tensor& inv_std,
                                        const std::optional<at::Tensor>& conv_bias, const at::Tensor& running_mean,
                                        std::array<bool, 2> output_mask);

// ------------------------------------------------ weights per output channel --
//
// A conv weight is (out_channels, in_channels / groups, kernel...); a
// transposed conv's is (in_channels, out_channels / groups, kernel...):
// dimension 1 indexes the output channels within a group, and group g's
// rows are block g of dimension 0. A Linear weight is a conv weight without
// kernel dimensions.

int64_t conv_out_channels(const at::Tensor& weight, int64_t groups, bool transposed);

// `scale` (one entry per output channel) shaped to multiply a weight-shaped
// tensor element-wise.
at::Tensor output_channel_view(const at::Tensor& scale, const at::Tensor& weight, int64_t groups, bool transposed);

// weight * scale per output channel, in the promoted dtype and the weight's
// layout: the fold's weight, W * bn_weight / sqrt(var + eps). The kernel of
// _conv_weight_channel_scale (every backend) and what conv_bn_frozen folds with.
at::Tensor scale_output_channels(const at::Tensor& weight, const at::Tensor& scale, int64_t groups, bool transposed);

// Per output channel, the sum of a weight-shaped tensor's entries.
at::Tensor sum_per_output_channel(const at::Tensor& t, int64_t groups, bool transposed);

// How _conv_weight_channel_dot's loop (CPU) or kernel (CUDA) walks g and w:
// `groups` groups of `rows` rows, each row holding, per output channel of
// the group, one block of `block` contiguous entries. A conv weight is one
// row of all channels' blocks (in any dense layout that puts channel c's
// entries in block c); a contiguous transposed weight has one row per input
// channel. `loop` says whether g and w fit that walk (float or double, one
// dtype, one layout); when not, channel_dot_by_aten does the same sums.
struct ChannelDotLayout {
  int64_t channels, groups, rows, outs, block;
  bool loop;
};

// Checks _conv_weight_channel_dot's arguments (g and w of one shape on one
// device; scale, when given, one entry per output channel there) and
// returns their layout.
ChannelDotLayout channel_dot_layout(const at::Tensor& g, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                                    int64_t groups, bool transposed);

// _conv_weight_channel_dot by ATen ops, for the dtypes and layouts the
// loops do not walk (e.g. a float16 weight, or g and w in different
// layouts). A layout case, not a second copy of any formula: the same sum
// of products, and the same scaling by output_channel_view.
at::Tensor channel_dot_by_aten(at::Tensor& g, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                               int64_t groups, bool transposed);

}  // namespace torchnorm
