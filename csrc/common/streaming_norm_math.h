#pragma once
// The per-channel math of Streaming Normalization (Liao, Kawaguchi and Poggio
// 2016), shared by the CPU and CUDA kernels of streaming_norm and
// streaming_norm_backward (docs/streaming_norm.md). Everything here is O(C):
// the kernels call it once per channel between BatchNorm's two passes over
// the data (the statistics or gradient sums, then the element-wise pass),
// which they share with BatchNorm.
//
// The histories (the state: short- and long-term averages of the statistics
// s = (mean, std) and of their gradients) are float32 or float64 tensors;
// their arithmetic runs in double (state_t below), the statistics that
// normalize and the gradients in the input's acc_t.
#include "batch_norm_math.h"
#include "macros.h"

namespace torchnorm {

using streaming_state_t = double;

// The mean of the values pushed into a history since it was cleared, after
// one more: avg + (value - avg) / (count + 1), count the values before it.
template <typename T>
TN_HOST_DEVICE T streaming_push(T avg, T value, T count) {
  return avg + (value - avg) / (count + T(1));
}

// a_long * long + a_short * short, where before the first weight update
// (long_set false) the short-term value stands in for the long-term one (the
// paper does not say how the long-term average starts; the authors' code
// does this).
template <typename T>
TN_HOST_DEVICE T streaming_mix(T long_value, T short_value, bool long_set, T a_long, T a_short) {
  return a_long * (long_set ? long_value : short_value) + a_short * short_value;
}

// One channel's (mean, std) pair, as the statistics and the gradient
// histories hold them.
template <typename T>
struct StreamingPair {
  T mean, std;
};

// Forward, one channel: pushes the batch's s = (mean, 1 / rstd) into the
// short-term history (short_stats, in place; `count` batches in it before)
// and returns s_hat = a_long long + a_short short, which normalizes.
template <typename acc_t>
TN_HOST_DEVICE StreamingPair<streaming_state_t> streaming_forward_channel(
    StreamingPair<streaming_state_t>& short_stats, StreamingPair<streaming_state_t> long_stats, bool long_set,
    streaming_state_t count, acc_t mean, acc_t rstd, streaming_state_t a_long, streaming_state_t a_short) {
  using T = streaming_state_t;
  short_stats.mean = streaming_push(short_stats.mean, T(mean), count);
  short_stats.std = streaming_push(short_stats.std, T(acc_t(1) / rstd), count);
  return {streaming_mix(long_stats.mean, short_stats.mean, long_set, a_long, a_short),
          streaming_mix(long_stats.std, short_stats.std, long_set, a_long, a_short)};
}

// Backward, one channel. y = (x - mean_hat) * rstd_hat * weight + bias with
// s_hat = (mean_hat, 1 / rstd_hat); from the channel's sum_dy = sum(dy) and
// sum_dy_xc = sum(dy * (x - mean_hat)):
//   g = dL/ds_hat = -rstd_hat * weight * (sum_dy, sum_dy_xc * rstd_hat),
// pushed into the short-term gradient history (grad_short, in place); the
// batch statistics s get, in place of their derivative,
//   g_hat = b_long long + b_short short + b_current g,
// which reaches x through d mean/dx = 1 / M and d std/dx = (x - mean) rstd / M
// (M values per channel; mean, rstd the batch's). With the statistics held
// fixed, dx = dy * weight * rstd_hat; so, centred on mean_hat as the
// element-wise pass is,
//   dx = dy * weight rstd_hat + (x - mean_hat) * k + g_hat.mean / M + k (mean_hat - mean),
// k = g_hat.std * rstd / M. Returns those coefficients.
template <typename acc_t>
TN_HOST_DEVICE BackwardCoefficients<acc_t> streaming_backward_channel(
    StreamingPair<streaming_state_t>& grad_short, StreamingPair<streaming_state_t> grad_long, bool long_set,
    streaming_state_t count, acc_t sum_dy, acc_t sum_dy_xc, acc_t weight, acc_t mean_hat, acc_t rstd_hat, acc_t mean,
    acc_t rstd, acc_t M, streaming_state_t b_long, streaming_state_t b_short, streaming_state_t b_current) {
  using T = streaming_state_t;
  const acc_t scale = -rstd_hat * weight;
  const StreamingPair<acc_t> g{scale * sum_dy, scale * (sum_dy_xc * rstd_hat)};
  grad_short.mean = streaming_push(grad_short.mean, T(g.mean), count);
  grad_short.std = streaming_push(grad_short.std, T(g.std), count);
  const acc_t hat_mean =
      acc_t(streaming_mix(grad_long.mean, grad_short.mean, long_set, b_long, b_short)) + acc_t(b_current) * g.mean;
  const acc_t hat_std =
      acc_t(streaming_mix(grad_long.std, grad_short.std, long_set, b_long, b_short)) + acc_t(b_current) * g.std;
  const acc_t k = hat_std * rstd / M;
  return {weight * rstd_hat, k, hat_mean / M + k * (mean_hat - mean)};
}

}  // namespace torchnorm
