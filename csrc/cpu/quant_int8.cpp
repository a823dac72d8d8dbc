// CPU infopt::int8_weight_only_linear (schema in schema.cpp, reference in infopt/ops/quant_ref.py):
//   y[m, n] = (sum_k x[m, k] * qweight[n, k]) * scale[n] + bias[n]
// x [..., K] float32/bfloat16/float16, qweight int8 [N, K], scale [N], bias [N] or None; y has
// x's leading shape and dtype; accumulation in fp32.
//
// Small M (decode, memory-bound GEMV): the int8 weights are widened to fp32 in registers and
// FMA'd with fp32 activations; each tile of NR weight rows is loaded once per MR activation
// rows, and all M rows reuse the tile while it is L1-resident. AVX-512 / AVX2+FMA / scalar paths
// are chosen at run time. Large M (prefill): blocks of W are widened to fp32 and multiplied with
// MKL (quant_common.h), so the weight tile is reused across all rows at GEMM speed.

#include "quant_common.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace infopt {
namespace {

using quant::Isa;

// Crossover of the GEMV tiles vs dequantize + MKL, measured: GEMV ~45 us/row vs dequantize +
// MKL ~60 us/row at M=32 and ~38 at M=128 (K=N=1536, 1 thread).
constexpr int64_t kPrefillMinM = 64;

struct Int8Args {
  const float* x;    // [M, K] fp32, row stride K
  const int8_t* w;   // [N, K]
  const float* s;    // [N]
  const float* b;    // [N] or nullptr
  float* y;          // [M, N] fp32, row stride N
  int64_t M, N, K;
};

inline void store(const Int8Args& a, int64_t m, int64_t n, float dot) {
  a.y[m * a.N + n] = a.b ? dot * a.s[n] + a.b[n] : dot * a.s[n];
}

#if defined(__x86_64__)

// ---- AVX-512: 16 k per step, masked tail; NR weight rows x MR activation rows per tile ----

template <int NR, int MR>
INFOPT_AVX512 void int8_tile_avx512(const Int8Args& a, int64_t n0, int64_t m0) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  const int8_t* wr[NR];
  for (int r = 0; r < NR; ++r) wr[r] = a.w + (n0 + r) * a.K;
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = a.x + (m0 + i) * a.K;
  int64_t k = 0;
  // 64 k (one cache line per weight row) per step; the line kPrefetchAhead bytes further on is
  // requested into L2 meanwhile (quant_common.h: why and how far).
  for (; k + 64 <= a.K; k += 64) {
    for (int r = 0; r < NR; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + quant::kPrefetchAhead), _MM_HINT_T1);
    for (int j = 0; j < 64; j += 16) {
      __m512 wv[NR];
      for (int r = 0; r < NR; ++r)
        wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k + j))));
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_loadu_ps(xr[i] + k + j);
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
      }
    }
  }
  for (; k + 16 <= a.K; k += 16) {
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k))));
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(xr[i] + k);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  if (k < a.K) {  // masked loads never touch bytes past the row (the last row ends the tensor)
    const __mmask16 mask = static_cast<__mmask16>((1u << (a.K - k)) - 1);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, wr[r] + k)));
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, xr[i] + k);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) store(a, m0 + i, n0 + r, _mm512_reduce_add_ps(acc[i][r]));
}

// ---- AVX2+FMA: 8 k per step, scalar tail ----

template <int NR, int MR>
INFOPT_AVX2 void int8_tile_avx2(const Int8Args& a, int64_t n0, int64_t m0) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  const int8_t* wr[NR];
  for (int r = 0; r < NR; ++r) wr[r] = a.w + (n0 + r) * a.K;
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = a.x + (m0 + i) * a.K;
  int64_t k = 0;
  // As the AVX-512 tile: one cache line of each weight row per step, the line kPrefetchAhead
  // bytes on requested into L2 (without it the SmolLM2 / Qwen2.5 int8 heads, 576 / 1536-byte
  // rows, streamed at 12 GB/s on an AVX2 EPYC).
  for (; k + 64 <= a.K; k += 64) {
    for (int r = 0; r < NR; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + quant::kPrefetchAhead), _MM_HINT_T1);
    for (int j = 0; j < 64; j += 8) {
      __m256 wv[NR];
      for (int r = 0; r < NR; ++r)
        wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[r] + k + j))));
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_loadu_ps(xr[i] + k + j);
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
      }
    }
  }
  for (; k + 8 <= a.K; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[r] + k))));
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(xr[i] + k);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int r = 0; r < NR; ++r) {
      float dot = quant::hsum256(acc[i][r]);
      for (int64_t kk = k; kk < a.K; ++kk) dot += xr[i][kk] * static_cast<float>(wr[r][kk]);
      store(a, m0 + i, n0 + r, dot);
    }
  }
}

