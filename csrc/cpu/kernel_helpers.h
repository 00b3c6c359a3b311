#pragma once
// Building blocks of torchnorm's CPU kernels, shared by every op family:
// staging of float16/bfloat16 data through float scratch buffers, the
// at::vec forms of the activations, segment-wise normalize / gradient loops
// and robust (two-pass + Chan) statistics, and the parallel loops over
// channels-last ("rowwise") data. The per-element formulas themselves live
// in csrc/common and are shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/activations.h"
#include "common/batch_norm_math.h"
#include "common/welford.h"

namespace torchnorm {
namespace cpu {

using at::vec::Vectorized;

// Elements staged per step in planar segments (8 KiB of float: L1-resident).
constexpr int64_t kSegment = 2048;
// Rowwise coefficient arrays are tiled to at least this many elements, so
// small channel counts still fill whole vectors.
constexpr int64_t kMinPeriod = 1024;
// Fewest elements worth a parallel task: waking the thread pool costs
// microseconds, more than a small tensor's whole kernel.
constexpr int64_t kMinTaskElements = 32768;

// at::parallel_for grain for items of `item_elements` elements each.
inline int64_t grain_for(int64_t item_elements) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, item_elements));
}

// ---------------------------------------------------------------- staging --

template <typename scalar_t, typename acc_t>
constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;

// Returns src as acc_t: in place for float/double, else converted into buf.
template <typename scalar_t, typename acc_t>
const acc_t* read_as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (kSameType<scalar_t, acc_t>) {
    return src;
  } else {
    using SVec = Vectorized<scalar_t>;
    int64_t i = 0;
    for (; i + SVec::size() <= n; i += SVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(SVec::loadu(src + i));
      lo.store(buf + i);
      hi.store(buf + i + Vectorized<float>::size());
    }
    for (; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// Where to compute an output segment: the output itself for float/double,
// else buf, which write_back() then converts into dst.
template <typename scalar_t, typename acc_t>
acc_t* write_target(scalar_t* dst, acc_t* buf) {
  if constexpr (kSameType<scalar_t, acc_t>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
void write_back(const acc_t* buf, scalar_t* dst, int64_t n) {
  if constexpr (!kSameType<scalar_t, acc_t>) at::vec::convert(buf, dst, n);
}

// Scratch buffers of one task, one per staged stream.
template <typename acc_t>
struct Scratch {
  explicit Scratch(int64_t n) : x(n), dy(n), residual(n), out(n), out2(n) {}
  std::vector<acc_t> x, dy, residual, out, out2;
};

// The scratch a task on scalar_t data needs: n elements per stream for
// float16/bfloat16, none for float/double, which read_as_acc and
// write_target use in place (five zeroed 8 KiB buffers per call were a
// measurable part of a small tensor's whole call).
template <typename scalar_t, typename acc_t>
Scratch<acc_t> scratch_for(int64_t n) {
  return Scratch<acc_t>(kSameType<scalar_t, acc_t> ? 0 : n);
}

// ------------------------------------------------------------ activations --

// exp(-z) for SiLU. In float, at::vec's exp_u20 (error within 2 ulp) rather
// than the 1-ulp Sleef exp: the exp is what a fused SiLU costs, and with the
// 1-ulp one GroupNorm + SiLU at 8x512x64x64 spent 8 ms on it where torch's
// separate SiLU pass (which uses exp_u20) takes 5 ms. Double keeps exp.
template <typename acc_t>
Vectorized<acc_t> vector_exp_neg(Vectorized<acc_t> z) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return z.neg().exp_u20();
  } else {
    return z.neg().exp();
  }
}

template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> vector_activation(Activation act, Vectorized<acc_t> z, acc_t slope) {
  using Vec = Vectorized<acc_t>;
  switch (act) {
    case Activation::ReLU:  // NaN passes through, as in torch.relu
      return Vec::blendv(z, Vec(0), z < Vec(0));
    case Activation::LeakyReLU:
      return Vec::blendv(z, z * Vec(slope), z < Vec(0));
    case Activation::SiLU:
      return z / (Vec(1) + vector_exp_neg(z));
    default:
      return z;
  }
}

template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> vector_activation_derivative(Activation act, Vectorized<acc_t> z, acc_t slope) {
  using Vec = Vectorized<acc_t>;
  switch (act) {
    case Activation::ReLU:
      return Vec::blendv(Vec(0), Vec(1), z > Vec(0));
    case Activation::LeakyReLU:
      return Vec::blendv(Vec(slope), Vec(1), z > Vec(0));
    case Activation::SiLU: {
      const Vec s = Vec(1) / (Vec(1) + vector_exp_neg(z));
      return s * (Vec(1) + z * (Vec(1) - s));
    }
    default:
      return Vec(1);
  }
}

// fn(std::integral_constant<Activation, act>{}): the element loops below run
// with the activation as a compile-time constant, so its switch folds and its
// vector code inlines. With the activation read at run time GCC kept
// vector_activation_derivative an out-of-line call per vector (arguments
// spilled to the stack), which made the backward of (8, 2048, 4, 4)
// planes 2.3x slower than torch's batch_norm_backward + threshold_backward.
// The backward's segment functions below are always inlined for the same
// reason: on 4x4 planes a call per plane and pass (registers saved and
// restored around two vectors of work) took a quarter of the op's time.
template <typename Fn>
C10_ALWAYS_INLINE void with_constant_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::ReLU:
      return fn(std::integral_constant<Activation, Activation::ReLU>{});
    case Activation::LeakyReLU:
      return fn(std::integral_constant<Activation, Activation::LeakyReLU>{});
    case Activation::SiLU:
      return fn(std::integral_constant<Activation, Activation::SiLU>{});
    default:
      return fn(std::integral_constant<Activation, Activation::None>{});
  }
}

