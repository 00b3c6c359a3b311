#pragma once
// Device and launch helpers shared by the CUDA kernels (batch_norm.cu,
// layer_norm.cu, group_norm.cu): vector loads, per-channel parameters of a
// run-time dtype, the accumulators of the reductions and their deterministic
// combination, and occupancy-based grid sizing.
//
// Only __device__ functions, types and inline host helpers live here. The
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
#include <optional>

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
