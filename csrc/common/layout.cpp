// Memory-layout classification of (N, C, *) tensors (layout.h).
#include "layout.h"

#include <vector>

namespace torchnorm {

// True when a and b address the same elements at the same offsets (strides of
// size-1 dimensions do not matter).
static bool same_element_offsets(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

int64_t spatial_size(const at::Tensor& input) {
  int64_t S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) S *= input.size(d);
  return S;
}

at::Tensor as_kernel_layout(const at::Tensor& input, ChannelGeometry& g) {
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = spatial_size(input);
  if (input.is_contiguous()) {
    // With one position per channel a contiguous input is already (rows, C).
    g.layout = g.S == 1 ? Layout::Rowwise : Layout::Planar;
    return input;
  }
  // Channels-last family: (N, *spatial, C) contiguous, at any rank.
  std::vector<int64_t> channels_last_order{0};
  for (int64_t d = 2; d < input.dim(); ++d) channels_last_order.push_back(d);
  channels_last_order.push_back(1);
  if (input.permute(channels_last_order).is_contiguous()) {
    g.layout = Layout::Rowwise;
    return input;
  }
  // Any other stride pattern: one copy into the planar layout.
  g.layout = g.S == 1 ? Layout::Rowwise : Layout::Planar;
  return input.contiguous();
}

at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& like) {
  if (same_element_offsets(t, like)) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

}  // namespace torchnorm