// --------------------------------------------------------- segment math --
// A coefficient is either one value for the whole segment (planar) or one
// value per element, read from a tiled per-channel array (rowwise).

template <bool kPerElement, typename acc_t>
struct Coef {
  const acc_t* p;
  acc_t at(int64_t i) const {
    if constexpr (kPerElement) {
      return p[i];
    } else {
      return p[0];
    }
  }
  // The coefficient as a vector loop reads it, made before the loop:
  // vectors().at(i). For a whole-segment value that is one broadcast, where
  // vec(i) in the loop broadcasts again for every vector (the compiler cannot
  // hoist the load past the loop's stores, which might alias p).
  auto vectors() const;
};

template <bool kPerElement, typename acc_t>
struct CoefVectors {  // per element: loads at i
  const acc_t* p;
  Vectorized<acc_t> at(int64_t i) const { return Vectorized<acc_t>::loadu(p + i); }
};

template <typename acc_t>
struct CoefVectors<false, acc_t> {  // whole segment: one broadcast value
  Vectorized<acc_t> v;
  Vectorized<acc_t> at(int64_t) const { return v; }
};

template <bool kPerElement, typename acc_t>
auto Coef<kPerElement, acc_t>::vectors() const {
  if constexpr (kPerElement) {
    return CoefVectors<true, acc_t>{p};
  } else {
    return CoefVectors<false, acc_t>{Vectorized<acc_t>(p[0])};
  }
}

// Per-element coefficients of a forward segment.
template <bool kPerElement, typename acc_t>
struct ForwardCoefs {
  Coef<kPerElement, acc_t> mean, scale, shift;
};

// y = act((x - mean) * scale + shift [+ residual])
template <bool kPerElement, typename acc_t>
void normalize_segment(const acc_t* x, const acc_t* residual, acc_t* y, int64_t n,
                       const ForwardCoefs<kPerElement, acc_t>& c, Activation act, acc_t slope) {
  using Vec = Vectorized<acc_t>;
  const auto mean = c.mean.vectors(), scale = c.scale.vectors(), shift = c.shift.vectors();
  with_constant_activation(act, [&](auto constant_act) {
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec z = (Vec::loadu(x + i) - mean.at(i)) * scale.at(i) + shift.at(i);
      if (residual) z = z + Vec::loadu(residual + i);
      vector_activation(constant_act(), z, slope).store(y + i);
    }
    for (; i < n; ++i) {
      acc_t z = pre_activation(x[i] - c.mean.at(i), c.scale.at(i), c.shift.at(i));
      if (residual) z += residual[i];
      y[i] = activation_forward(constant_act(), z, slope);
    }
  });
}

// dz = dy * act'(z) at element i, with z recomputed from xc = x - mean.
// scale, shift: the forward coefficients' vectors() (CoefVectors).
template <typename acc_t, typename CoefVec>
C10_ALWAYS_INLINE Vectorized<acc_t> vector_grad_z(Vectorized<acc_t> xc, Vectorized<acc_t> dy, const acc_t* residual,
                                                  int64_t i, const CoefVec& scale, const CoefVec& shift,
                                                  Activation act, acc_t slope) {
  if (act == Activation::None) return dy;
  auto z = xc * scale.at(i) + shift.at(i);
  if (residual) z = z + Vectorized<acc_t>::loadu(residual + i);
  return dy * vector_activation_derivative(act, z, slope);
}

