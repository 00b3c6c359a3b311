// CPU kernels of Weight Normalization (weight_norm, weight_norm_backward).
// Both directions are one per-slice reduction and one element-wise pass:
//
//   forward   ss = sum(v^2) per slice, norm = sqrt(ss),
//             w = v * g / max(norm, eps);
//   backward  d = sum(grad_w * v) per slice, grad_g = d / norm,
//             grad_v = grad_w * k1 + v * k2 (common/weight_norm_math.h).
//
// v is taken as contiguous (outer, slices, inner) (common/weight_norm_plan.h).
// Where each slice is one contiguous run that fits in L2 (dim 0, the usual
// case: a Linear's or a convolution's output channels), one task reduces a
// slice and writes its output right after, while the slice is still in
// cache, so each direction reads v (and grad_w) from memory once. Otherwise
// the reduction runs first over the whole tensor (in parallel, with
// per-task partial sums combined in a fixed order), then the element-wise
// pass. Every partition depends on the shapes only, never on the thread
// count, so the results are the same bits on every run and thread count.
// float16/bfloat16 data is converted to float per L1-sized segment: every
// sum and product is in float (double for float64).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/input_checks.h"
#include "common/weight_norm_math.h"
#include "common/weight_norm_plan.h"
#include "cpu/kernel_helpers.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace torchnorm::cpu {
namespace {

using at::Tensor;

// A slice of one contiguous run up to this long is reduced and written by
// one task (256 KiB of float: it stays in L2 between the two passes).
constexpr int64_t kWholeSlice = int64_t(1) << 16;
// Longer runs are reduced in pieces of this many elements, one task each.
constexpr int64_t kPiece = int64_t(1) << 15;
// Runs shorter than this (inner < kShortRun: e.g. dim 1 of a 3x3
// convolution, or the last dim) are too short to vectorize one by one: the
// passes then walk whole rows of slices * inner elements against
// per-position arrays instead.
constexpr int64_t kShortRun = 16;
// The reduction over such rows keeps one partial sum per position of a row
// in each chunk of rows; at most this many chunks.
constexpr int64_t kMaxRowChunks = 64;
// Outputs at least this big (a 4096 x 4096 float weight is 64 MiB) would not
// stay in cache anyway: they are written with streaming stores, which skip
// reading each line before writing it (a third of the forward's traffic).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Whether an output of numel scalar_t values is written with streaming
// stores: float and double (written in place, not staged), AVX2 builds.
template <typename scalar_t, typename acc_t>
bool streams_output(int64_t numel) {
#if defined(CPU_CAPABILITY_AVX2)
  return kSameType<scalar_t, acc_t> && numel * int64_t(sizeof(scalar_t)) >= kStreamBytes;
#else
  return false;
#endif
}

// v to p: a streaming store (p 32-byte aligned) when `stream`, else a plain one.
template <typename acc_t>
void store_vector(const Vectorized<acc_t>& v, acc_t* p, bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    if constexpr (std::is_same_v<acc_t, float>) return _mm256_stream_ps(p, v);
    if constexpr (std::is_same_v<acc_t, double>) return _mm256_stream_pd(p, v);
  }
#endif
  v.store(p);
}

// Streaming stores are weakly ordered: a task that made them fences before
// its results are read elsewhere.
inline void finish_streaming(bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();
#endif
}

// ---------------------------------------------------------- contiguous runs --

// sum(a * b) over n contiguous elements (a == b: the sum of squares).
template <typename scalar_t, typename acc_t>
acc_t dot_range(const scalar_t* a, const scalar_t* b, int64_t n, Scratch<acc_t>& s) {
  acc_t total = 0;
  for_each_segment(n, [&](int64_t off, int64_t len) {
    const acc_t* x = read_as_acc(a + off, len, s.x.data());
    const acc_t* y = a == b ? x : read_as_acc(b + off, len, s.dy.data());
    total += sum_segment<acc_t>(x, y, len);
  });
  return total;
}

template <bool kPerElement, typename acc_t>
Coef<kPerElement, acc_t> shifted_coef(Coef<kPerElement, acc_t> c, int64_t off) {
  if constexpr (kPerElement) c.p += off;
  return c;
}

