#pragma once
// Device and launch helpers shared by the CUDA kernels (batch_norm.cu,
// group_norm.cu, layer_norm.cu, conv_bn.cu, online_norm.cu,
// streaming_norm.cu): vector loads, per-channel parameters of a run-time
// dtype, float32-or-float64 state tensors, occupancy-based grid sizing and the launch
// of the element-wise kernels, the flat (N, C, S) walks of those kernels and
// their gathers of per-channel (BatchNorm) and per-(sample, channel)
// (GroupNorm / InstanceNorm) coefficients, the accumulators of the reductions
// and their deterministic combination, and the row-group sums of the row
// norms. The per-element math (the pre-activation z and its gradient, the
// coefficients) is in common/batch_norm_math.h, shared with the CPU kernels.
//
// Only __device__ functions, types, inline host helpers and the host-side
// launch template launch_elementwise live here. The
// __global__ kernels stay in the .cu files, inside anonymous namespaces: a
// kernel template instantiated in two translation units would have one host
// stub picked by the linker for both, registered with only one of the two
// fatbinaries.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>

#include "common/layout.h"
#include "common/welford.h"

namespace torchnorm {

// The accumulation type: float for float, half and bfloat16, double for double
// (at::opmath_type for these four).
template <typename scalar_t>
using acc_type_of = at::acc_type<scalar_t, /*is_cuda=*/true>;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

inline bool is_aligned16(const void* p) {
  return is_aligned(p, 16);
}

// Blocks of `kernel` (`threads` threads, static shared memory only) resident
// on one SM at once; at least 1. Grids are sized in such waves: element-wise
// kernels loop over the rest (no half-empty last wave), reductions split
// their work into about that many blocks. Callers cache the answer per call
// site (a function-local static), i.e. per kernel: the first device's answer
// is reused for others, which only affects speed if a process mixes GPU
// architectures.
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads = 256) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0));
  return std::max(n, 1);
}

// Blocks that fit on the whole current GPU at once, per_sm per SM.
inline int64_t wave_blocks(int per_sm) {
  return int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Grid of an element-wise kernel of `threads` threads per block: a thread
// per VEC elements, at most one wave of blocks (per_sm per SM).
inline dim3 elementwise_grid(int64_t numel, int vec, int per_sm, int threads) {
  const int64_t threads_needed = std::max<int64_t>(1, numel / vec);
  return dim3(static_cast<unsigned>(std::min(ceil_div(threads_needed, threads), wave_blocks(per_sm))));
}

// Launches the element-wise kernel `kernel` (VEC elements per thread and
// step, `threads` per block) over numel elements with elementwise_grid.
// `kernel` is a template argument so that the occupancy is cached per kernel
// (the function-local static of each instantiation), not per signature: the
// vector and scalar instantiations of a kernel have the same type.
template <auto kernel, int VEC, int threads, typename... Args>
void launch_elementwise(int64_t numel, cudaStream_t stream, const Args&... args) {
  static const int per_sm = blocks_per_sm(kernel, threads);
  kernel<<<elementwise_grid(numel, VEC, per_sm, threads), threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block of a finalize kernel of `threads` threads: threadIdx.x picks the
// channel (or group), threadIdx.y strides over its `entries` partials, about
// 4 per thread, so a few channels with many partials each still combine in
// parallel rather than one thread walking hundreds of partials.
inline dim3 finalize_block(int64_t entries, int threads) {
  int by = 1;
  while (by < threads && int64_t(by) * 4 < entries) by *= 2;
  return dim3(threads / by, by);
}

// ---------------------------------------------------------------------------
// Vector access
// ---------------------------------------------------------------------------

// VEC elements moved as one 16-byte (or, for VEC = 1, one scalar) access.
// The element-wise kernels fetch per-channel coefficients for G consecutive
// elements at a time, G = 16 bytes of acc_t (or VEC if smaller): one vector
// load when packed, and no more than 16 bytes of each coefficient array live
// in registers (the backward has six arrays; whole-VEC gathers cost half-
// precision kernels occupancy).
template <typename scalar_t, int VEC>
constexpr int coef_chunk() {
  constexpr int per16 = 16 / int(sizeof(acc_type_of<scalar_t>));
  return VEC < per16 ? VEC : per16;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The i-th pack of p (elements i*VEC ... i*VEC + VEC-1); p + i*VEC must be
// aligned to the pack.
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p + i * VEC);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p + i * VEC) = v;
}