template <bool kPerElement, typename acc_t>
acc_t grad_z(acc_t xc, acc_t dy, const acc_t* residual, int64_t i, const ForwardCoefs<kPerElement, acc_t>& c,
             Activation act, acc_t slope) {
  if (act == Activation::None) return dy;
  acc_t z = pre_activation(xc, c.scale.at(i), c.shift.at(i));
  if (residual) z += residual[i];
  return dy * activation_derivative(act, z, slope);
}

// Adds sum(dz) and sum(dz * (x - mean)) of a segment to sum_dz, sum_dz_xc
// (and stores dz into dz_out when given):
// per position (rowwise: arrays of length n) or per vector lane (planar:
// arrays of Vec::size(), which the caller sums once per channel, so short
// planes pay no horizontal reduction each).
template <bool kPerElement, typename acc_t>
C10_ALWAYS_INLINE void grad_sums_segment(const acc_t* x, const acc_t* dy, const acc_t* residual, int64_t n,
                                         const ForwardCoefs<kPerElement, acc_t>& c, Activation act, acc_t slope,
                                         acc_t* sum_dz, acc_t* sum_dz_xc, acc_t* dz_out = nullptr) {
  using Vec = Vectorized<acc_t>;
  const auto mean = c.mean.vectors(), scale = c.scale.vectors(), shift = c.shift.vectors();
  with_constant_activation(act, [&](auto constant_act) {
    Vec lanes_dz(0), lanes_dz_xc(0);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec xc = Vec::loadu(x + i) - mean.at(i);
      const Vec dz = vector_grad_z(xc, Vec::loadu(dy + i), residual, i, scale, shift, constant_act(), slope);
      if (dz_out) dz.store(dz_out + i);
      if constexpr (kPerElement) {
        (Vec::loadu(sum_dz + i) + dz).store(sum_dz + i);
        at::vec::fmadd(dz, xc, Vec::loadu(sum_dz_xc + i)).store(sum_dz_xc + i);
      } else {
        lanes_dz = lanes_dz + dz;
        lanes_dz_xc = at::vec::fmadd(dz, xc, lanes_dz_xc);
      }
    }
    if constexpr (!kPerElement) {
      (Vec::loadu(sum_dz) + lanes_dz).store(sum_dz);
      (Vec::loadu(sum_dz_xc) + lanes_dz_xc).store(sum_dz_xc);
    }
    for (; i < n; ++i) {
      const acc_t xc = x[i] - c.mean.at(i);
      const acc_t dz = grad_z(xc, dy[i], residual, i, c, constant_act(), slope);
      if (dz_out) dz_out[i] = dz;
      sum_dz[kPerElement ? i : 0] += dz;
      sum_dz_xc[kPerElement ? i : 0] += dz * xc;
    }
  });
}

template <bool kPerElement, typename acc_t>
struct GradCoefs {
  Coef<kPerElement, acc_t> dz_coef, xc_coef, const_coef;
};

// grad_input = dz * dz_coef + (x - mean) * xc_coef + const_coef and/or
// grad_residual = dz (either output may be null).
template <bool kPerElement, typename acc_t>
C10_ALWAYS_INLINE void grad_elementwise_segment(const acc_t* x, const acc_t* dy, const acc_t* residual, acc_t* dx,
                                                acc_t* dres, int64_t n, const ForwardCoefs<kPerElement, acc_t>& c,
                                                const GradCoefs<kPerElement, acc_t>& k, Activation act, acc_t slope) {
  using Vec = Vectorized<acc_t>;
  const auto mean = c.mean.vectors(), scale = c.scale.vectors(), shift = c.shift.vectors();
  const auto dz_coef = k.dz_coef.vectors(), xc_coef = k.xc_coef.vectors(), const_coef = k.const_coef.vectors();
  with_constant_activation(act, [&](auto constant_act) {
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec xc = Vec::loadu(x + i) - mean.at(i);
      const Vec dz = vector_grad_z(xc, Vec::loadu(dy + i), residual, i, scale, shift, constant_act(), slope);
      if (dx) at::vec::fmadd(xc, xc_coef.at(i), at::vec::fmadd(dz, dz_coef.at(i), const_coef.at(i))).store(dx + i);
      if (dres) dz.store(dres + i);
    }
    for (; i < n; ++i) {
      const acc_t xc = x[i] - c.mean.at(i);
      const acc_t dz = grad_z(xc, dy[i], residual, i, c, constant_act(), slope);
      if (dx) dx[i] = dz * k.dz_coef.at(i) + xc * k.xc_coef.at(i) + k.const_coef.at(i);
      if (dres) dres[i] = dz;
    }
  });
}

