// CPU kernels of Cosine Normalization (cosine_linear, cosine_conv2d and their
// backwards): the backend half of common/cosine_norm_plan.h, whose drivers
// run ATen's dot product (matmul or convolution) and these.
//
// Patch norms: per (sample, group), the channel sum of x^2 at every input
// position (one pass over the input, vectorized along the positions), then
// the 2-d windowed sum of that plane, separably: the window's rows (whole
// rows added, vectorized), then its columns. The backward's norm term is the
// transpose: q scattered back through the columns, then the rows, and
// grad_x -= x * that, one pass over grad_x. No convolution with a ones
// tensor: the window sums work on one plane per group, not on every channel.
//
// The output, and its gradient, are walked as "lines" of contiguous elements
// that share one of their two scales (rw per output channel, rx per sample,
// group and position): with more than one output position per channel
// (planar) a line is the P positions of one (n, o), rw[o] one value and
// rx[n, g, :] a row; with one (a linear layer) a line is the Og outputs of one
// (n, g), rw a row and rx[n, g] one value. Both are vectorized along the line.
//
// Reductions are in acc_t (float; double for double) and deterministic: the
// per-output-channel sums are partials per sample (planar) or per fixed block
// of rows (linear), added in order, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cosine_norm_math.h"
#include "common/cosine_norm_plan.h"
#include "cpu/kernel_helpers.h"

namespace torchnorm::cpu {
namespace {

using at::Tensor;

// Rows per block of the linear layer's per-output-channel partial sums: a
// fixed size, so the sums do not depend on the thread count.
constexpr int64_t kRowBlock = 32;

// ------------------------------------------------------------ window sums --

template <typename acc_t>
void add_into(acc_t* dst, const acc_t* src, int64_t n) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(dst + i) + Vec::loadu(src + i)).store(dst + i);
  for (; i < n; ++i) dst[i] += src[i];
}

// out[a, o, b] = sum over the taps i of in[a, win.tap(o, i), b] (taps outside
// the input are zero padding), for a < outer, b < inner: the window along
// one dimension of an (outer, win.in, inner) array.
template <typename acc_t>
void window_sum(const acc_t* in, acc_t* out, const Window1d& win, int64_t outer, int64_t inner) {
  for (int64_t a = 0; a < outer; ++a) {
    for (int64_t o = 0; o < win.out; ++o) {
      acc_t* dst = out + (a * win.out + o) * inner;
      std::fill(dst, dst + inner, acc_t(0));
      for (int64_t i = 0; i < win.size; ++i) {
        const int64_t x = win.tap(o, i);
        if (x >= 0 && x < win.in) add_into(dst, in + (a * win.in + x) * inner, inner);
      }
    }
  }
}

// The transpose of window_sum: out[a, x, b] = sum over the (o, i) with
// win.tap(o, i) == x of in[a, o, b].
template <typename acc_t>
void window_scatter(const acc_t* in, acc_t* out, const Window1d& win, int64_t outer, int64_t inner) {
  std::fill(out, out + outer * win.in * inner, acc_t(0));
  for (int64_t a = 0; a < outer; ++a) {
    for (int64_t o = 0; o < win.out; ++o) {
      for (int64_t i = 0; i < win.size; ++i) {
        const int64_t x = win.tap(o, i);
        if (x >= 0 && x < win.in) add_into(out + (a * win.in + x) * inner, in + (a * win.out + o) * inner, inner);
      }
    }
  }
}

// Buffers of one task's plane work.
template <typename acc_t>
struct PlaneBuffers {
  explicit PlaneBuffers(const CosineGeometry& g)
      : plane(g.HW()), between(g.Ho() * g.W), patches(g.P()) {}
  std::vector<acc_t> plane;    // (H, W)
  std::vector<acc_t> between;  // (Ho, W): the rows summed, the columns not
  std::vector<acc_t> patches;  // (Ho, Wo)
};

// patches = the windowed sums of plane: rows, then columns.
template <typename acc_t>
void patch_sums(PlaneBuffers<acc_t>& b, const CosineGeometry& g) {
  window_sum(b.plane.data(), b.between.data(), g.rows, 1, g.W);
  window_sum(b.between.data(), b.patches.data(), g.cols, g.Ho(), 1);
}

// plane = patches scattered back through the window: columns, then rows.
template <typename acc_t>
void patch_scatter(PlaneBuffers<acc_t>& b, const CosineGeometry& g) {
  window_scatter(b.patches.data(), b.between.data(), g.cols, g.Ho(), 1);
  window_scatter(b.between.data(), b.plane.data(), g.rows, 1, g.W);
}