// out = x * ca, or weight_norm_grad_v(x, y, ca, cb) = x * ca + y * cb when y
// is given, over n contiguous elements; ca, cb one value for the run or one
// per element. stream: streaming stores (streams_output).
template <bool kPerElement, typename scalar_t, typename acc_t>
void combine_range(scalar_t* out, const scalar_t* x, const scalar_t* y, Coef<kPerElement, acc_t> ca,
                   Coef<kPerElement, acc_t> cb, int64_t n, bool stream, Scratch<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  for_each_segment(n, [&](int64_t off, int64_t len) {
    const acc_t* xs = read_as_acc(x + off, len, s.x.data());
    const acc_t* ys = y ? read_as_acc(y + off, len, s.dy.data()) : nullptr;
    acc_t* o = write_target(out + off, s.out.data());
    const auto a = shifted_coef(ca, off), b = shifted_coef(cb, off);
    const auto element = [&](int64_t i) {
      o[i] = ys ? weight_norm_grad_v(xs[i], ys[i], a.at(i), b.at(i)) : xs[i] * a.at(i);
    };
    // A streaming store wants a 32-byte aligned target: the elements before
    // the first aligned one go one by one.
    const int64_t misaligned = int64_t(reinterpret_cast<std::uintptr_t>(o) % 32) / int64_t(sizeof(acc_t));
    const int64_t head = stream && misaligned ? std::min(len, 32 / int64_t(sizeof(acc_t)) - misaligned) : 0;
    // Broadcast before the loop (vectors()): per vector, it made the
    // backward of a 256x256x3x3 weight 10% slower.
    const auto a_vec = a.vectors(), b_vec = b.vectors();
    int64_t i = 0;
    for (; i < head; ++i) element(i);
    if (ys) {
      for (; i + Vec::size() <= len; i += Vec::size()) {
        const Vec v = weight_norm_grad_v(Vec::loadu(xs + i), Vec::loadu(ys + i), a_vec.at(i), b_vec.at(i));
        store_vector(v, o + i, stream);
      }
    } else {
      for (; i + Vec::size() <= len; i += Vec::size()) store_vector(Vec::loadu(xs + i) * a_vec.at(i), o + i, stream);
    }
    for (; i < len; ++i) element(i);
    write_back(o, out + off, len);
  });
}

// fn(offset, length, index) for the pieces of [begin, end) that stay inside
// one run of `run` elements, index = offset / run.
template <typename Fn>
void for_each_run_piece(int64_t begin, int64_t end, int64_t run, const Fn& fn) {
  for (int64_t off = begin; off < end;) {
    const int64_t index = off / run;
    const int64_t len = std::min(end, (index + 1) * run) - off;
    fn(off, len, index);
    off += len;
  }
}

// ------------------------------------------------------ whole-tensor passes --

// Per-slice sum(a * b) over the whole tensor, in a fixed order.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> slice_dots(const scalar_t* a, const scalar_t* b, const WeightNormPlan& p) {
  const int64_t S = p.slices;
  std::vector<acc_t> dots(S, acc_t(0));
  if (p.inner >= kShortRun || p.outer == 1) {
    // One partial per piece of each run (o, s); summed per slice in (o, piece) order.
    const int64_t pieces = std::max<int64_t>(1, (p.inner + kPiece - 1) / kPiece);
    const int64_t units = p.outer * S * pieces;
    std::vector<acc_t> partial(units);
    at::parallel_for(0, units, grain_for(std::min(p.inner, kPiece)), [&](int64_t u0, int64_t u1) {
      Scratch<acc_t> s = scratch_for<scalar_t, acc_t>(kSegment);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t run = u / pieces, begin = (u % pieces) * kPiece;
        const int64_t off = run * p.inner + begin;
        partial[u] = dot_range<scalar_t, acc_t>(a + off, b + off, std::min(kPiece, p.inner - begin), s);
      }
    });
    for (int64_t u = 0; u < units; ++u) dots[(u / pieces) % S] += partial[u];
    return dots;
  }
  // Short runs: each chunk of rows sums a * b per position of a row
  // (vectorized along the row), then folds its positions into slices.
  const int64_t row = S * p.inner;
  const int64_t rows_per_chunk = std::max((p.outer + kMaxRowChunks - 1) / kMaxRowChunks, (kPiece + row - 1) / row);
  const int64_t chunks = (p.outer + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<std::vector<acc_t>> partial(chunks, std::vector<acc_t>(S, acc_t(0)));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    using Vec = Vectorized<acc_t>;
    Scratch<acc_t> s = scratch_for<scalar_t, acc_t>(kSegment);
    std::vector<acc_t> per_position(row);
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(per_position.begin(), per_position.end(), acc_t(0));
      for (int64_t o = c * rows_per_chunk; o < std::min(p.outer, (c + 1) * rows_per_chunk); ++o) {
        for_each_segment(row, [&](int64_t off, int64_t len) {
          const acc_t* x = read_as_acc(a + o * row + off, len, s.x.data());
          const acc_t* y = a == b ? x : read_as_acc(b + o * row + off, len, s.dy.data());
          acc_t* acc = per_position.data() + off;
          int64_t i = 0;
          for (; i + Vec::size() <= len; i += Vec::size()) {
            at::vec::fmadd(Vec::loadu(x + i), Vec::loadu(y + i), Vec::loadu(acc + i)).store(acc + i);
          }
          for (; i < len; ++i) acc[i] += x[i] * y[i];
        });
      }
      for (int64_t i = 0; i < row; ++i) partial[c][i / p.inner] += per_position[i];
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t s = 0; s < S; ++s) dots[s] += partial[c][s];
  }
  return dots;
}

