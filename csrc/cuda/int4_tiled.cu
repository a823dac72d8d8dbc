// CUDA int4 weight-only GEMV (decode, M = 1..16; any M works) on the tiled weight layout
// (int4_tiled.h, infopt/ops/int4_tiled.py). fp16 / bf16 activations, tensor cores (sm_80+).
//
// Why a second layout: with the row-major layout a warp's 16-byte loads touch 16 rows x 64 bytes
// (scattered lines) plus separate scale and zero arrays; here a warp's k step (16 rows x 128 k)
// is one contiguous 1 KB chunk, read by two fully coalesced 512-byte loads, and the 16 rows'
// scales and zero points for the step sit together in one 80-byte record. Measured on an H100
// (docs/results.md): a load-only pass over this layout runs at the plain streaming-read floor, the
// row-major layout's pattern 0.4 us above it.
//
// Math (as int4_gemv.cu's tensor-core path): mma.sync m16n8k16, A = 16 weight rows dequantized
// in registers (one LOP3 turns two codes into the exact pair magic + code, one packed subtract
// removes magic + zero), B = up to 8 activation rows, fp32 accumulators; the group scale
// multiplies each 128-wide step's fp32 result. The layout stores each word's nibbles in the
// order the B fragment holds x, so x feeds the mma straight from its 16-byte loads (no PRMT).
//
// Schedule: a block owns one 16-row tile, its warps take k steps warp, warp + WARPS, ..., one
// step (two 16-byte weight loads per thread) per iteration, and meet in shared memory. Kept
// deliberately simple: every variant measured that requests more weights earlier (two steps
// per iteration, register double buffering, cp.async rings, L2 prefetch of the next steps, two
// tiles per block, TMA bulk copies) was 0.3-1.3 us slower on the H100 (docs/results.md).
//
// Only explicit conversion intrinsics: builds under torch's -D__CUDA_NO_HALF_*__ flags.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cvt.cuh"
#include "int4_mma.cuh"
#include "int4_tiled.h"
#include "rmsnorm.h"  // InfoptDType

namespace {

using infopt_cuda::aligned16;
using infopt_cuda::and_or;
using infopt_cuda::Cvt;
using infopt_cuda::mma_capable;
using infopt_cuda::MmaT;
using infopt_cuda::word;

constexpr int kWarp = 32;
constexpr int kChunk = 64;      // uint4 per (tile, step) chunk: 16 rows x 128 codes = 1 KB
constexpr int kMetaBytes = 80;  // per (tile, group): 8 x float2 scales + 8 x uint16 zeros

// NT n8 tiles of activation rows per block row (blockIdx.y covers 8 * NT rows of x).
template <typename T, int NT, int WARPS>
__global__ void __launch_bounds__(WARPS* kWarp, 2)
    int4_tiled_kernel(const T* __restrict__ x, int64_t xs, const uint4* __restrict__ codes,
                      const uint8_t* __restrict__ meta, const float* __restrict__ bias,
                      T* __restrict__ y, int M, int N, int steps, int G, int gshift) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: the launcher returns cudaErrorNotSupported before sm_80
#else
  __shared__ float4 red[WARPS][NT][kWarp];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int tile = blockIdx.x;
  // This thread's 16 bytes of each half chunk; step s of the tile at wp + kChunk * s.
  const uint4* wp = codes + (static_cast<size_t>(tile) * steps + warp) * kChunk + lane;
  const uint8_t* mb = meta + static_cast<size_t>(tile) * G * kMetaBytes;
  const float2* msc = reinterpret_cast<const float2*>(mb) + g;              // + 10 * group
  const uint16_t* mz = reinterpret_cast<const uint16_t*>(mb + 64) + g;      // + 40 * group
  const int m0 = blockIdx.y * 8 * NT;
  // Activation row 8t + g from k = 32c of this warp's first step; rows past M read row m0
  // (valid memory) instead: their D columns are never stored, so no zero fill is needed.
  const uint4* xp[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int r = m0 + 8 * t + g;
    xp[t] = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(r < M ? r : m0) * xs) +
            4 * c + 16 * warp;
  }
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;
  // (code mask, magic) as opaque registers: as immediates the compiler splits each and_or in two.
  uint32_t mask = 0x000F000Fu, magic = MmaT<T>::kMagic;
  asm volatile("" : "+r"(mask), "+r"(magic));

  for (int s = warp; s < steps; s += WARPS) {
    const uint4 qa = __ldcs(wp), qb = __ldcs(wp + kChunk / 2);  // rows g and g + 8, streamed
    wp += kChunk * WARPS;
    const int grp = s >> gshift;
    const float2 sc = __ldg(msc + 10 * grp);
    const uint32_t zz = __ldg(mz + 40 * grp);
    uint4 xv[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int j = 0; j < 4; ++j) xv[t][j] = __ldg(xp[t] + j);
      xp[t] += 16 * WARPS;
    }
    const uint32_t za = zz & 0xFF, zb = zz >> 8;
    const uint32_t zpa = MmaT<T>::kMagic | za | (za << 16);  // (magic + zero) x 2
    const uint32_t zpb = MmaT<T>::kMagic | zb | (zb << 16);
    float pm[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) pm[t][i] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // word j: k = 128 s + 32 c + 8 j + 0..7
      const uint32_t qwa = word(qa, j), qwb = word(qb, j);
      uint32_t da[4], db[4];  // codes (k0 + 2i, k0 + 2i + 1) - zero, rows g and g + 8
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        da[i] = MmaT<T>::sub(and_or(qwa >> (4 * i), mask, magic), zpa);
        db[i] = MmaT<T>::sub(and_or(qwb >> (4 * i), mask, magic), zpb);
      }
      const uint32_t a0[4] = {da[0], db[0], da[1], db[1]};  // k pairs (0,1) and (2,3)
      const uint32_t a1[4] = {da[2], db[2], da[3], db[3]};  // k pairs (4,5) and (6,7)