// ---------------------------------------------------------------------------
// Per-channel vectors with a run-time dtype
// ---------------------------------------------------------------------------

// A per-channel 1-D tensor (weight, bias, running stats, saved mean / rstd,
// grad_weight, grad_bias) in either the input's dtype or float32. Reading it
// through this instead of a second AT_DISPATCH keeps one instantiation per
// input dtype. The stride is kept because a 1-D tensor may be a strided view
// (e.g. running stats sliced out of a bigger buffer), and running stats must be
// updated in place, not in a contiguous copy.
template <typename scalar_t>
struct ChannelParam {
  using acc_t = acc_type_of<scalar_t>;
  void* ptr = nullptr;  // nullptr: the tensor is absent (or not wanted)
  int64_t stride = 1;
  bool is_float = false;  // stored as float32 rather than scalar_t

  __device__ __forceinline__ bool present() const { return ptr != nullptr; }

  __device__ __forceinline__ acc_t load(int64_t c, acc_t absent) const {
    if (ptr == nullptr) return absent;
    if (is_float) return static_cast<acc_t>(static_cast<const float*>(ptr)[c * stride]);
    return static_cast<acc_t>(static_cast<const scalar_t*>(ptr)[c * stride]);
  }

  __device__ __forceinline__ void store(int64_t c, acc_t v) const {
    if (is_float) {
      static_cast<float*>(ptr)[c * stride] = static_cast<float>(v);
    } else {
      static_cast<scalar_t*>(ptr)[c * stride] = static_cast<scalar_t>(v);
    }
  }

  // Elements i ... i+VEC-1 (absent: all `absent`) of a contiguous tensor:
  // the caller guarantees stride 1, and for VEC > 1 i % VEC == 0 and a
  // 16-byte aligned tensor, so the elements come as one 16-byte load (two for
  // float32 parameters of a half-precision input).
  template <int VEC>
  __device__ __forceinline__ void load_vec(int64_t i, acc_t absent, acc_t (&out)[VEC]) const {
    if (ptr == nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = absent;
      return;
    }
    if constexpr (VEC == 1) {
      out[0] = is_float ? static_cast<acc_t>(static_cast<const float*>(ptr)[i])
                        : static_cast<acc_t>(static_cast<const scalar_t*>(ptr)[i]);
    } else {
      if (is_float) {
        constexpr int F = VEC < 4 ? VEC : 4;  // floats per 16-byte (or smaller) load
        const float* f = static_cast<const float*>(ptr) + i;
#pragma unroll
        for (int j = 0; j < VEC; j += F) {
          const Pack<float, F> pk = *reinterpret_cast<const Pack<float, F>*>(f + j);
#pragma unroll
          for (int k = 0; k < F; ++k) out[j + k] = static_cast<acc_t>(pk.v[k]);
        }
      } else {
        const Pack<scalar_t, VEC> pk = load_pack<VEC>(static_cast<const scalar_t*>(ptr) + i, 0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = static_cast<acc_t>(pk.v[k]);
      }
    }
  }
};

template <typename scalar_t>
ChannelParam<scalar_t> channel_param(const at::Tensor& t, bool writable) {
  ChannelParam<scalar_t> p;
  if (!t.defined()) return p;
  TORCH_INTERNAL_ASSERT(t.dim() == 1);
  TORCH_INTERNAL_ASSERT(
      t.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value || t.scalar_type() == at::kFloat,
      "torchnorm: unexpected per-channel dtype ", t.scalar_type());
  // const_data_ptr for inputs: mutable_data_ptr would materialize a
  // copy-on-write storage that the kernel never writes.
  p.ptr = writable ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
  p.stride = t.stride(0);
  p.is_float = t.scalar_type() == at::kFloat;
  return p;
}

template <typename scalar_t>
ChannelParam<scalar_t> channel_param(const std::optional<at::Tensor>& t, bool writable) {
  return t.has_value() ? channel_param<scalar_t>(*t, writable) : ChannelParam<scalar_t>{};
}

// ---------------------------------------------------------------------------
// State tensors (online_norm.cu, streaming_norm.cu)
// ---------------------------------------------------------------------------

// A state tensor of (C,) values (mu, var, u or v of Online Normalization;
// one row of a Streaming Normalization history) or a 0-dim one (a history's
// count, read at index 0): float32 or float64 whatever the input's dtype,
// possibly strided, read as acc_t and written back in place. The conversions
// are the CPU's: state.to(acc_t) and state.copy_(acc_t values) are
// static_casts (round to nearest) either way.
struct StateRef {
  void* ptr = nullptr;
  int64_t stride = 1;
  bool is_double = false;

