// CUDA int4 weight-only GEMV for decode (M = 1..16; any M works), plain CUDA C++.
//
// One warp per output row n, a tile of MT activation rows per block row (blockIdx.y), so each
// packed weight byte is read from DRAM once per MT rows. Each lane streams 16-byte chunks (32
// codes) of the row, kUnroll chunks in flight before any math so the weight stream has enough
// memory-level parallelism to run at DRAM bandwidth; a chunk lies in one quantization group
// (group_size % 32 == 0), so it needs one (scale, zero) pair: the lane sums x * (code - zero) in
// fp32 and scales the partial once. code - zero is formed exactly with the float magic-number
// trick: as_float(0x4B000000 | code) = 2**23 + code, minus (2**23 + zero). The 32 lane partials
// are combined with shuffles. Shapes the vector path can't take (K % 32 != 0, other group sizes,
// unaligned rows) run a byte-wise warp-per-row kernel with the same math.
//
// Only explicit conversion intrinsics: builds under torch's -D__CUDA_NO_HALF_*__ flags.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cvt.cuh"
#include "int4_gemv.h"
#include "rmsnorm.h"  // InfoptDType

namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 4;  // warps (= output rows) per block
constexpr int kUnroll = 4;  // 16-byte weight chunks each lane has in flight

using infopt_cuda::Cvt;

// 8 consecutive activations (16-byte aligned) to fp32.
__device__ __forceinline__ void load8(const float* p, float (&o)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&o)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = Cvt<T>::to_f(e[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, int MT>
__device__ __forceinline__ void write_rows(float (&acc)[MT], T* y, const float* bias, int64_t n,
                                           int64_t N, int64_t m0, int mt) {
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = warp_sum(acc[m]);
  if (threadIdx.x % kWarp == 0) {
    const float b = bias != nullptr ? bias[n] : 0.f;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < mt) y[(m0 + m) * N + n] = Cvt<T>::from_f(acc[m] + b);
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kWarps* kWarp)
    int4_gemv_vec_kernel(const T* __restrict__ x, int64_t xs, const uint8_t* __restrict__ w,
                         const float* __restrict__ scale, const uint8_t* __restrict__ zero,
                         const float* __restrict__ bias, T* __restrict__ y, int64_t M, int64_t N,
                         int64_t K, int64_t G, int64_t gs) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (n >= N) return;  // whole warps exit together: the shuffles below stay full-warp
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int mt = static_cast<int>(min(static_cast<int64_t>(MT), M - m0));
  const int64_t chunks = K / 32;
  const uint4* wrow = reinterpret_cast<const uint4*>(w + n * (K / 2));
  const float* srow = scale + n * G;
  const uint8_t* zrow = zero + n * G;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  for (int64_t c0 = lane; c0 < chunks; c0 += kWarp * kUnroll) {
    uint4 wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll x 16 bytes in flight
      const int64_t c = c0 + u * kWarp;
      wv[u] = c < chunks ? __ldcs(wrow + c) : make_uint4(0, 0, 0, 0);  // streamed, evict-first
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kWarp;
      if (c >= chunks) break;
      const int64_t k0 = c * 32, g = k0 / gs;
      const float zf = 8388608.f + static_cast<float>(zrow[g]);
      const uint32_t words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
      float part[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) part[m] = 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // 8 codes, k0 + 8q .. k0 + 8q + 7
        float wf[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // byte i: low nibble = even k, high nibble = odd k
          wf[2 * i] = __int_as_float(0x4B000000 | ((words[q] >> (8 * i)) & 0xF)) - zf;
          wf[2 * i + 1] = __int_as_float(0x4B000000 | ((words[q] >> (8 * i + 4)) & 0xF)) - zf;
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < mt) {
            float xf[8];
            load8(x + (m0 + m) * xs + k0 + 8 * q, xf);
#pragma unroll
            for (int i = 0; i < 8; ++i) part[m] = fmaf(xf[i], wf[i], part[m]);
          }
        }
      }
      const float sc = srow[g];
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m] = fmaf(part[m], sc, acc[m]);
    }
  }
  write_rows<T, MT>(acc, y, bias, n, N, m0, mt);
}