// out = x * ca[s] (+ y * cb[s]) over the whole tensor, s each element's slice.
template <typename scalar_t, typename acc_t>
void slice_combine(scalar_t* out, const scalar_t* x, const scalar_t* y, const std::vector<acc_t>& ca,
                   const std::vector<acc_t>& cb, const WeightNormPlan& p) {
  const int64_t S = p.slices;
  const bool stream = streams_output<scalar_t, acc_t>(p.numel());
  if (p.inner >= kShortRun) {
    // Runs long enough to vectorize: one coefficient per run.
    at::parallel_for(0, p.numel(), kMinTaskElements, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> s = scratch_for<scalar_t, acc_t>(kSegment);
      for_each_run_piece(begin, end, p.inner, [&](int64_t off, int64_t len, int64_t run) {
        const int64_t slice = run % S;
        combine_range<false, scalar_t, acc_t>(out + off, x + off, y ? y + off : nullptr, {&ca[slice]}, {&cb[slice]},
                                              len, stream, s);
      });
      finish_streaming(stream);
    });
    return;
  }
  // Short runs: the coefficients repeated over each run, as arrays of one row.
  const int64_t row = S * p.inner;
  std::vector<acc_t> row_a(row), row_b(row);
  for (int64_t i = 0; i < row; ++i) {
    row_a[i] = ca[i / p.inner];
    row_b[i] = cb[i / p.inner];
  }
  at::parallel_for(0, p.numel(), kMinTaskElements, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s = scratch_for<scalar_t, acc_t>(kSegment);
    for_each_run_piece(begin, end, row, [&](int64_t off, int64_t len, int64_t r) {
      const int64_t pos = off - r * row;
      combine_range<true, scalar_t, acc_t>(out + off, x + off, y ? y + off : nullptr, {row_a.data() + pos},
                                           {row_b.data() + pos}, len, stream, s);
    });
    finish_streaming(stream);
  });
}

// Either direction: d = sum(a * b) per slice, (ca, cb) = coefs(slice, d)
// (called once per slice, possibly from several threads), then
// out = x * ca (+ y * cb). out null: the reduction and coefs only.
template <typename scalar_t, typename acc_t, typename Coefs>
void reduce_then_combine(const WeightNormPlan& p, const scalar_t* a, const scalar_t* b, const Coefs& coefs,
                         scalar_t* out, const scalar_t* x, const scalar_t* y) {
  if (p.outer == 1 && p.inner <= kWholeSlice) {
    // Each slice is one contiguous run that fits in L2: reduce it, then
    // write it, in the same task.
    const bool stream = streams_output<scalar_t, acc_t>(p.numel());
    at::parallel_for(0, p.slices, grain_for(p.inner), [&](int64_t s0, int64_t s1) {
      Scratch<acc_t> s = scratch_for<scalar_t, acc_t>(kSegment);
      for (int64_t slice = s0; slice < s1; ++slice) {
        const int64_t off = slice * p.inner;
        const auto [ca, cb] = coefs(slice, dot_range<scalar_t, acc_t>(a + off, b + off, p.inner, s));
        if (out) {
          combine_range<false, scalar_t, acc_t>(out + off, x + off, y ? y + off : nullptr, {&ca}, {&cb}, p.inner,
                                                stream, s);
        }
      }
      finish_streaming(stream);
    });
    return;
  }
  const std::vector<acc_t> dots = slice_dots<scalar_t, acc_t>(a, b, p);
  std::vector<acc_t> ca(p.slices), cb(p.slices);
  for (int64_t s = 0; s < p.slices; ++s) std::tie(ca[s], cb[s]) = coefs(s, dots[s]);
  if (out) slice_combine<scalar_t, acc_t>(out, x, y, ca, cb, p);
}

