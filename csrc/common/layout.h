#pragma once
// How an (N, C, *) tensor lies in memory, as the BatchNorm and GroupNorm
// kernels see it (planar NCHW or rowwise channels-last), and the host-side
// helpers that bring a tensor into the layout a kernel reads. Argument checks
// are in input_checks.h.
#include <ATen/ATen.h>

namespace torchnorm {

// How an (N, C, *) input is laid out in memory.
//  Planar:  element (n, c, s) at (n * C + c) * S + s      (NCHW contiguous)
//  Rowwise: element (r, c)    at r * C + c, r = n * S + s (channels_last, or (N, C))
enum class Layout { Planar, Rowwise };

struct ChannelGeometry {
  int64_t N = 0;  // batch
  int64_t C = 0;  // channels
  int64_t S = 1;  // spatial positions per (n, c)
  Layout layout = Layout::Planar;
  int64_t count_per_channel() const { return N * S; }
};

// Positions per (n, c) of an (N, C, *) tensor: the product of its sizes
// after the second (1 for (N, C)).
int64_t spatial_size(const at::Tensor& input);

// Classifies input's layout. Returns the tensor the kernel should read: input
// itself when it is planar or rowwise already, else a contiguous copy.
at::Tensor as_kernel_layout(const at::Tensor& input, ChannelGeometry& geometry);

// Returns t laid out with exactly like's strides (t itself when it already is),
// so residual / grad_output can be indexed with the input's offsets.
at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& like);

}  // namespace torchnorm
