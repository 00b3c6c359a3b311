#pragma once
// Numerically robust variance. Each partial result holds (count, mean, M2 =
// sum of squared deviations from its own mean); partials are merged with
// Chan et al.'s pairwise formula. Nothing here forms E[x^2] - E[x]^2, which
// cancels catastrophically when |mean| >> std (e.g. float16 data at 1e4).
#include "macros.h"

namespace torchnorm {

template <typename acc_t>
struct MeanM2 {
  acc_t count = acc_t(0);
  acc_t mean = acc_t(0);
  acc_t m2 = acc_t(0);
};

template <typename acc_t>
TN_HOST_DEVICE MeanM2<acc_t> combine(const MeanM2<acc_t>& a, const MeanM2<acc_t>& b) {
  if (a.count == acc_t(0)) return b;
  if (b.count == acc_t(0)) return a;
  MeanM2<acc_t> r;
  r.count = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t b_share = b.count / r.count;
  r.mean = a.mean + delta * b_share;
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;
  return r;
}

// One Welford step: add a single value to a partial.
template <typename acc_t>
TN_HOST_DEVICE void welford_add(MeanM2<acc_t>& p, acc_t x) {
  p.count += acc_t(1);
  const acc_t delta = x - p.mean;
  p.mean += delta / p.count;
  p.m2 += delta * (x - p.mean);
}

}  // namespace torchnorm
