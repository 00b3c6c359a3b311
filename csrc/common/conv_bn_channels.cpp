// Host-side pieces shared by the CPU and CUDA kernels of conv_bn_frozen's
// internal per-channel ops: see conv_bn_channels.h.
#include "conv_bn_channels.h"

#include <vector>

namespace torchnorm {

at::ScalarType prepare_channel_vectors(const char* op, int64_t channels, at::Device device,
                                       std::initializer_list<std::pair<const char*, at::Tensor*>> vectors) {
  std::optional<at::ScalarType> dtype;
  for (const auto& [name, t] : vectors) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": expected ", name, " to have one entry per channel (",
                channels, "), got shape ", t->sizes());
    TORCH_CHECK(t->device() == device, op, ": expected ", name, " on ", device, ", got it on ", t->device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": expected a floating-point ", name, ", got ",
                t->scalar_type());
    dtype = dtype ? at::promote_types(*dtype, t->scalar_type()) : t->scalar_type();
  }
  TORCH_INTERNAL_ASSERT(dtype.has_value(), op, ": no per-channel vector given");
  // (No call on a vector that is already so: each would cost a dispatch.)
  for (const auto& [name, t] : vectors) {
    if (!t->defined()) continue;
    if (t->scalar_type() != *dtype) *t = t->to(*dtype);
    *t = t->contiguous();
  }
  return *dtype;
}

FrozenAffineCall frozen_affine_call(const std::optional<at::Tensor>& conv_bias,
                                    const std::optional<at::Tensor>& bn_weight,
                                    const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
                                    const at::Tensor& running_var) {
  FrozenAffineCall call{conv_bias.value_or(at::Tensor()), bn_weight.value_or(at::Tensor()),
                        bn_bias.value_or(at::Tensor()), running_mean, running_var};
  call.channels = running_mean.numel();
  const at::ScalarType dtype = prepare_channel_vectors(
      "torchnorm._frozen_bn_affine", call.channels, running_mean.device(),
      {{"conv_bias", &call.conv_bias}, {"bn_weight", &call.bn_weight}, {"bn_bias", &call.bn_bias},
       {"running_mean", &call.mean}, {"running_var", &call.var}});
  const auto options = running_mean.options().dtype(dtype);
  call.scale = at::empty({call.channels}, options);
  call.shift = at::empty({call.channels}, options);
  call.inv_std = at::empty({call.channels}, options);
  return call;
}

ParameterGradsCall parameter_grads_call(const at::Tensor& grad_shift, const std::optional<at::Tensor>& grad_scale,
                                        const at::Tensor& scale, const at::Tensor& inv_std,
                                        const std::optional<at::Tensor>& conv_bias, const at::Tensor& running_mean,
                                        std::array<bool, 2> output_mask) {
  const char* op = "torchnorm._frozen_bn_parameter_grads";
  ParameterGradsCall call{grad_shift, grad_scale.value_or(at::Tensor()), scale, inv_std,
                          conv_bias.value_or(at::Tensor()), running_mean};
  call.channels = running_mean.numel();
  call.want_conv_bias = output_mask[0];
  call.want_bn_weight = output_mask[1];
  TORCH_CHECK(!call.want_bn_weight || call.grad_scale.defined(), op,
              ": grad_scale is needed for the BN weight's gradient (output_mask[1])");
  const at::ScalarType dtype = prepare_channel_vectors(
      op, call.channels, running_mean.device(),
      {{"grad_shift", &call.grad_shift}, {"grad_scale", &call.grad_scale}, {"scale", &call.scale},
       {"inv_std", &call.inv_std}, {"conv_bias", &call.conv_bias}, {"running_mean", &call.mean}});
  const auto options = running_mean.options().dtype(dtype);
  call.grad_conv_bias = at::empty({call.want_conv_bias ? call.channels : 0}, options);
  call.grad_bn_weight = at::empty({call.want_bn_weight ? call.channels : 0}, options);
  return call;
}