// ------------------------------------------------------------ the norms --

template <typename scalar_t, typename acc_t>
acc_t sum_of_squares(const scalar_t* x, int64_t n, Scratch<acc_t>& s) {
  acc_t total = 0;
  for_each_segment(n, [&](int64_t off, int64_t len) {
    const acc_t* a = read_as_acc(x + off, len, s.x.data());
    total += sum_segment<acc_t>(a, a, len);
  });
  return total;
}

// plane[p] = sum over the Cg channels of x[c, p]^2, for a group of Cg planes of HW positions.
template <typename scalar_t, typename acc_t>
void channel_sum_of_squares(const scalar_t* x, int64_t Cg, int64_t HW, acc_t* plane, Scratch<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  if (HW == 1) {  // the channels are contiguous: vectorize along them
    plane[0] = sum_of_squares(x, Cg, s);
    return;
  }
  std::fill(plane, plane + HW, acc_t(0));
  for (int64_t c = 0; c < Cg; ++c) {
    for_each_segment(HW, [&](int64_t off, int64_t len) {
      const acc_t* a = read_as_acc(x + c * HW + off, len, s.x.data());
      acc_t* dst = plane + off;
      int64_t i = 0;
      for (; i + Vec::size() <= len; i += Vec::size()) {
        const Vec v = Vec::loadu(a + i);
        at::vec::fmadd(v, v, Vec::loadu(dst + i)).store(dst + i);
      }
      for (; i < len; ++i) dst[i] += a[i] * a[i];
    });
  }
}

void weight_rnorm_cpu(const Tensor& w, const std::optional<Tensor>& bias, double eps, const Tensor& rw) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "cosine_weight_rnorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t O = w.size(0), K = w.size(1);
    const scalar_t* wd = w.const_data_ptr<scalar_t>();
    const std::vector<acc_t> b = channel_values<acc_t>(bias, O, acc_t(0));
    acc_t* rwd = rw.mutable_data_ptr<acc_t>();
    at::parallel_for(0, O, grain_for(K), [&](int64_t begin, int64_t end) {
      auto scratch = scratch_for<scalar_t, acc_t>(kSegment);
      for (int64_t o = begin; o < end; ++o) {
        rwd[o] = cosine_rnorm(sum_of_squares(wd + o * K, K, scratch) + b[o] * b[o], acc_t(eps));
      }
    });
  });
}

// ------------------------------------------------------------ the lines --

// Whether the output is walked rowwise (one position per channel: rw varies
// along a line) or planar (rx varies along a line).
bool rowwise(const CosineGeometry& g) { return g.P() == 1; }

// The scales of one line: kRwAlong says which one varies along it.
template <bool kRwAlong, typename acc_t>
struct LineScales {
  Coef<kRwAlong, acc_t> rw;
  Coef<!kRwAlong, acc_t> rx;
  LineScales at(int64_t off) const {  // the scales of the line's elements from off on
    return {{rw.p + (kRwAlong ? off : 0)}, {rx.p + (kRwAlong ? 0 : off)}};
  }
};

// The line of output channel o of sample n (planar), or of group g of sample n (rowwise).
template <typename acc_t>
LineScales<false, acc_t> planar_line(const acc_t* rw, const acc_t* rx, const CosineGeometry& g, int64_t n,
                                     int64_t o) {
  return {{rw + o}, {rx + (n * g.G + o / g.Og()) * g.P()}};
}
template <typename acc_t>
LineScales<true, acc_t> rowwise_line(const acc_t* rw, const acc_t* rx, const CosineGeometry& g, int64_t n,
                                     int64_t group) {
  return {{rw + group * g.Og()}, {rx + n * g.G + group}};
}

// out = in * rw * rx along one segment of a line.
template <bool kRwAlong, typename acc_t>
void scale_segment(const acc_t* in, acc_t* out, int64_t n, const LineScales<kRwAlong, acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  const auto rw = s.rw.vectors();
  const auto rx = s.rx.vectors();
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) cosine_scale(Vec::loadu(in + i), rw.at(i), rx.at(i)).store(out + i);
  for (; i < n; ++i) out[i] = cosine_scale(in[i], s.rw.at(i), s.rx.at(i));
}

