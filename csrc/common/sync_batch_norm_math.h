#pragma once
// Per-channel math of SyncBatchNorm's per-rank pieces (docs/sync_batch_norm.md),
// shared by the CPU and CUDA kernels of batch_norm_gather_stats and
// batch_norm_backward_elemt. The merge itself is welford.h's combine (Chan's
// formula); rstd, the running-statistics update and the gradient
// coefficients are batch_norm_math.h's.
#include "batch_norm_math.h"
#include "macros.h"
#include "welford.h"

namespace torchnorm {

// Channel c's statistics over every partial of a (W, 3, C) table
// stats[w][field][c] (fields count, mean, M2), merged in order w = 0 .. W-1.
// Every rank merges the same table in the same order, so every rank gets the
// same bits. A partial of count 0 (a rank with an empty batch) is skipped by
// combine(), whatever its mean and M2.
template <typename acc_t>
TN_HOST_DEVICE MeanM2<acc_t> merge_partials(const acc_t* stats, int64_t W, int64_t C, int64_t c) {
  MeanM2<acc_t> total;
  for (int64_t w = 0; w < W; ++w) {
    const acc_t* partial = stats + w * 3 * C + c;
    total = combine(total, MeanM2<acc_t>{partial[0], partial[C], partial[2 * C]});
  }
  return total;
}

template <typename acc_t>
struct MergedChannel {
  acc_t mean, rstd, count;
};

// Normalizing statistics of a merged channel (biased variance, as
// batch_norm_train), and the running-statistics update with the merged count.
// With count 0 (every rank empty) there is nothing to normalize: mean 0,
// rstd of a zero variance, running statistics left alone.
template <typename acc_t>
TN_HOST_DEVICE MergedChannel<acc_t> finish_merged(const MeanM2<acc_t>& total, acc_t eps, bool update_running,
                                                  acc_t momentum, acc_t& running_mean, acc_t& running_var) {
  const bool any = total.count > acc_t(0);
  const acc_t var = any ? total.m2 / total.count : acc_t(0);
  if (update_running && any) update_running_stats(running_mean, running_var, total.mean, total.m2, total.count, momentum);
  return {any ? total.mean : acc_t(0), rstd_from_var(var, eps), total.count};
}

// Training-mode grad_input coefficients from the global means of dz and of
// dz * xhat (xhat = (x - mean) * rstd): the sums batch_norm_backward returns
// as grad_bias and grad_weight, all-reduced and divided by the global count.
// dx = weight * rstd * (dz - mean_dz - xhat * mean_dz_xhat).
template <typename acc_t>
TN_HOST_DEVICE BackwardCoefficients<acc_t> global_backward_coefficients(acc_t rstd, acc_t weight, acc_t mean_dz,
                                                                        acc_t mean_dz_xhat) {
  // backward_coefficients takes sums over `count` elements of dz and of
  // dz * (x - mean); means are sums over a count of 1.
  return backward_coefficients(true, rstd, weight, mean_dz, mean_dz_xhat / rstd, acc_t(1));
}

}  // namespace torchnorm
