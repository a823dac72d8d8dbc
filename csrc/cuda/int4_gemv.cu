// CUDA int4 weight-only GEMV for decode (M = 1..16; any M works), plain CUDA C++. fp16 / bf16
// activations on sm_80+ take the tensor-core kernel (section "Tensor-core path" below) when the
// shape allows; the SIMT kernels described next take fp32 activations and every other shape.
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
#include <type_traits>

#include "cvt.cuh"
#include "int4_mma.cuh"
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

// ---------------------------------------------------------------------------------------------
// Tensor-core path (fp16 / bf16 x, sm_80+, K % 128 == 0, group_size = 128 * 2^j, aligned rows).
//
// The SIMT kernels above spend ~4 instructions per weight (extract, subtract, convert, FMA),
// about as long as streaming the weight takes on an H100, and every extra activation row costs
// all of it again. Here the dot products run on mma.sync m16n8k16 (fp32 accumulators): A = 16
// weight rows (output features), B = up to 8 activation rows (n8 tile; rows >= M are zeros), so
// decode batches 1..16 cost one or two mma per k16 instead of 16x the FMAs.
//
// Layout trick: the mma sums over k, so k may be permuted freely as long as A and B use the same
// permutation. Thread (g = lane / 4, c = lane % 4) loads 16 contiguous bytes (32 codes, k =
// 32c .. 32c + 31 of a 128-wide k step) of rows g and g + 8, and the matching 32 activations of
// batch row g; the 8 codes of each 32-bit word fill that thread's fragment slots of two k16 mma.
// Dequantization: (word >> 4i) & 0x000F000F | magic puts two codes into the low mantissa bits of
// an fp16/bf16 pair (magic = 1024.0 / 128.0, whose ulp is 1), so one LOP3 yields two exact values
// magic + code; one packed subtract of (magic + zero) leaves code - zero, exact. x is permuted to
// the same (k, k + 4) pairs with PRMT. The group scale multiplies the fp32 mma result of each
// 128-wide step (inside one group): the math matches the reference's (code - zero) * scale up to
// fp32 summation order.
//
// A block owns 16 output rows; its WARPS warps split K (warp w takes steps w, w + WARPS, ...),
// each with UNROLL steps of weight loads in flight before any math, and the partial sums meet in
// shared memory. Measured on an H100 (docs/results.md, csrc/cuda/bench/int4_gemv_bench.cu): 16
// warps x 1 step beats 8 x 4 and 4 x 8 when K has >= 16 steps (more warps hide the load latency
// better than deeper unrolling, and each warp's math after its data lands is shorter); with
// fewer steps 4 warps x 4 steps wins; M > 8 with N >= 4096 prefers 8 warps x 1 step.

using infopt_cuda::aligned16;
using infopt_cuda::and_or;
using infopt_cuda::mma_capable;
using infopt_cuda::MmaT;
using infopt_cuda::prmt;
using infopt_cuda::word;

// NT n8 tiles of activation rows per block (M <= 8 * NT rows per blockIdx.y).
template <typename T, int NT, int WARPS, int UNROLL>
__global__ void __launch_bounds__(WARPS* kWarp)
    int4_gemv_mma_kernel(const T* __restrict__ x, int64_t xs, const uint8_t* __restrict__ w,
                         const float* __restrict__ scale, const uint8_t* __restrict__ zero,
                         const float* __restrict__ bias, T* __restrict__ y, int64_t M, int64_t N,
                         int64_t K, int64_t G, int gshift) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: mma_capable() keeps pre-sm_80 devices on the SIMT kernels