template <bool kRwAlong, typename scalar_t, typename acc_t>
void scale_line(const scalar_t* in, scalar_t* out, int64_t len, const LineScales<kRwAlong, acc_t>& s,
                Scratch<acc_t>& scratch) {
  for_each_segment(len, [&](int64_t off, int64_t n) {
    acc_t* y = write_target(out + off, scratch.out.data());
    scale_segment(read_as_acc(in + off, n, scratch.x.data()), y, n, s.at(off));
    write_back(y, out + off, n);
  });
}

// Per (sample, group): the group's patch norms rx (its channels' sums of
// squares, then the window sums), then its outputs scaled by rw and rx in
// place, while rx is in L1: one pass, one parallel region.
void normalize_cpu(const Tensor& x, const Tensor& rw, const CosineGeometry& g, double constant, double eps,
                   const Tensor& rx, const Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cosine_normalize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* yd = y.mutable_data_ptr<scalar_t>();
    const acc_t* rwd = rw.const_data_ptr<acc_t>();
    acc_t* rxd = rx.mutable_data_ptr<acc_t>();
    const int64_t group_elements = g.Cg() * g.HW(), P = g.P(), Og = g.Og();
    at::parallel_for(0, g.N * g.G, grain_for(group_elements + Og * P), [&](int64_t begin, int64_t end) {
      PlaneBuffers<acc_t> b(g);
      auto scratch = scratch_for<scalar_t, acc_t>(kSegment);
      for (int64_t ng = begin; ng < end; ++ng) {  // (n, g): its channels are the ng-th block of Cg
        channel_sum_of_squares(xd + ng * group_elements, g.Cg(), g.HW(), b.plane.data(), scratch);
        patch_sums(b, g);
        for (int64_t p = 0; p < P; ++p) rxd[ng * P + p] = cosine_rnorm(b.patches[p] + acc_t(constant), acc_t(eps));
        const int64_t n = ng / g.G, group = ng % g.G;
        if (rowwise(g)) {  // the group's outputs of sample n: one line at n * O + group * Og
          scale_line(yd + ng * Og, yd + ng * Og, Og, rowwise_line(rwd, rxd, g, n, group), scratch);
          continue;
        }
        for (int64_t o = group * Og; o < (group + 1) * Og; ++o) {
          scalar_t* line = yd + (n * g.O + o) * P;
          scale_line(line, line, P, planar_line(rwd, rxd, g, n, o), scratch);
        }
      }
    });
  });
}

// ------------------------------------------------------- gradient sums --

// One segment of a line of the backward: gd = dy * rw * rx; dy * y and gd
// added per element into along_gy, along_gd (the sums of the scale that
// varies along the line; along_gd may be null) and into the vector lanes
// lanes_gy, lanes_gd (the sums of the scale that is one value).
template <bool kRwAlong, typename acc_t>
void grad_segment(const acc_t* dy, const acc_t* y, acc_t* gd, int64_t n, const LineScales<kRwAlong, acc_t>& s,
                  acc_t* along_gy, acc_t* along_gd, Vectorized<acc_t>& lanes_gy, Vectorized<acc_t>& lanes_gd) {
  using Vec = Vectorized<acc_t>;
  const auto rw = s.rw.vectors();
  const auto rx = s.rx.vectors();
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = Vec::loadu(dy + i), gy = d * Vec::loadu(y + i), scaled = cosine_scale(d, rw.at(i), rx.at(i));
    scaled.store(gd + i);
    (Vec::loadu(along_gy + i) + gy).store(along_gy + i);
    if (along_gd) (Vec::loadu(along_gd + i) + scaled).store(along_gd + i);
    lanes_gy = lanes_gy + gy;
    lanes_gd = lanes_gd + scaled;
  }
  acc_t tail_gy = 0, tail_gd = 0;
  for (; i < n; ++i) {
    const acc_t gy = dy[i] * y[i], scaled = cosine_scale(dy[i], s.rw.at(i), s.rx.at(i));
    gd[i] = scaled;
    along_gy[i] += gy;
    if (along_gd) along_gd[i] += scaled;
    tail_gy += gy;
    tail_gd += scaled;
  }
  // The tail joins lane 0, so a line's total is the lanes' sum.
  lanes_gy = lanes_gy + Vec::set(Vec(0), Vec(tail_gy), 1);
  lanes_gd = lanes_gd + Vec::set(Vec(0), Vec(tail_gd), 1);
}