// Prefill: int8 -> fp32 (exact) for the dequantize + MKL path.
INFOPT_AVX512 void widen_avx512(const int8_t* src, float* dst, int64_t cnt) {
  int64_t i = 0;
  for (; i + 16 <= cnt; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)))));
  for (; i < cnt; ++i) dst[i] = static_cast<float>(src[i]);
}

INFOPT_AVX2 void widen_avx2(const int8_t* src, float* dst, int64_t cnt) {
  int64_t i = 0;
  for (; i + 8 <= cnt; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                  _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)))));
  for (; i < cnt; ++i) dst[i] = static_cast<float>(src[i]);
}

#endif  // __x86_64__

void widen_scalar(const int8_t* src, float* dst, int64_t cnt) {
  for (int64_t i = 0; i < cnt; ++i) dst[i] = static_cast<float>(src[i]);
}

// ---- scalar ----

template <int NR, int MR>
void int8_tile_scalar(const Int8Args& a, int64_t n0, int64_t m0) {
  for (int i = 0; i < MR; ++i) {
    const float* xr = a.x + (m0 + i) * a.K;
    for (int r = 0; r < NR; ++r) {
      const int8_t* wr = a.w + (n0 + r) * a.K;
      float dot = 0.f;
      for (int64_t k = 0; k < a.K; ++k) dot += xr[k] * static_cast<float>(wr[k]);
      store(a, m0 + i, n0 + r, dot);
    }
  }
}

// Decode drivers per ISA (INFOPT_TILE_RANGE, quant_common.h).
#if defined(__x86_64__)
INFOPT_TILE_RANGE(int8_range_avx512, Int8Args, int8_tile_avx512, INFOPT_AVX512)
INFOPT_TILE_RANGE(int8_range_avx2, Int8Args, int8_tile_avx2, INFOPT_AVX2)
#endif
INFOPT_TILE_RANGE(int8_range_scalar, Int8Args, int8_tile_scalar, )

void int8_gemv(const Int8Args& a, Isa isa) {
  // Parallel over N in multiples of 4 rows, so every task but the last runs whole NR=4 tiles.
  const int64_t tiles = (a.N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, quant::row_grain(a.K) / 4);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * 4, n1 = std::min(a.N, t1 * 4);
#if defined(__x86_64__)
    if (isa >= Isa::kAvx512) return int8_range_avx512(a, n0, n1);
    if (isa == Isa::kAvx2) return int8_range_avx2(a, n0, n1);
#endif
    int8_range_scalar(a, n0, n1);
  });
}

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                       const at::Tensor& scale,
                                       const std::optional<at::Tensor>& bias) {
  const char* op = "int8_weight_only_linear";
  const int64_t K = quant::check_x(op, x);
  TORCH_CHECK(qweight.device().is_cpu(), "infopt::", op, " (CPU): qweight must be a CPU tensor");
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "infopt::", op, ": qweight must be int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == K, "infopt::", op,
              ": qweight must have shape [N, K] with K = x.shape[-1] = ", K, ", got ",
              qweight.sizes());
  const int64_t N = qweight.size(0);
  quant::check_vec(op, "scale", scale, N);
  if (bias) quant::check_vec(op, "bias", *bias, N);

  const at::Tensor xf = quant::f32c(x.reshape({-1, K}));
  const int64_t M = xf.size(0);
  quant::Out out(x, M, N);
  if (M == 0 || N == 0) return out.finish(x);
  const at::Tensor w = qweight.contiguous();
  const at::Tensor s = quant::f32c(scale);
  const at::Tensor b = bias ? quant::f32c(*bias) : at::Tensor();
  Int8Args a{xf.const_data_ptr<float>(), w.const_data_ptr<int8_t>(), s.const_data_ptr<float>(),
             b.defined() ? b.const_data_ptr<float>() : nullptr, out.acc.mutable_data_ptr<float>(),
             M, N, K};
  const Isa isa = quant::cpu_isa();
  if (M < kPrefillMinM || K == 0) {
    int8_gemv(a, isa);
  } else {
    // W rows widened to fp32 (exact), then y = (x @ Wf^T) * scale + bias as in the reference.
    quant::blocked_dequant_mm(
        xf, N, K,
        [&](int64_t n0, int64_t n1, float* dst) {
          const int8_t* src = a.w + n0 * K;
          const int64_t cnt = (n1 - n0) * K;
#if defined(__x86_64__)
          if (isa >= Isa::kAvx512) return widen_avx512(src, dst, cnt);
          if (isa == Isa::kAvx2) return widen_avx2(src, dst, cnt);
#endif
          widen_scalar(src, dst, cnt);
        },
        out.acc);
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n) store(a, m, n, a.y[m * N + n]);
    });
  }
  return out.finish(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(infopt, CPU, m) {
  m.impl("int8_weight_only_linear", &int8_weight_only_linear_cpu);
}

}  // namespace infopt