#else
  __shared__ float red[WARPS][NT][kWarp][4];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int g = lane / 4, c = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 8 * NT;
  const int rows = static_cast<int>(min(static_cast<int64_t>(8 * NT), M - m0));
  // Rows past N read row N - 1 (valid memory); their results are dropped at the store.
  const int64_t ra = min(n0 + g, N - 1), rb = min(n0 + g + 8, N - 1);
  const uint4* wa = reinterpret_cast<const uint4*>(w + ra * (K / 2)) + c;  // step s: wa[4 s]
  const uint4* wb = reinterpret_cast<const uint4*>(w + rb * (K / 2)) + c;
  const float* sra = scale + ra * G;
  const float* srb = scale + rb * G;
  const uint8_t* zra = zero + ra * G;
  const uint8_t* zrb = zero + rb * G;
  const int steps = static_cast<int>(K / 128);
  const uint4* xp[NT];  // activation row 8t + g from k = 32c; step s, word j at [16 s + j]
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int r = 8 * t + g;
    xp[t] = r < rows ? reinterpret_cast<const uint4*>(x + (m0 + r) * xs) + 4 * c : nullptr;
  }
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;
  // (code mask, magic) as opaque registers: with both as immediates the compiler splits each
  // and_or below into two LOP3 (one immediate per instruction).
  uint32_t mask = 0x000F000Fu, magic = MmaT<T>::kMagic;
  asm volatile("" : "+r"(mask), "+r"(magic));

  auto pass = [&](int sb, auto check) {
    constexpr bool kCheck = decltype(check)::value;
    // Base pointers of this pass: the UNROLL steps are then constant offsets from them.
    const int s0 = sb + warp;
    const uint4* pa = wa + 4 * s0;
    const uint4* pb = wb + 4 * s0;
    const uint4* px[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) px[t] = xp[t] != nullptr ? xp[t] + 16 * s0 : nullptr;
    uint4 qa[UNROLL], qb[UNROLL];
    float sa[UNROLL], sbv[UNROLL];
    uint32_t za[UNROLL], zb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // every weight load of UNROLL steps before any math
      const int s = s0 + u * WARPS;
      if (!kCheck || s < steps) {
        qa[u] = __ldcs(pa + 4 * WARPS * u);
        qb[u] = __ldcs(pb + 4 * WARPS * u);
        const int grp = s >> gshift;
        sa[u] = __ldg(sra + grp);
        sbv[u] = __ldg(srb + grp);
        za[u] = __ldg(zra + grp);
        zb[u] = __ldg(zrb + grp);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int s = s0 + u * WARPS;
      if (kCheck && s >= steps) break;
      const uint32_t zpa = MmaT<T>::kMagic | za[u] | (za[u] << 16);  // (magic + zero) x 2
      const uint32_t zpb = MmaT<T>::kMagic | zb[u] | (zb[u] << 16);
      float pm[NT][4];
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) pm[t][i] = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // word j: codes k = 128 s + 32 c + 8 j + 0..7
        const uint32_t qwa = word(qa[u], j), qwb = word(qb[u], j);
        uint32_t da[4], db[4];  // (code k_i, code k_{i+4}) - zero, i = 0..3
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          da[i] = MmaT<T>::sub(and_or(qwa >> (4 * i), mask, magic), zpa);
          db[i] = MmaT<T>::sub(and_or(qwb >> (4 * i), mask, magic), zpb);
        }
        const uint32_t a0[4] = {da[0], db[0], da[1], db[1]};  // k pairs (0,4) and (1,5)
        const uint32_t a1[4] = {da[2], db[2], da[3], db[3]};  // k pairs (2,6) and (3,7)
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const uint4 xv =
              px[t] != nullptr ? __ldg(px[t] + 16 * WARPS * u + j) : make_uint4(0, 0, 0, 0);
          // xv holds (k0,k1) (k2,k3) (k4,k5) (k6,k7); B wants the pairs (k0,k4) (k1,k5) ...
          MmaT<T>::mma(pm[t], a0, prmt(xv.x, xv.z, 0x5410), prmt(xv.x, xv.z, 0x7632));
          MmaT<T>::mma(pm[t], a1, prmt(xv.y, xv.w, 0x5410), prmt(xv.y, xv.w, 0x7632));
        }
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {  // d0, d1: feature row g; d2, d3: row g + 8
        acc[t][0] = fmaf(pm[t][0], sa[u], acc[t][0]);
        acc[t][1] = fmaf(pm[t][1], sa[u], acc[t][1]);
        acc[t][2] = fmaf(pm[t][2], sbv[u], acc[t][2]);
        acc[t][3] = fmaf(pm[t][3], sbv[u], acc[t][3]);
      }
    }
  };
  int sb = 0;
  for (; sb + WARPS * UNROLL <= steps; sb += WARPS * UNROLL) pass(sb, std::false_type{});
  if (sb < steps) pass(sb, std::true_type{});