// The sum of a vector's lanes, as a tree of vector adds: summing per-lane
// accumulators with a serial chain of scalar adds cost about 20 ns a
// channel, a third of the BatchNorm backward's time on (N, C, 4, 4) input.
template <typename acc_t>
acc_t lane_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

template <typename acc_t, size_t kLanes>
acc_t lane_sum(const std::array<acc_t, kLanes>& lanes) {
  static_assert(kLanes == Vectorized<acc_t>::size());
  return lane_sum(Vectorized<acc_t>::loadu(lanes.data()));
}

// sum over i < n of term(i), vector_term(i) giving the terms i .. i + V - 1:
// four independent vector accumulators, so the loop runs at the rate of the
// loads rather than the latency of one chain of adds.
template <typename acc_t, typename VectorTerm, typename Term>
acc_t sum_terms(int64_t n, const VectorTerm& vector_term, const Term& term) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec l0(0), l1(0), l2(0), l3(0);
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    l0 = l0 + vector_term(i);
    l1 = l1 + vector_term(i + V);
    l2 = l2 + vector_term(i + 2 * V);
    l3 = l3 + vector_term(i + 3 * V);
  }
  for (; i + V <= n; i += V) l0 = l0 + vector_term(i);
  acc_t total = at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& v) { return u + v; }, (l0 + l1) + (l2 + l3));
  for (; i < n; ++i) total += term(i);
  return total;
}

// sum(a * b), or sum(a) when b is null, of one segment.
template <typename acc_t>
acc_t sum_segment(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if (b) {
    return sum_terms<acc_t>(
        n, [&](int64_t i) { return Vec::loadu(a + i) * Vec::loadu(b + i); }, [&](int64_t i) { return a[i] * b[i]; });
  }
  return sum_terms<acc_t>(n, [&](int64_t i) { return Vec::loadu(a + i); }, [&](int64_t i) { return a[i]; });
}

// sum((a - m)^2) of one segment.
template <typename acc_t>
acc_t centred_square_sum(const acc_t* a, acc_t m, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vm(m);
  return sum_terms<acc_t>(
      n,
      [&](int64_t i) {
        const Vec d = Vec::loadu(a + i) - vm;
        return d * d;
      },
      [&](int64_t i) { return (a[i] - m) * (a[i] - m); });
}

// One Welford step at every position j < n: mean[j], m2[j] take
// x[j] - shift[j], with inv_count = 1 / (values each position has now, this
// one included).
template <typename acc_t>
void welford_update(const acc_t* x, const acc_t* shift, acc_t* mean, acc_t* m2, int64_t n, acc_t inv_count) {
  using Vec = Vectorized<acc_t>;
  const Vec vinv(inv_count);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i) - Vec::loadu(shift + i), old_mean = Vec::loadu(mean + i);
    const Vec new_mean = at::vec::fmadd(v - old_mean, vinv, old_mean);
    new_mean.store(mean + i);
    at::vec::fmadd(v - old_mean, v - new_mean, Vec::loadu(m2 + i)).store(m2 + i);
  }
  for (; i < n; ++i) {
    const acc_t v = x[i] - shift[i], old_mean = mean[i];
    mean[i] += (v - old_mean) * inv_count;
    m2[i] += (v - old_mean) * (v - mean[i]);
  }
}

// (count, mean, M2) of one L1-resident segment by two passes.
template <typename acc_t>
MeanM2<acc_t> segment_mean_m2(const acc_t* x, int64_t n) {
  MeanM2<acc_t> r;
  r.count = acc_t(n);
  r.mean = sum_segment<acc_t>(x, nullptr, n) / r.count;
  r.m2 = centred_square_sum<acc_t>(x, r.mean, n);
  return r;
}

// ------------------------------------------------------ per-channel data --

// A per-channel tensor (weight, bias, running stats) as a contiguous acc_t
// array, or `fill` when absent.
template <typename acc_t>
std::vector<acc_t> channel_values(const std::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  if (!t) return std::vector<acc_t>(C, fill);
  const auto acc = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = acc.template data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + C);
}