// A whole line: staged, segment by segment.
template <bool kRwAlong, typename scalar_t, typename acc_t>
void grad_line(const scalar_t* dy, const scalar_t* y, scalar_t* gd, int64_t len, const LineScales<kRwAlong, acc_t>& s,
               acc_t* along_gy, acc_t* along_gd, Vectorized<acc_t>& lanes_gy, Vectorized<acc_t>& lanes_gd,
               Scratch<acc_t>& scratch) {
  for_each_segment(len, [&](int64_t off, int64_t n) {
    acc_t* out = write_target(gd + off, scratch.out.data());
    grad_segment(read_as_acc(dy + off, n, scratch.dy.data()), read_as_acc(y + off, n, scratch.x.data()), out, n,
                 s.at(off), along_gy + off, along_gd ? along_gd + off : nullptr, lanes_gy, lanes_gd);
    write_back(out, gd + off, n);
  });
}

void grad_sums_cpu(const Tensor& dy, const Tensor& y, const Tensor& rw, const Tensor& rx, const CosineGeometry& g,
                   const Tensor& gd, const Tensor& q, const Tensor& t, const Tensor& sum_gd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "cosine_grad_sums_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const scalar_t *dyd = dy.const_data_ptr<scalar_t>(), *yd = y.const_data_ptr<scalar_t>();
    scalar_t* gdd = gd.mutable_data_ptr<scalar_t>();
    const acc_t *rwd = rw.const_data_ptr<acc_t>(), *rxd = rx.const_data_ptr<acc_t>();
    acc_t* qd = q.mutable_data_ptr<acc_t>();
    const int64_t O = g.O, Og = g.Og(), P = g.P();
    // Per-output-channel partial sums of dy * y and gd, one row of O per
    // sample (planar) or per block of kRowBlock rows (rowwise).
    const bool rows = rowwise(g);
    const int64_t parts = rows ? (g.N + kRowBlock - 1) / kRowBlock : g.N;
    std::vector<acc_t> part_gy(parts * O, acc_t(0)), part_gd(parts * O, acc_t(0));
    if (rows) {
      at::parallel_for(0, parts, grain_for(kRowBlock * O), [&](int64_t begin, int64_t end) {
        auto scratch = scratch_for<scalar_t, acc_t>(kSegment);
        for (int64_t block = begin; block < end; ++block) {
          acc_t *col_gy = part_gy.data() + block * O, *col_gd = part_gd.data() + block * O;
          for (int64_t n = block * kRowBlock; n < std::min(g.N, (block + 1) * kRowBlock); ++n) {
            for (int64_t group = 0; group < g.G; ++group) {
              Vec lanes_gy(0), lanes_gd(0);
              const int64_t off = n * O + group * Og;
              grad_line(dyd + off, yd + off, gdd + off, Og, rowwise_line(rwd, rxd, g, n, group),
                        col_gy + group * Og, col_gd + group * Og, lanes_gy, lanes_gd, scratch);
              qd[n * g.G + group] = cosine_norm_grad_coefficient(rxd[n * g.G + group], lane_sum(lanes_gy));
            }
          }
        }
      });
    } else {
      at::parallel_for(0, g.N * g.G, grain_for(Og * P), [&](int64_t begin, int64_t end) {
        auto scratch = scratch_for<scalar_t, acc_t>(kSegment);
        std::vector<acc_t> patch_gy(P);
        for (int64_t ng = begin; ng < end; ++ng) {
          const int64_t n = ng / g.G;
          std::fill(patch_gy.begin(), patch_gy.end(), acc_t(0));
          for (int64_t o = (ng % g.G) * Og; o < (ng % g.G + 1) * Og; ++o) {
            Vec lanes_gy(0), lanes_gd(0);
            const int64_t off = (n * O + o) * P;
            grad_line(dyd + off, yd + off, gdd + off, P, planar_line(rwd, rxd, g, n, o), patch_gy.data(), static_cast<acc_t*>(nullptr),
                      lanes_gy, lanes_gd, scratch);
            part_gy[n * O + o] = lane_sum(lanes_gy);
            part_gd[n * O + o] = lane_sum(lanes_gd);
          }
          for (int64_t p = 0; p < P; ++p) qd[ng * P + p] = cosine_norm_grad_coefficient(rxd[ng * P + p], patch_gy[p]);
        }
      });
    }
    acc_t *td = t.mutable_data_ptr<acc_t>(), *sgd = sum_gd.mutable_data_ptr<acc_t>();
    for (int64_t o = 0; o < O; ++o) {
      acc_t gy = 0, sum = 0;
      for (int64_t k = 0; k < parts; ++k) {
        gy += part_gy[k * O + o];
        sum += part_gd[k * O + o];
      }
      td[o] = cosine_norm_grad_coefficient(rwd[o], gy);
      sgd[o] = sum;
    }
  });
}