#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][t][lane][i] = acc[t][i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = 0.f;
#pragma unroll
      for (int ww = 0; ww < WARPS; ++ww) v += red[ww][t][lane][i];
      const int64_t n = n0 + g + (i >= 2 ? 8 : 0);     // output feature
      const int64_t m = m0 + 8 * t + 2 * c + (i & 1);  // activation row (D column)
      if (n < N && m < M) {
        if (bias != nullptr) v += bias[n];
        y[m * N + n] = Cvt<T>::from_f(v);
      }
    }
  }
#endif
}

template <typename T, int NT, int WARPS, int UNROLL>
cudaError_t launch_mma(const void* xv, int64_t xs, const uint8_t* w, const float* s,
                       const uint8_t* z, const float* b, void* yv, int64_t M, int64_t N, int64_t K,
                       int64_t gs, cudaStream_t stream) {
  const int64_t G = (K + gs - 1) / gs;
  const int64_t m_tiles = (M + 8 * NT - 1) / (8 * NT);
  if (m_tiles > 65535) return cudaErrorInvalidValue;
  int gshift = 0;
  while ((int64_t{128} << gshift) < gs) ++gshift;  // gs = 128 << gshift (checked by use_mma)
  const dim3 grid(static_cast<unsigned>((N + 15) / 16), static_cast<unsigned>(m_tiles));
  int4_gemv_mma_kernel<T, NT, WARPS, UNROLL><<<grid, WARPS * kWarp, 0, stream>>>(
      static_cast<const T*>(xv), xs, w, s, z, b, static_cast<T*>(yv), M, N, K, G, gshift);
  return cudaGetLastError();
}

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

// The tensor-core path for 16-bit x when the shape allows it (see int4_gemv_mma_kernel).
template <typename T>
bool use_mma(const void* x, int64_t xs, const uint8_t* w, int64_t K, int64_t gs) {
  const int64_t spg = gs / 128;  // k steps per group: a power of two (group index by shift)
  return K % 128 == 0 && gs % 128 == 0 && (spg & (spg - 1)) == 0 && aligned16(w) &&
         aligned16(x) && (xs * static_cast<int64_t>(sizeof(T))) % 16 == 0 && mma_capable();
}

template <typename T>
cudaError_t launch(const void* x, int64_t xs, const uint8_t* w, const float* s, const uint8_t* z,
                   const float* b, void* y, int64_t M, int64_t N, int64_t K, int64_t gs,
                   cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_mma<T>(x, xs, w, K, gs)) {
      // Warps x unroll by the number of 128-wide k steps (see the section comment).
      if (K >= 16 * 128) {
        if (M <= 8) return launch_mma<T, 1, 16, 1>(x, xs, w, s, z, b, y, M, N, K, gs, stream);
        // Two n8 tiles: 8 warps do better once there are >= 256 blocks (N >= 4096) to fill
        // the GPU; fewer blocks need 16 warps each.
        if (N >= 4096) return launch_mma<T, 2, 8, 1>(x, xs, w, s, z, b, y, M, N, K, gs, stream);
        return launch_mma<T, 2, 16, 1>(x, xs, w, s, z, b, y, M, N, K, gs, stream);
      }
      if (M <= 8) return launch_mma<T, 1, 4, 4>(x, xs, w, s, z, b, y, M, N, K, gs, stream);
      return launch_mma<T, 2, 4, 4>(x, xs, w, s, z, b, y, M, N, K, gs, stream);
    }
  }
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