  template <typename acc_t>
  __device__ __forceinline__ acc_t load(int64_t c) const {
    if (is_double) return static_cast<acc_t>(static_cast<const double*>(ptr)[c * stride]);
    return static_cast<acc_t>(static_cast<const float*>(ptr)[c * stride]);
  }

  template <typename acc_t>
  __device__ __forceinline__ void store(int64_t c, acc_t v) const {
    if (is_double) {
      static_cast<double*>(ptr)[c * stride] = static_cast<double>(v);
    } else {
      static_cast<float*>(ptr)[c * stride] = static_cast<float>(v);
    }
  }
};

inline StateRef state_ref(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() <= 1 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble));
  StateRef s;
  s.ptr = t.mutable_data_ptr();
  s.stride = t.dim() == 1 ? t.stride(0) : 0;
  s.is_double = t.scalar_type() == at::kDouble;
  return s;
}

// ---------------------------------------------------------------------------
// Element-wise walks over (N, C, S) and their coefficient gathers
// ---------------------------------------------------------------------------

// The element-wise kernels of batch_norm.cu and group_norm.cu treat the input
// as a flat array in a grid-stride loop of VEC-element vectors, and fetch the
// coefficients of each G = coef_chunk elements with one of two gathers:
// per channel (BatchNorm: ChannelWalker, gather_channels) or per (sample,
// channel) (GroupNorm / InstanceNorm: SampleWalker, gather_sample_channels).

// Per channel (BatchNorm). Element e of the flat array is at position
// s = e % S of channel c = (e / S) % C. A grid-stride loop advances e by a
// fixed stride, so the (s, c) pair is carried along with additions instead of
// two 64-bit divisions per element: only the constructor divides.
struct ChannelWalker {
  int64_t S, C;
  int64_t s, c;            // position of the current element
  int64_t step_s, step_c;  // the stride, decomposed the same way

  __device__ __forceinline__ ChannelWalker(int64_t start, int64_t stride, int64_t S_, int64_t C_) : S(S_), C(C_) {
    const int64_t plane = start / S;
    s = start - plane * S;
    c = plane % C;
    const int64_t step_planes = stride / S;
    step_s = stride - step_planes * S;
    step_c = step_planes % C;
  }

  // e += stride. s + step_s < 2S, so at most one carry into the plane index;
  // c + step_c + carry <= 2C - 1, so one wrap.
  __device__ __forceinline__ void advance() {
    s += step_s;
    int64_t carry = 0;
    if (s >= S) {
      s -= S;
      carry = 1;
    }
    c += step_c + carry;
    if (c >= C) c -= C;
  }
};

// e += 1 inside a vector.
__device__ __forceinline__ void next_element(int64_t& s, int64_t& c, int64_t S, int64_t C) {
  if (++s == S) {
    s = 0;
    if (++c == C) c = 0;
  }
}

// The coefficients of one per-channel array `a` for the G consecutive
// elements that start at position s of channel c. Per-element loads would be
// correct everywhere but cost: in the rowwise layout a warp's load of a[c]
// then touches G cache lines, which makes L1, not DRAM, the limit. So:
//  - all G elements in one channel (planar, unless the chunk crosses a plane
//    boundary): one broadcast load;
//  - packed (rowwise with C % G == 0, so c % G == 0 and no wrap inside the
//    chunk): the G consecutive channels as one aligned vector load;
//  - otherwise element by element.
template <int G, typename acc_t>
__device__ __forceinline__ void gather_channels(
    const acc_t* __restrict__ a, int64_t s, int64_t c, int64_t S, int64_t C, bool packed, acc_t (&out)[G]) {
  if (s + G <= S) {
    const acc_t v = a[c];
#pragma unroll
    for (int k = 0; k < G; ++k) out[k] = v;
  } else if (packed) {
    const Pack<acc_t, G> p = *reinterpret_cast<const Pack<acc_t, G>*>(a + c);
#pragma unroll
    for (int k = 0; k < G; ++k) out[k] = p.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < G; ++k) {
      out[k] = a[c];
      next_element(s, c, S, C);
    }
  }
}