// Values a kernel needs per channel, as acc_t arrays.
template <typename acc_t>
struct ChannelCoefs {
  std::vector<acc_t> mean, scale, shift;
};

// The forward coefficients of every channel from its mean and rstd.
template <typename acc_t>
ChannelCoefs<acc_t> forward_channel_coefs(const std::vector<acc_t>& mean, const std::vector<acc_t>& rstd,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias) {
  const int64_t C = mean.size();
  const auto w = channel_values<acc_t>(weight, C, 1), b = channel_values<acc_t>(bias, C, 0);
  ChannelCoefs<acc_t> cc{mean, std::vector<acc_t>(C), std::vector<acc_t>(C)};
  for (int64_t c = 0; c < C; ++c) {
    const auto f = forward_coefficients(rstd[c], w[c], b[c]);
    cc.scale[c] = f.scale;
    cc.shift[c] = f.shift;
  }
  return cc;
}

// Tensor of acc_t values, shape (C,).
template <typename acc_t>
at::Tensor to_tensor(const std::vector<acc_t>& v, const at::Tensor& like) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  std::copy(v.begin(), v.end(), t.template mutable_data_ptr<acc_t>());
  return t;
}

// --------------------------------------------------------------- rowwise --
// Rowwise kernels work on "periods": whole rows, at least kMinPeriod
// elements, against per-channel arrays tiled to the period's length.

struct RowPeriod {
  int64_t C, rows, length;  // length = rows * C
  explicit RowPeriod(int64_t channels)
      : C(channels), rows((kMinPeriod + channels - 1) / channels), length(rows * channels) {}
  template <typename acc_t>
  std::vector<acc_t> tile(const std::vector<acc_t>& per_channel) const {
    std::vector<acc_t> out(length);
    for (int64_t r = 0; r < rows; ++r) std::copy(per_channel.begin(), per_channel.begin() + C, out.begin() + r * C);
    return out;
  }
  // Adds tiled per-position sums into per_channel.
  template <typename acc_t>
  void fold_into(const std::vector<acc_t>& tiled, acc_t* per_channel) const {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < C; ++c) per_channel[c] += tiled[r * C + c];
    }
  }
};

// Splits [0, total) elements into whole periods and runs
// fn(offset, length, scratch) on each, in parallel. (Walking back to front,
// to reuse what a preceding reduction left in L3, measured slower here: the
// hardware prefetchers favour ascending streams.)
template <typename scalar_t, typename acc_t, typename Fn>
void for_each_period(const RowPeriod& period, int64_t total, const Fn& fn) {
  const int64_t periods = (total + period.length - 1) / period.length;
  at::parallel_for(0, periods, grain_for(period.length), [&](int64_t q0, int64_t q1) {
    auto s = scratch_for<scalar_t, acc_t>(period.length);
    for (int64_t q = q0; q < q1; ++q) fn(q * period.length, std::min(period.length, total - q * period.length), s);
  });
}

// Splits [0, total) elements into a few chunks of whole periods per thread and
// runs fn(chunk, first offset, end offset); returns the number of chunks.
// Inside a parallel region (one sample of a per-sample loop) it runs inline,
// so a single chunk spares the per-chunk merges.
template <typename Fn>
int64_t for_each_chunk(const RowPeriod& period, int64_t total, const Fn& fn) {
  const int64_t periods = (total + period.length - 1) / period.length;
  const int64_t chunks =
      at::in_parallel_region()
          ? 1
          : std::max<int64_t>(1, std::min({periods, int64_t(4) * at::get_num_threads(), total / kMinTaskElements}));
  const int64_t per_chunk = (periods + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      fn(k, std::min(total, k * per_chunk * period.length), std::min(total, (k + 1) * per_chunk * period.length));
    }
  });
  return chunks;
}


// ------------------------------------------------------------ data views --
// Raw pointers of an op, fetched once: Tensor::data_ptr checks the dtype on
// every call, which adds up over thousands of short planes. An undefined or
// empty tensor (an output nobody asked for) gives null.

template <typename T>
const T* const_ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.mutable_data_ptr<T>() : nullptr;
}

template <typename T>
T* shifted(T* p, int64_t off) {
  return p ? p + off : nullptr;
}

// A forward's streams: y = act(norm(x) [+ residual]).
template <typename scalar_t>
struct ForwardData {
  const scalar_t* x;
  const scalar_t* residual;  // may be null
  scalar_t* out;
  Activation activation;
  // The same streams from element `off` on.
  ForwardData at(int64_t off) const { return {x + off, shifted(residual, off), out + off, activation}; }
};