// g (or the saved norms) as one acc_t per slice.
template <typename acc_t>
std::vector<acc_t> per_slice_values(const Tensor& t) {
  const Tensor c = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return std::vector<acc_t>(c.const_data_ptr<acc_t>(), c.const_data_ptr<acc_t>() + c.numel());
}

std::tuple<Tensor, Tensor> weight_norm_cpu(const Tensor& v_in, const Tensor& g, std::optional<int64_t> dim,
                                           double eps) {
  const WeightNormPlan p = check_weight_norm("torchnorm.weight_norm", v_in, g, dim, eps);
  const Tensor v = v_in.contiguous();
  Tensor w = at::empty_like(v);
  Tensor norms = at::empty(g.sizes(), g.options().dtype(accumulate_type(v.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "weight_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> gs = per_slice_values<acc_t>(g);
    acc_t* n = norms.mutable_data_ptr<acc_t>();
    const scalar_t* vd = v.const_data_ptr<scalar_t>();
    reduce_then_combine<scalar_t, acc_t>(
        p, vd, vd,
        [&](int64_t s, acc_t sum_squares) {
          n[s] = std::sqrt(sum_squares);
          return std::pair<acc_t, acc_t>(weight_norm_scale(gs[s], n[s], acc_t(eps)), acc_t(0));
        },
        w.mutable_data_ptr<scalar_t>(), vd, nullptr);
  });
  return {w, norms};
}

std::tuple<Tensor, Tensor> weight_norm_backward_cpu(const Tensor& grad_w_in, const Tensor& v_in, const Tensor& g,
                                                    const Tensor& norms, std::optional<int64_t> dim, double eps,
                                                    std::array<bool, 2> output_mask) {
  const WeightNormPlan p =
      check_weight_norm_backward("torchnorm.weight_norm_backward", grad_w_in, v_in, g, norms, dim, eps);
  const Tensor v = v_in.contiguous(), grad_w = grad_w_in.contiguous();
  Tensor grad_v = output_mask[0] ? at::empty_like(v) : empty_placeholder(v, v.scalar_type());
  Tensor grad_g = at::empty(g.sizes(), g.options().dtype(accumulate_type(v.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "weight_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> gs = per_slice_values<acc_t>(g), ns = per_slice_values<acc_t>(norms);
    acc_t* gg = grad_g.mutable_data_ptr<acc_t>();
    const scalar_t *vd = v.const_data_ptr<scalar_t>(), *gwd = grad_w.const_data_ptr<scalar_t>();
    reduce_then_combine<scalar_t, acc_t>(
        p, gwd, vd,
        [&](int64_t s, acc_t dot) {
          const auto k = weight_norm_grad_coefs(gs[s], ns[s], dot, acc_t(eps));
          gg[s] = k.g_grad;
          return std::pair<acc_t, acc_t>(k.grad_w_coef, k.v_coef);
        },
        output_mask[0] ? grad_v.mutable_data_ptr<scalar_t>() : nullptr, gwd, vd);
  });
  return {grad_v, output_mask[1] ? grad_g.to(g.scalar_type()) : empty_placeholder(v, g.scalar_type())};
}

}  // namespace
}  // namespace torchnorm::cpu

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  m.impl("weight_norm", &torchnorm::cpu::weight_norm_cpu);
  m.impl("weight_norm_backward", &torchnorm::cpu::weight_norm_backward_cpu);
}