// Per (sample, channel) (GroupNorm / InstanceNorm). Flat element
// e = (n * P + p) * Q + q: planar (Q = S, P = C, the channel is p), rowwise
// (Q = C, P = S, the channel is q); its per-(n, c) coefficients are at
// n * C + channel. A grid-stride loop moves e by a fixed stride, so (q, p, n)
// is carried along with additions instead of 64-bit divisions per element:
// only the constructor divides.
//
// group_norm.cu's element-wise kernels walk the tensor from its end to its
// start: the reduction before them read it from start to end, so its tail is
// what is still in L2, and a backward walk re-reads that tail from L2 before
// evicting it (a forward walk would evict it first: LRU's worst case for a
// scan).
struct SampleWalker {
  int64_t Q, P;
  int64_t q, p, n;     // position of the current element
  int64_t dq, dp, dn;  // the stride, decomposed the same way

  __device__ __forceinline__ SampleWalker(int64_t start, int64_t stride, int64_t Q_, int64_t P_) : Q(Q_), P(P_) {
    int64_t t = start / Q;
    q = start - t * Q;
    n = t / P;
    p = t - n * P;
    t = stride / Q;
    dq = stride - t * Q;
    dn = t / P;
    dp = t - dn * P;
  }

  // e -= stride. q - dq > -Q and p - dp - 1 >= -P: at most one borrow each.
  __device__ __forceinline__ void retreat() {
    q -= dq;
    int64_t borrow = 0;
    if (q < 0) {
      q += Q;
      borrow = 1;
    }
    p -= dp + borrow;
    borrow = 0;
    if (p < 0) {
      p += P;
      borrow = 1;
    }
    n -= dn + borrow;
  }
};

// e += 1
__device__ __forceinline__ void next_position(int64_t& q, int64_t& p, int64_t& n, int64_t Q, int64_t P) {
  if (++q == Q) {
    q = 0;
    if (++p == P) {
      p = 0;
      ++n;
    }
  }
}