template <typename scalar_t>
ForwardData<scalar_t> forward_data(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out,
                                   Activation activation) {
  return {const_ptr<scalar_t>(x), const_ptr<scalar_t>(residual), mutable_ptr<scalar_t>(out), activation};
}

// A backward's streams; dx and dres are null when not wanted.
template <typename scalar_t>
struct BackwardData {
  const scalar_t* x;
  const scalar_t* dy;
  const scalar_t* residual;  // may be null
  scalar_t* dx;
  scalar_t* dres;
  Activation activation;
  BackwardData at(int64_t off) const {
    return {x + off, dy + off, shifted(residual, off), shifted(dx, off), shifted(dres, off), activation};
  }
};

template <typename scalar_t>
BackwardData<scalar_t> backward_data(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& residual,
                                     const at::Tensor& dx, const at::Tensor& dres, Activation activation) {
  return {const_ptr<scalar_t>(x), const_ptr<scalar_t>(dy), const_ptr<scalar_t>(residual), mutable_ptr<scalar_t>(dx),
          mutable_ptr<scalar_t>(dres), activation};
}

// ------------------------------------------------------ contiguous ranges --

// (count, mean, M2) of len contiguous elements: two passes per L1-sized
// segment, segments merged with Chan's formula.
template <typename scalar_t, typename acc_t>
MeanM2<acc_t> range_mean_m2(const scalar_t* x, int64_t len, Scratch<acc_t>& s) {
  MeanM2<acc_t> acc;
  for (int64_t s0 = 0; s0 < len; s0 += kSegment) {
    const int64_t n = std::min(kSegment, len - s0);
    acc = combine(acc, segment_mean_m2(read_as_acc(x + s0, n, s.x.data()), n));
  }
  return acc;
}

// (count, mean, M2) of channel c of planar (N, C, S) data: its N planes, each
// by range_mean_m2, merged in order.
template <typename scalar_t, typename acc_t>
MeanM2<acc_t> planar_channel_mean_m2(const scalar_t* x, int64_t N, int64_t C, int64_t S, int64_t c,
                                     Scratch<acc_t>& s) {
  MeanM2<acc_t> acc;
  for (int64_t n = 0; n < N; ++n) acc = combine(acc, range_mean_m2<scalar_t, acc_t>(x + (n * C + c) * S, S, s));
  return acc;
}

// Normalizes len contiguous elements from d's start with one set of coefficients.
template <typename scalar_t, typename acc_t>
void normalize_range(const ForwardData<scalar_t>& d, int64_t len, const ForwardCoefs<false, acc_t>& coefs,
                     acc_t slope, Scratch<acc_t>& s) {
  for (int64_t s0 = 0; s0 < len; s0 += kSegment) {
    const int64_t n = std::min(kSegment, len - s0);
    acc_t* y = write_target(d.out + s0, s.out.data());
    normalize_segment<false, acc_t>(read_as_acc(d.x + s0, n, s.x.data()),
                                    d.residual ? read_as_acc(d.residual + s0, n, s.residual.data()) : nullptr, y, n,
                                    coefs, d.activation, slope);
    write_back(y, d.out + s0, n);
  }
}

// The backward's two passes over one segment of len elements at d, with
// float16/bfloat16 data staged through scratch buffers.
template <bool kPerElement, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void backward_sums(const BackwardData<scalar_t>& d, int64_t len,
                                     const ForwardCoefs<kPerElement, acc_t>& fc, acc_t slope, Scratch<acc_t>& s,
                                     acc_t* sum_dz, acc_t* sum_dz_xc, acc_t* dz_out = nullptr) {
  grad_sums_segment<kPerElement, acc_t>(
      read_as_acc(d.x, len, s.x.data()), read_as_acc(d.dy, len, s.dy.data()),
      d.residual ? read_as_acc(d.residual, len, s.residual.data()) : nullptr, len, fc, d.activation, slope, sum_dz,
      sum_dz_xc, dz_out);
}

template <bool kPerElement, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void backward_elementwise(const BackwardData<scalar_t>& d, int64_t len,
                                            const ForwardCoefs<kPerElement, acc_t>& fc,
                                            const GradCoefs<kPerElement, acc_t>& k, acc_t slope, Scratch<acc_t>& s) {
  acc_t* dx_acc = d.dx ? write_target(d.dx, s.out.data()) : nullptr;
  acc_t* dres_acc = d.dres ? write_target(d.dres, s.out2.data()) : nullptr;
  grad_elementwise_segment<kPerElement, acc_t>(
      read_as_acc(d.x, len, s.x.data()), read_as_acc(d.dy, len, s.dy.data()),
      d.residual ? read_as_acc(d.residual, len, s.residual.data()) : nullptr, dx_acc, dres_acc, len, fc, k,
      d.activation, slope);
  if (d.dx) write_back(dx_acc, d.dx, len);
  if (d.dres) write_back(dres_acc, d.dres, len);
}