// --------------------------------------------------- the norms' terms --

// a -= b * coef along n elements (coef one value, or one per element).
template <bool kPerElement, typename scalar_t, typename acc_t>
void subtract_scaled(scalar_t* a, const scalar_t* b, Coef<kPerElement, acc_t> coef, int64_t len, Scratch<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  for_each_segment(len, [&](int64_t off, int64_t n) {
    const acc_t* av = read_as_acc(a + off, n, s.x.data());
    const acc_t* bv = read_as_acc(b + off, n, s.dy.data());
    acc_t* out = write_target(a + off, s.out.data());
    const Coef<kPerElement, acc_t> c{coef.p + (kPerElement ? off : 0)};
    const auto c_vec = c.vectors();
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      (Vec::loadu(av + i) - Vec::loadu(bv + i) * c_vec.at(i)).store(out + i);
    }
    for (; i < n; ++i) out[i] = av[i] - bv[i] * c.at(i);
    write_back(out, a + off, n);
  });
}

void input_norm_grad_cpu(const Tensor& grad_x, const Tensor& x, const Tensor& q, const CosineGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cosine_input_norm_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* gxd = grad_x.mutable_data_ptr<scalar_t>();
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    const acc_t* qd = q.const_data_ptr<acc_t>();
    const int64_t HW = g.HW(), Cg = g.Cg(), P = g.P(), group_elements = Cg * HW;
    at::parallel_for(0, g.N * g.G, grain_for(group_elements), [&](int64_t begin, int64_t end) {
      PlaneBuffers<acc_t> b(g);
      auto scratch = scratch_for<scalar_t, acc_t>(kSegment);
      for (int64_t ng = begin; ng < end; ++ng) {
        std::copy(qd + ng * P, qd + (ng + 1) * P, b.patches.begin());
        patch_scatter(b, g);
        scalar_t* gx = gxd + ng * group_elements;
        const scalar_t* xs = xd + ng * group_elements;
        if (HW == 1) {  // one position: the group's channels are contiguous
          subtract_scaled(gx, xs, Coef<false, acc_t>{b.plane.data()}, Cg, scratch);
          continue;
        }
        for (int64_t c = 0; c < Cg; ++c) {
          subtract_scaled(gx + c * HW, xs + c * HW, Coef<true, acc_t>{b.plane.data()}, HW, scratch);
        }
      }
    });
  });
}

void weight_norm_grad_cpu(const Tensor& grad_w, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& t,
                          const Tensor& sum_gd, const Tensor& grad_b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "cosine_weight_norm_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t O = w.size(0), K = w.size(1);
    const acc_t *td = t.const_data_ptr<acc_t>(), *sgd = sum_gd.const_data_ptr<acc_t>();
    if (grad_w.defined()) {
      scalar_t* gwd = grad_w.mutable_data_ptr<scalar_t>();
      const scalar_t* wd = w.const_data_ptr<scalar_t>();
      at::parallel_for(0, O, grain_for(K), [&](int64_t begin, int64_t end) {
        auto scratch = scratch_for<scalar_t, acc_t>(kSegment);
        for (int64_t o = begin; o < end; ++o) subtract_scaled(gwd + o * K, wd + o * K, Coef<false, acc_t>{td + o}, K, scratch);
      });
    }
    if (grad_b.defined()) {
      const std::vector<acc_t> b = channel_values<acc_t>(bias, O, acc_t(0));
      scalar_t* gbd = grad_b.mutable_data_ptr<scalar_t>();
      for (int64_t o = 0; o < O; ++o) gbd[o] = static_cast<scalar_t>(sgd[o] - b[o] * td[o]);
    }
  });
}

const CosineKernels kCpuKernels{weight_rnorm_cpu, normalize_cpu, grad_sums_cpu, input_norm_grad_cpu,
                                weight_norm_grad_cpu};

}  // namespace
}  // namespace torchnorm::cpu

TORCH_LIBRARY_IMPL(torchnorm, CPU, m) {
  using Ops = torchnorm::CosineOps<torchnorm::cpu::kCpuKernels>;
  m.impl("cosine_linear", &Ops::linear);
  m.impl("cosine_linear_backward", &Ops::linear_backward);
  m.impl("cosine_conv2d", &Ops::conv2d);
  m.impl("cosine_conv2d_backward", &Ops::conv2d_backward);
}