// The coefficients in per-(n, c) array `a` of the G consecutive elements that
// start at (q, p, n):
//  - all G in one plane (planar, the chunk does not cross a plane): one
//    broadcast load;
//  - rowwise within one position, packed (C % G == 0, so q % G == 0, and `a`
//    aligned to G values): the G consecutive channels as one vector load;
//  - otherwise element by element.
template <int G, typename acc_t>
__device__ __forceinline__ void gather_sample_channels(
    const acc_t* __restrict__ a, int64_t q, int64_t p, int64_t n, int64_t Q, int64_t P, int64_t C, bool planar,
    bool packed, acc_t (&out)[G]) {
  if (q + G <= Q) {
    if (planar) {
      const acc_t v = a[n * C + p];
#pragma unroll
      for (int k = 0; k < G; ++k) out[k] = v;
    } else if (packed) {
      const Pack<acc_t, G> pk = *reinterpret_cast<const Pack<acc_t, G>*>(a + n * C + q);
#pragma unroll
      for (int k = 0; k < G; ++k) out[k] = pk.v[k];
    } else {
#pragma unroll
      for (int k = 0; k < G; ++k) out[k] = a[n * C + q + k];
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < G; ++k) {
    out[k] = a[n * C + (planar ? p : q)];
    next_position(q, p, n, Q, P);
  }
}

// Per-(n, c) index of flat element e (the tails, one element per thread).
__device__ __forceinline__ int64_t nc_of(int64_t e, int64_t C, int64_t S, bool planar) {
  if (planar) return e / S;
  return e / (S * C) * C + e % C;
}

// Whether the element-wise kernels may load G consecutive channels'
// coefficients as one vector (see gather_channels and
// gather_sample_channels): rowwise, C % G == 0 (then every chunk starts at a
// channel c with c % G == 0, as VEC % G == 0), and every coefficient array
// aligned to G of them. Geometry: ChannelGeometry or GroupNormGeometry.
template <int G, typename acc_t, typename Geometry>
bool packed_channels(const Geometry& g, std::initializer_list<const acc_t*> arrays) {
  if (G == 1 || g.layout != Layout::Rowwise || g.C % G != 0) return false;
  for (const acc_t* a : arrays) {
    if (!is_aligned(a, G * sizeof(acc_t))) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------
// Accumulators and their block-level combination
// ---------------------------------------------------------------------------

// Backward sums of one channel: sum(dz) and sum(dz * (x - mean)).
template <typename acc_t>
struct SumPair {
  acc_t dz = acc_t(0);
  acc_t dz_xc = acc_t(0);
};

template <typename acc_t>
__device__ __forceinline__ MeanM2<acc_t> merge(const MeanM2<acc_t>& a, const MeanM2<acc_t>& b) {
  return combine(a, b);
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> merge(const SumPair<acc_t>& a, const SumPair<acc_t>& b) {
  SumPair<acc_t> r;
  r.dz = a.dz + b.dz;
  r.dz_xc = a.dz_xc + b.dz_xc;
  return r;
}

// Partials live in a (fields, ...) workspace of acc_t: one field after the
// other, so a warp reading consecutive partials is coalesced.
template <typename acc_t>
__device__ __forceinline__ void store_partial(acc_t* ws, int64_t field_stride, int64_t i, const MeanM2<acc_t>& a) {
  ws[i] = a.count;
  ws[field_stride + i] = a.mean;
  ws[2 * field_stride + i] = a.m2;
}

template <typename acc_t>
__device__ __forceinline__ void load_partial(const acc_t* ws, int64_t field_stride, int64_t i, MeanM2<acc_t>& a) {
  a.count = ws[i];
  a.mean = ws[field_stride + i];
  a.m2 = ws[2 * field_stride + i];
}

template <typename acc_t>
__device__ __forceinline__ void store_partial(acc_t* ws, int64_t field_stride, int64_t i, const SumPair<acc_t>& a) {
  ws[i] = a.dz;
  ws[field_stride + i] = a.dz_xc;
}

template <typename acc_t>
__device__ __forceinline__ void load_partial(const acc_t* ws, int64_t field_stride, int64_t i, SumPair<acc_t>& a) {
  a.dz = ws[i];
  a.dz_xc = ws[field_stride + i];
}

// Combines the accumulators of the threads that share `col`, over `rows`
// threads (a power of two), with a shared-memory tree; every thread gets its
// column's total. `sm` holds rows * width accumulators. A tree (not warp
// shuffles) because the reduced axis is sometimes inside a warp and sometimes
// across warps, and its cost is nothing next to the loop that precedes it.
// The totals stay readable in sm[0 .. width-1] until the block next writes sm:
// a caller that reduces again with the same sm synchronizes first.
template <typename Acc>
__device__ Acc block_tree_reduce(Acc* sm, const Acc& v, int row, int col, int rows, int width) {
  sm[row * width + col] = v;
  __syncthreads();
  for (int half = rows / 2; half > 0; half /= 2) {
    if (row < half) sm[row * width + col] = merge(sm[row * width + col], sm[(row + half) * width + col]);
    __syncthreads();
  }
  return sm[col];
}

// Adds the first n (<= N) values of v to a: their exact two-pass (mean, M2),
// merged with Chan's formula. Two divisions per batch instead of one per value
// (welford_add), with the same robustness.
template <int N, typename acc_t>
__device__ __forceinline__ void add_batch(MeanM2<acc_t>& a, const acc_t (&v)[N], int n) {
  if (n <= 0) return;
  acc_t sum = acc_t(0);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i < n) sum += v[i];
  }
  MeanM2<acc_t> b;
  b.count = static_cast<acc_t>(n);
  b.mean = sum / b.count;
  acc_t m2 = acc_t(0);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i < n) {
      const acc_t d = v[i] - b.mean;
      m2 += d * d;
    }
  }
  b.m2 = m2;
  a = combine(a, b);
}

// ---------------------------------------------------------------------------
// Row-group sums (LayerNorm / RMSNorm)
// ---------------------------------------------------------------------------

constexpr int kMaxBlockWarps = 32;  // 1024 threads

// Sums each of v[0..N) over the `1 << log2_width` consecutive threads of a
// row group (width a power of two, groups aligned to it, blockDim.x a multiple
// of 32). Every thread of a group ends with the same bits: the butterfly adds
// two values in either order (IEEE addition commutes exactly), and the warps
// of a wide group are added in one fixed order. Every thread of the block
// must call it (a width above 32 synchronizes the block twice); `sm` is
// shared memory of N * kMaxBlockWarps values.
template <int N, typename acc_t>
__device__ __forceinline__ void group_allreduce_sum(acc_t (&v)[N], int log2_width, acc_t (*sm)[kMaxBlockWarps]) {
  const int in_warp = log2_width < 5 ? (1 << log2_width) : 32;
  for (int offset = 1; offset < in_warp; offset <<= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
  }
  if (log2_width > 5) {
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) sm[i][warp] = v[i];
    }
    __syncthreads();
    const int warps = 1 << (log2_width - 5);
    const int first = warp & ~(warps - 1);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      acc_t t = sm[i][first];
      for (int w = 1; w < warps; ++w) t += sm[i][first + w];
      v[i] = t;
    }
    __syncthreads();
  }
}

}  // namespace torchnorm
