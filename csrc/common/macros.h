#pragma once
// Lets the per-element math in csrc/common compile for the host (CPU kernels)
// and the device (CUDA kernels) from one definition.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define TN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TN_HOST_DEVICE inline
#endif
