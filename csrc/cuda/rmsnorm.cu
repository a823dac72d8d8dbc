// CUDA RMSNorm: one thread block per row, fp32 accumulation, warp-shuffle + shared-memory block
// reduction, 16-byte vector loads/stores when sizes, strides and pointers allow it, and the row
// kept in registers between the two passes when it fits (rms_norm_cached_kernel).
//
// Plain CUDA C++ (no torch headers). Rounding matches csrc/cpu/rmsnorm.cpp and HF LlamaRMSNorm:
// normalize in fp32, round to x's dtype, multiply by the weight in fp32, round once more. Only
// explicit conversion intrinsics are used, so it compiles under torch's -D__CUDA_NO_HALF_*__ flags.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cvt.cuh"
#include "rmsnorm.h"

namespace {

using infopt_cuda::Cvt;

// N elements moved as one aligned load/store (N * sizeof(T) is 16 bytes for x/y, or 32 for an
// fp32 weight beside bf16/fp16 x, which the compiler splits into two 16-byte accesses).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;

// Sum of `v` over the block, returned to every thread. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[kMaxThreads / kWarp];
  __shared__ float total;
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / kWarp;
    v = lane < nwarps ? partial[lane] : 0.f;
    for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// VEC elements per thread access; VEC == 1 is the generic path for any size/stride/alignment.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_kernel(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ y,
                    int64_t rows, int64_t hidden, int64_t x_stride, int64_t y_stride, float eps) {
  using XP = Pack<T, VEC>;
  using WP = Pack<W, VEC>;
  const int64_t packs = hidden / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const XP* xr = reinterpret_cast<const XP*>(x + row * x_stride);
    XP* yr = reinterpret_cast<XP*>(y + row * y_stride);
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const XP p = xr[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = Cvt<T>::to_f(p.v[j]);
        acc += f * f;
      }
    }
    // IEEE sqrt and division (no rsqrtf) to stay close to torch's fp32 rsqrt.
    const float inv = 1.0f / sqrtf(block_sum(acc) / static_cast<float>(hidden) + eps);
    // Second pass re-reads the row; it is L1/L2-resident for any realistic hidden size.
    const WP* wr = reinterpret_cast<const WP*>(w);
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const XP p = xr[i];
      const WP wp = wr[i];
      XP out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float normed = Cvt<T>::to_f(Cvt<T>::from_f(Cvt<T>::to_f(p.v[j]) * inv));
        out.v[j] = Cvt<T>::from_f(Cvt<W>::to_f(wp.v[j]) * normed);
      }
      yr[i] = out;
    }
    __syncthreads();  // block_sum's shared scratch is reused by the next row
  }
}

// Register-cached variant for rows of at most NP * blockDim.x packs: each thread keeps its packs
// of x in registers between the reduction and the output pass, so x is read from memory once
// and each thread has NP independent loads in flight.
template <typename T, typename W, int VEC, int NP>
__global__ void __launch_bounds__(512)
    rms_norm_cached_kernel(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ y,
                           int64_t rows, int64_t hidden, int64_t x_stride, int64_t y_stride,
                           float eps) {
  using XP = Pack<T, VEC>;
  using WP = Pack<W, VEC>;
  const int64_t packs = hidden / VEC;
  const WP* wr = reinterpret_cast<const WP*>(w);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const XP* xr = reinterpret_cast<const XP*>(x + row * x_stride);
    XP* yr = reinterpret_cast<XP*>(y + row * y_stride);
    XP cache[NP];
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < packs) {
        cache[k] = xr[i];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float f = Cvt<T>::to_f(cache[k].v[j]);
          acc += f * f;
        }
      }
    }
    const float inv = 1.0f / sqrtf(block_sum(acc) / static_cast<float>(hidden) + eps);
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < packs) {
        const WP wp = wr[i];
        XP out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float normed = Cvt<T>::to_f(Cvt<T>::from_f(Cvt<T>::to_f(cache[k].v[j]) * inv));
          out.v[j] = Cvt<T>::from_f(Cvt<W>::to_f(wp.v[j]) * normed);
        }
        yr[i] = out;
      }
    }
    __syncthreads();  // block_sum's shared scratch is reused by the next row
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int64_t round_up_warp(int64_t n) {
  return std::max<int64_t>(kWarp, (n + kWarp - 1) / kWarp * kWarp);
}