#pragma unroll
      for (int t = 0; t < NT; ++t) {  // xv words are the pairs (0,1) (2,3) (4,5) (6,7)
        MmaT<T>::mma(pm[t], a0, xv[t][j].x, xv[t][j].y);
        MmaT<T>::mma(pm[t], a1, xv[t][j].z, xv[t][j].w);
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {  // d0, d1: feature row g; d2, d3: row g + 8
      acc[t][0] = fmaf(pm[t][0], sc.x, acc[t][0]);
      acc[t][1] = fmaf(pm[t][1], sc.x, acc[t][1]);
      acc[t][2] = fmaf(pm[t][2], sc.y, acc[t][2]);
      acc[t][3] = fmaf(pm[t][3], sc.y, acc[t][3]);
    }
  }

#pragma unroll
  for (int t = 0; t < NT; ++t)
    red[warp][t][lane] = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
  __syncthreads();
  // One thread per (feature row r, activation row m) sums the WARPS partials.
  const int rows = min(8 * NT, M - m0);
  for (int tid = threadIdx.x; tid < 16 * rows; tid += WARPS * kWarp) {
    const int r = tid & 15, m = tid >> 4;
    const int t = m >> 3, col = m & 7;
    const int ln = 4 * (r & 7) + (col >> 1), i = (r >= 8 ? 2 : 0) + (col & 1);
    float v = 0.f;
#pragma unroll
    for (int ww = 0; ww < WARPS; ++ww) {
      const float4 p = red[ww][t][ln];
      v += i == 0 ? p.x : i == 1 ? p.y : i == 2 ? p.z : p.w;
    }
    const int n = tile * 16 + r;
    if (n < N) {
      if (bias != nullptr) v += bias[n];
      y[static_cast<int64_t>(m0 + m) * N + n] = Cvt<T>::from_f(v);
    }
  }
#endif
}

template <typename T, int NT, int WARPS>
cudaError_t launch(const void* x, int64_t xs, const uint8_t* codes, const uint8_t* meta,
                   const float* bias, void* y, int64_t M, int64_t N, int steps, int G, int gshift,
                   cudaStream_t stream) {
  const int64_t m_tiles = (M + 8 * NT - 1) / (8 * NT);
  if (m_tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((N + 15) / 16), static_cast<unsigned>(m_tiles));
  int4_tiled_kernel<T, NT, WARPS><<<grid, WARPS * kWarp, 0, stream>>>(
      static_cast<const T*>(x), xs, reinterpret_cast<const uint4*>(codes), meta, bias,
      static_cast<T*>(y), static_cast<int>(M), static_cast<int>(N), steps, G, gshift);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const void* x, int64_t xs, const uint8_t* codes, const uint8_t* meta,
                     const float* bias, void* y, int64_t M, int64_t N, int steps, int G,
                     int gshift, cudaStream_t stream) {
  // Measured on an H100 (docs/results.md): 16 warps per tile for decode batches once K has >= 16
  // steps (K >= 2048); 8 warps with fewer steps (12 warps, one pass, were no faster at K = 1536)
  // and for two n8 tiles (M > 8).
  if (M <= 8 && steps >= 16)
    return launch<T, 1, 16>(x, xs, codes, meta, bias, y, M, N, steps, G, gshift, stream);
  if (M <= 8) return launch<T, 1, 8>(x, xs, codes, meta, bias, y, M, N, steps, G, gshift, stream);
  return launch<T, 2, 8>(x, xs, codes, meta, bias, y, M, N, steps, G, gshift, stream);
}

}  // namespace

extern "C" cudaError_t infopt_int4_tiled_gemv_cuda(const void* x, int64_t x_row_stride,
                                                   const uint8_t* codes, const uint8_t* meta,
                                                   const float* bias, void* y, int64_t M,
                                                   int64_t N, int64_t K, int64_t group_size,
                                                   int x_dtype, cudaStream_t stream) {
  int gshift = 0;
  while (gshift < 24 && (int64_t{128} << gshift) < group_size) ++gshift;
  const int64_t elem = x_dtype == INFOPT_FLOAT32 ? 4 : 2;
  if (M < 0 || N < 0 || N > (int64_t{1} << 30) || K <= 0 || K % 128 != 0 || K > (1 << 24) ||
      (int64_t{128} << gshift) != group_size ||
      (x_dtype != INFOPT_FLOAT16 && x_dtype != INFOPT_BFLOAT16) || !aligned16(codes) ||
      !aligned16(meta) || !aligned16(x) || (x_row_stride * elem) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  if (M == 0 || N == 0) return cudaSuccess;
  if (!mma_capable()) return cudaErrorNotSupported;
  const int steps = static_cast<int>(K / 128);
  const int G = static_cast<int>((K + group_size - 1) / group_size);  // ragged last group
  if (x_dtype == INFOPT_FLOAT16)
    return dispatch<__half>(x, x_row_stride, codes, meta, bias, y, M, N, steps, G, gshift,
                            stream);
  return dispatch<__nv_bfloat16>(x, x_row_stride, codes, meta, bias, y, M, N, steps, G, gshift,
                                 stream);
}