int64_t conv_out_channels(const at::Tensor& weight, int64_t groups, bool transposed) {
  return transposed ? weight.size(1) * groups : weight.size(0);
}

// The checks of a weight seen per output channel and of the scale given
// with it; returns the output channels.
static int64_t check_weight_channels(const char* op, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& scale, int64_t groups, bool transposed) {
  TORCH_CHECK(weight.dim() >= 2, op, ": expected a weight of 2 or more dimensions, got ", weight.dim());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, op, ": groups (", groups,
              ") must be positive and divide the weight's first dimension (", weight.size(0), ")");
  const int64_t channels = conv_out_channels(weight, groups, transposed);
  if (scale) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == channels, op, ": expected scale to have one entry per "
                "output channel (", channels, "), got shape ", scale->sizes());
    TORCH_CHECK(scale->device() == weight.device(), op, ": expected scale on ", weight.device(),
                " like the weight, got it on ", scale->device());
  }
  return channels;
}

at::Tensor output_channel_view(const at::Tensor& scale, const at::Tensor& weight, int64_t groups, bool transposed) {
  std::vector<int64_t> shape(weight.dim(), 1);
  if (!transposed) {
    shape[0] = -1;
    return scale.reshape(shape);
  }
  const int64_t in_per_group = weight.size(0) / groups, out_per_group = weight.size(1);
  shape[0] = weight.size(0);
  shape[1] = out_per_group;
  return scale.reshape({groups, 1, out_per_group}).expand({groups, in_per_group, out_per_group}).reshape(shape);
}

at::Tensor scale_output_channels(const at::Tensor& weight, const at::Tensor& scale, int64_t groups, bool transposed) {
  check_weight_channels("torchnorm._conv_weight_channel_scale", weight, scale, groups, transposed);
  // Written into a tensor laid out like the weight, which the fake kernel
  // (torchnorm/_fake.py) predicts as empty_like(weight).
  at::Tensor out = at::empty_like(weight, weight.options().dtype(at::promote_types(weight.scalar_type(),
                                                                                   scale.scalar_type())));
  return at::mul_out(out, weight, output_channel_view(scale, weight, groups, transposed));
}

at::Tensor sum_per_output_channel(const at::Tensor& t, int64_t groups, bool transposed) {
  if (!transposed) return t.flatten(1).sum(1);
  return t.flatten(2).sum(2).reshape({groups, t.size(0) / groups, t.size(1)}).sum(1).reshape(-1);
}

ChannelDotLayout channel_dot_layout(const at::Tensor& g, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                                    int64_t groups, bool transposed) {
  const char* op = "torchnorm._conv_weight_channel_dot";
  const int64_t channels = check_weight_channels(op, w, scale, groups, transposed);
  TORCH_CHECK(g.sizes() == w.sizes(), op, ": expected grad_weight of the weight's shape ", w.sizes(), ", got ",
              g.sizes());
  TORCH_CHECK(g.device() == w.device(), op, ": expected grad_weight on ", w.device(), " like the weight, got it on ",
              g.device());
  ChannelDotLayout layout;
  layout.channels = channels;
  layout.groups = transposed ? groups : 1;
  layout.rows = transposed ? w.size(0) / groups : 1;
  layout.outs = channels / layout.groups;
  const int64_t blocks = layout.groups * layout.rows * layout.outs;
  layout.block = blocks ? w.numel() / blocks : 0;
  const bool layout_ok = transposed ? g.is_contiguous() && w.is_contiguous()
                                    : g.is_non_overlapping_and_dense() && g.stride(0) == layout.block;
  layout.loop = (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble) &&
                w.scalar_type() == g.scalar_type() && g.strides() == w.strides() && layout_ok;
  return layout;
}

at::Tensor channel_dot_by_aten(at::Tensor& g, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                               int64_t groups, bool transposed) {
  at::Tensor dot = sum_per_output_channel(g * w, groups, transposed);
  if (scale) g.mul_(output_channel_view(*scale, g, groups, transposed));
  return dot;
}

}  // namespace torchnorm