template <typename T, typename W>
struct Args {
  const T* x;
  const W* w;
  T* y;
  int64_t rows, hidden, xs, ys;
  float eps;
};

template <typename T, typename W, int VEC, int NP>
void launch_cached(unsigned grid, int threads, cudaStream_t stream, const Args<T, W>& a) {
  rms_norm_cached_kernel<T, W, VEC, NP><<<grid, threads, 0, stream>>>(a.x, a.w, a.y, a.rows,
                                                                      a.hidden, a.xs, a.ys, a.eps);
}

template <typename T, typename W>
cudaError_t launch(const void* xv, const void* wv, void* yv, int64_t rows, int64_t hidden,
                   int64_t xs, int64_t ys, float eps, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  const W* w = static_cast<const W*>(wv);
  T* y = static_cast<T*>(yv);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = hidden % kVec == 0 && xs % kVec == 0 && ys % kVec == 0 &&
                      aligned(x, sizeof(T) * kVec) && aligned(y, sizeof(T) * kVec) &&
                      aligned(w, sizeof(W) * kVec);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX));
  if (!vec_ok) {
    // Enough threads to cover the row once, rounded to whole warps, capped at 1024.
    const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, round_up_warp(hidden)));
    rms_norm_kernel<T, W, 1><<<grid, threads, 0, stream>>>(x, w, y, rows, hidden, xs, ys, eps);
    return cudaGetLastError();
  }
  // Rows up to 8 * 512 packs (32K bf16 / 16K fp32 elements) use the register-cached kernel with
  // at most 512 threads holding NP packs each; longer rows take the kernel that reads x twice.
  const int64_t packs = hidden / kVec;
  const int np = packs <= 512 ? 1 : packs <= 1024 ? 2 : packs <= 2048 ? 4 : 8;
  const int threads = static_cast<int>(round_up_warp((packs + np - 1) / np));
  const Args<T, W> a{x, w, y, rows, hidden, xs, ys, eps};
  if (packs > 8 * 512) {
    rms_norm_kernel<T, W, kVec><<<grid, kMaxThreads, 0, stream>>>(a.x, a.w, a.y, a.rows, a.hidden,
                                                                  a.xs, a.ys, a.eps);
  } else if (np == 1) {
    launch_cached<T, W, kVec, 1>(grid, threads, stream, a);
  } else if (np == 2) {
    launch_cached<T, W, kVec, 2>(grid, threads, stream, a);
  } else if (np == 4) {
    launch_cached<T, W, kVec, 4>(grid, threads, stream, a);
  } else {
    launch_cached<T, W, kVec, 8>(grid, threads, stream, a);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t infopt_rms_norm_cuda(const void* x, const void* weight, void* y,
                                            int64_t rows, int64_t hidden, int64_t x_row_stride,
                                            int64_t y_row_stride, float eps, int x_dtype,
                                            int w_dtype, cudaStream_t stream) {
  if (rows < 0 || hidden < 0) return cudaErrorInvalidValue;
  if (rows == 0 || hidden == 0) return cudaSuccess;
  const bool w_same = w_dtype == x_dtype;
  if (!w_same && w_dtype != INFOPT_FLOAT32) return cudaErrorInvalidValue;
  const auto a = x_row_stride, b = y_row_stride;
  switch (x_dtype) {
    case INFOPT_FLOAT32:
      return launch<float, float>(x, weight, y, rows, hidden, a, b, eps, stream);
    case INFOPT_FLOAT16:
      return w_same ? launch<__half, __half>(x, weight, y, rows, hidden, a, b, eps, stream)
                    : launch<__half, float>(x, weight, y, rows, hidden, a, b, eps, stream);
    case INFOPT_BFLOAT16:
      return w_same ? launch<__nv_bfloat16, __nv_bfloat16>(x, weight, y, rows, hidden, a, b, eps,
                                                           stream)
                    : launch<__nv_bfloat16, float>(x, weight, y, rows, hidden, a, b, eps, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