// Splits len contiguous elements into kSegment pieces: fn(offset, length).
template <typename Fn>
void for_each_segment(int64_t len, const Fn& fn) {
  for (int64_t s0 = 0; s0 < len; s0 += kSegment) fn(s0, std::min(kSegment, len - s0));
}

// --------------------------------------------------------------- rowwise --
// Rowwise data: `total` elements forming rows of C channels.

// Per-channel (count, mean, M2) in one streaming read. Each chunk keeps a
// Welford partial per position of a period (period.rows rows of C channels),
// so every position gains exactly one value per period: the whole period
// shares one count and one 1 / count, and the update is a few vector ops per
// element on L1-resident arrays. The positions fold into their channels with
// Chan's formula once per chunk. (A two-pass reduction per cached block, the
// other numerically safe choice, leaves DRAM idle while it makes its second
// pass; this one keeps a single ascending stream the prefetchers follow.)
// Every value is first shifted by its channel's value in the first row, so
// the partial means are of the order of the spread, not of the mean: with a
// mean of 1e4 the updates and the many merges would otherwise each round to
// float's spacing there, and their bias would add up.
// With `shift` given, the means are returned relative to the first row,
// which is stored there, so a caller can add it back in a wider type.
template <typename scalar_t, typename acc_t>
std::vector<MeanM2<acc_t>> rowwise_stats(const scalar_t* data, int64_t total, int64_t C,
                                         std::vector<acc_t>* shift_out = nullptr) {
  const RowPeriod period(C);
  std::vector<acc_t> first_row(C, acc_t(0));
  for (int64_t c = 0; c < C && c < total; ++c) first_row[c] = static_cast<acc_t>(data[c]);
  const auto shift = period.tile(first_row);
  const int64_t max_chunks = 4 * at::get_num_threads();
  std::vector<std::vector<MeanM2<acc_t>>> partial(max_chunks, std::vector<MeanM2<acc_t>>(C));
  const int64_t chunks = for_each_chunk(period, total, [&](int64_t k, int64_t begin, int64_t end) {
    std::vector<acc_t> staged(kSameType<scalar_t, acc_t> ? 0 : period.length), mean(period.length, 0),
        m2(period.length, 0);
    int64_t periods = 0, tail = 0;  // positions [0, tail) saw periods + 1 values, the rest periods
    for (int64_t off = begin; off < end; off += period.length) {
      const int64_t len = std::min(period.length, end - off);
      welford_update<acc_t>(read_as_acc(data + off, len, staged.data()), shift.data(), mean.data(), m2.data(), len,
                            acc_t(1) / acc_t(periods + 1));
      if (len == period.length) {
        ++periods;
      } else {
        tail = len;
      }
    }
    for (int64_t i = 0; i < period.length; ++i) {
      const acc_t count = acc_t(periods + (i < tail));
      partial[k][i % C] = combine(partial[k][i % C], MeanM2<acc_t>{count, mean[i], m2[i]});
    }
  });
  std::vector<MeanM2<acc_t>> stats(C);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < C; ++c) stats[c] = combine(stats[c], partial[k][c]);
  }
  if (shift_out != nullptr) {
    *shift_out = first_row;
  } else {
    for (int64_t c = 0; c < C; ++c) stats[c].mean += first_row[c];
  }
  return stats;
}

template <typename scalar_t, typename acc_t>
void normalize_rowwise(const ForwardData<scalar_t>& d, int64_t total, int64_t C, const ChannelCoefs<acc_t>& cc,
                       acc_t slope) {
  const RowPeriod period(C);
  const auto mean = period.tile(cc.mean), scale = period.tile(cc.scale), shift = period.tile(cc.shift);
  const ForwardCoefs<true, acc_t> coefs{{mean.data()}, {scale.data()}, {shift.data()}};
  for_each_period<scalar_t, acc_t>(period, total, [&](int64_t off, int64_t len, Scratch<acc_t>& s) {
    const auto at = d.at(off);
    acc_t* y = write_target(at.out, s.out.data());
    normalize_segment<true, acc_t>(read_as_acc(at.x, len, s.x.data()),
                                   at.residual ? read_as_acc(at.residual, len, s.residual.data()) : nullptr, y, len,
                                   coefs, d.activation, slope);
    write_back(y, at.out, len);
  });
}