// Any K / even group size / alignment: lanes take bytes j = lane, lane + 32, ... of the row.
template <typename T, int MT>
__global__ void __launch_bounds__(kWarps* kWarp)
    int4_gemv_generic_kernel(const T* __restrict__ x, int64_t xs, const uint8_t* __restrict__ w,
                             const float* __restrict__ scale, const uint8_t* __restrict__ zero,
                             const float* __restrict__ bias, T* __restrict__ y, int64_t M,
                             int64_t N, int64_t K, int64_t G, int64_t gs) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (n >= N) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int mt = static_cast<int>(min(static_cast<int64_t>(MT), M - m0));
  const int64_t kb = (K + 1) / 2;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  for (int64_t j = lane; j < kb; j += kWarp) {
    const int byte = w[n * kb + j];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t k = 2 * j + h;
      if (k >= K) break;
      const int64_t g = k / gs;
      const float wf = (static_cast<float>((byte >> (4 * h)) & 0xF) -
                        static_cast<float>(zero[n * G + g])) * scale[n * G + g];
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < mt) acc[m] = fmaf(Cvt<T>::to_f(x[(m0 + m) * xs + k]), wf, acc[m]);
    }
  }
  write_rows<T, MT>(acc, y, bias, n, N, m0, mt);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int MT>
cudaError_t launch_mt(const void* xv, int64_t xs, const uint8_t* w, const float* s,
                      const uint8_t* z, const float* b, void* yv, int64_t M, int64_t N, int64_t K,
                      int64_t gs, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const int64_t G = (K + gs - 1) / gs;
  const int64_t m_tiles = (M + MT - 1) / MT;
  if (m_tiles > 65535) return cudaErrorInvalidValue;  // gridDim.y limit: 524K rows at MT = 8
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps), static_cast<unsigned>(m_tiles));
  const dim3 block(kWarps * kWarp);
  // 16-byte loads of weight rows (K/2 bytes each) and of 8 activations at a time.
  const bool vec = K % 32 == 0 && gs % 32 == 0 && aligned16(w) && aligned16(x) &&
                   (xs * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  if (vec) {
    int4_gemv_vec_kernel<T, MT><<<grid, block, 0, stream>>>(x, xs, w, s, z, b, y, M, N, K, G, gs);
  } else {
    int4_gemv_generic_kernel<T, MT><<<grid, block, 0, stream>>>(x, xs, w, s, z, b, y, M, N, K, G,
                                                                gs);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const void* x, int64_t xs, const uint8_t* w, const float* s, const uint8_t* z,
                   const float* b, void* y, int64_t M, int64_t N, int64_t K, int64_t gs,
                   cudaStream_t stream) {
  // The smallest tile that covers M (up to 8): no wasted accumulators for decode batches.
  if (M == 1) return launch_mt<T, 1>(x, xs, w, s, z, b, y, M, N, K, gs, stream);
  if (M == 2) return launch_mt<T, 2>(x, xs, w, s, z, b, y, M, N, K, gs, stream);
  if (M <= 4) return launch_mt<T, 4>(x, xs, w, s, z, b, y, M, N, K, gs, stream);
  return launch_mt<T, 8>(x, xs, w, s, z, b, y, M, N, K, gs, stream);
}

}  // namespace

extern "C" cudaError_t infopt_int4_gemv_cuda(const void* x, int64_t x_row_stride,
                                             const uint8_t* qweight, const float* scale,
                                             const uint8_t* zero, const float* bias, void* y,
                                             int64_t M, int64_t N, int64_t K, int64_t group_size,
                                             int x_dtype, cudaStream_t stream) {
  if (M < 0 || N < 0 || K < 0 || group_size <= 0 || group_size % 2 != 0) {
    return cudaErrorInvalidValue;
  }
  if (M == 0 || N == 0) return cudaSuccess;
  const auto xs = x_row_stride;
  switch (x_dtype) {
    case INFOPT_FLOAT32:
      return launch<float>(x, xs, qweight, scale, zero, bias, y, M, N, K, group_size, stream);
    case INFOPT_FLOAT16:
      return launch<__half>(x, xs, qweight, scale, zero, bias, y, M, N, K, group_size, stream);
    case INFOPT_BFLOAT16:
      return launch<__nv_bfloat16>(x, xs, qweight, scale, zero, bias, y, M, N, K, group_size,
                                   stream);
    default:
      return cudaErrorInvalidValue;
  }
}