// SiLU's derivative (an exp) costs more than a pass over memory. When a
// rowwise backward makes a sums pass and then a dx pass, the sums pass can
// store dz into grad_input (float/double: the same type), and the dx pass
// read it back as its incoming gradient, with no activation left to apply.
// Returns where the sums pass should store dz, or null to recompute it, and
// points dx_pass (the dx pass's data) at the stored dz.
template <typename scalar_t, typename acc_t>
acc_t* keep_dz_in_grad_input(BackwardData<scalar_t>& dx_pass) {
  if constexpr (kSameType<scalar_t, acc_t>) {
    if (dx_pass.dx && dx_pass.activation == Activation::SiLU) {
      dx_pass.dy = dx_pass.dx;
      dx_pass.activation = Activation::None;
      return dx_pass.dx;
    }
  }
  return nullptr;
}

// Per-channel sum(dz) and sum(dz * (x - mean)), added into sum_dz, sum_dz_xc
// (C values each), and dz itself stored into dz_out when given. cc holds the
// forward's per-channel coefficients.
template <typename scalar_t, typename acc_t>
void rowwise_grad_sums(const BackwardData<scalar_t>& d, int64_t total, int64_t C, const ChannelCoefs<acc_t>& cc,
                       acc_t slope, acc_t* sum_dz, acc_t* sum_dz_xc, acc_t* dz_out = nullptr) {
  const RowPeriod period(C);
  const auto mean = period.tile(cc.mean), scale = period.tile(cc.scale), shift = period.tile(cc.shift);
  const ForwardCoefs<true, acc_t> fc{{mean.data()}, {scale.data()}, {shift.data()}};
  const int64_t max_chunks = 4 * at::get_num_threads();
  std::vector<std::vector<acc_t>> part_dz(max_chunks, std::vector<acc_t>(C, 0)), part_dz_xc = part_dz;
  const int64_t chunks = for_each_chunk(period, total, [&](int64_t chunk, int64_t begin, int64_t end) {
    auto s = scratch_for<scalar_t, acc_t>(period.length);
    std::vector<acc_t> col_dz(period.length, 0), col_dz_xc(period.length, 0);
    for (int64_t off = begin; off < end; off += period.length) {
      backward_sums<true, scalar_t, acc_t>(d.at(off), std::min(period.length, end - off), fc, slope, s,
                                           col_dz.data(), col_dz_xc.data(), dz_out ? dz_out + off : nullptr);
    }
    period.fold_into(col_dz, part_dz[chunk].data());
    period.fold_into(col_dz_xc, part_dz_xc[chunk].data());
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t c = 0; c < C; ++c) {
      sum_dz[c] += part_dz[chunk][c];
      sum_dz_xc[c] += part_dz_xc[chunk][c];
    }
  }
}

// Per-channel gradient coefficients of a rowwise backward.
template <typename acc_t>
struct ChannelGradCoefs {
  std::vector<acc_t> dz_coef, xc_coef, const_coef;
  explicit ChannelGradCoefs(int64_t C) : dz_coef(C), xc_coef(C), const_coef(C) {}
};

template <typename scalar_t, typename acc_t>
void rowwise_grad_elementwise(const BackwardData<scalar_t>& d, int64_t total, int64_t C,
                              const ChannelCoefs<acc_t>& cc, const ChannelGradCoefs<acc_t>& gc, acc_t slope) {
  const RowPeriod period(C);
  const auto mean = period.tile(cc.mean), scale = period.tile(cc.scale), shift = period.tile(cc.shift);
  const ForwardCoefs<true, acc_t> fc{{mean.data()}, {scale.data()}, {shift.data()}};
  const auto dz_t = period.tile(gc.dz_coef), xc_t = period.tile(gc.xc_coef), const_t = period.tile(gc.const_coef);
  const GradCoefs<true, acc_t> k{{dz_t.data()}, {xc_t.data()}, {const_t.data()}};
  for_each_period<scalar_t, acc_t>(period, total, [&](int64_t off, int64_t len, Scratch<acc_t>& s) {
    backward_elementwise<true, scalar_t, acc_t>(d.at(off), len, fc, k, slope, s);
  });
}

}  // namespace cpu
}  // namespace torchnorm
