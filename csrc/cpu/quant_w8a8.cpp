// CPU infopt::int8_dynamic_linear, W8A8 (schema in schema.cpp, reference in quant_ref.py):
//   xq[m, :], xs[m] = per-row symmetric int8 of x (scale = amax / 127, round half to even)
//   y[m, n] = (float(sum_k xq[m, k] * qweight[n, k]) * xs[m]) * scale[n] + bias[n]
// The int32 sums are exact and the epilogue uses the reference's operation order, so float32
// outputs are bit-identical to the reference.
//
// AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, so activations are stored biased,
// u = xq + 128, and sum(u * w) - 128 * sum(w) is recovered with a second vpdpbusd of the same
// weight vector against a constant 0x80 vector (shared by all M rows; wrap-around int32
// arithmetic makes the difference exact whenever the true sum fits int32). AVX2: vpmaddubsw on
// (|w|, sign(xq, w)) (pairs stay below 2 * 128 * 127, so it never saturates) then vpmaddwd.
// Scalar fallback otherwise. The same tiled kernel serves decode and prefill: each tile of 4
// weight rows stays in L1 while every group of 4 activation rows passes over it.

#include "quant_common.h"

#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace infopt {
namespace {

using quant::Isa;

struct W8a8Args {
  const int8_t* xq;  // [M, kp] codes, zero padded (the AVX-512 VNNI path stores xq + 128 here)
  int64_t kp;        // padded row length of xq: K rounded up to 64
  const float* xs;   // [M] activation scales
  const int8_t* w;   // [N, K]
  const float* s;    // [N]
  const float* b;    // [N] or nullptr
  float* y;          // [M, N] fp32
  int64_t M, N, K;
};

inline void store(const W8a8Args& a, int64_t m, int64_t n, int32_t acc) {
  // The reference: acc.float() * xs[:, None] * scale.float(), then + bias, each op rounded.
  // volatile keeps the compiler from contracting the last multiply and the add into an FMA
  // (GCC does so by default inside the FMA-enabled kernels), which would round differently.
  const volatile float v = static_cast<float>(acc) * a.xs[m] * a.s[n];
  a.y[m * a.N + n] = a.b ? v + a.b[n] : v;
}

// Per-row quantization exactly as quant_ref.quantize_per_token_int8: fp32 amax, scale = amax /
// 127 (1 for a zero row), IEEE division, round half to even, clamp. `bias` is 128 for VNNI.
float row_scale(const float* xr, int64_t K) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
  return amax > 0.f ? amax / 127.0f : 1.0f;
}

void quantize_row_scalar(const float* xr, int64_t K, int64_t kp, float scale, int bias,
                         int8_t* qr) {
  for (int64_t k = 0; k < kp; ++k) {
    float v = k < K ? std::nearbyint(xr[k] / scale) : 0.f;  // default mode: half to even
    v = std::min(127.f, std::max(-127.f, v));
    qr[k] = static_cast<int8_t>(static_cast<int>(v) + bias);  // +128 wraps to the u8 code
  }
}

#if defined(__x86_64__)
// The same math 16 lanes at a time (vdivps is IEEE; vrndscaleps rounds half to even); the
// scalar libm nearbyint made quantization a visible share of small-N prefill.
INFOPT_AVX512 void quantize_row_avx512(const float* xr, int64_t K, int64_t kp, float scale,
                                       int bias, int8_t* qr) {
  const __m512 sv = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i bv = _mm512_set1_epi32(bias);
  for (int64_t k = 0; k < kp; k += 16) {
    const int64_t left = K - k;
    const __mmask16 mask = left >= 16 ? 0xFFFF : left > 0 ? (1u << left) - 1 : 0;
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, xr + k), sv);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    const __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(v), bv);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k), _mm512_cvtepi32_epi8(qi));
  }
}
#endif

void quantize_rows(const at::Tensor& xf, int64_t kp, int bias, Isa isa, int8_t* q, float* xs) {
  const int64_t M = xf.size(0), K = xf.size(1);
  const float* x = xf.const_data_ptr<float>();
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * K;
      const float scale = row_scale(xr, K);
      xs[m] = scale;
#if defined(__x86_64__)
      if (isa >= Isa::kAvx512) {
        quantize_row_avx512(xr, K, kp, scale, bias, q + m * kp);
        continue;
      }
#endif
      quantize_row_scalar(xr, K, kp, scale, bias, q + m * kp);
    }
  });
}

#if defined(__x86_64__)

template <int NR, int MR>
INFOPT_AVX512VNNI void w8a8_tile_vnni(const W8a8Args& a, int64_t n0, int64_t m0) {
  __m512i acc[MR][NR], corr[NR];
  for (int r = 0; r < NR; ++r) {
    corr[r] = _mm512_setzero_si512();
    for (int i = 0; i < MR; ++i) acc[i][r] = _mm512_setzero_si512();
  }
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < a.K; k += 64) {
    // Masked weight loads stop at the row end; the padded activations are then multiplied by 0.
    const __mmask64 mask = k + 64 <= a.K ? ~__mmask64{0} : (__mmask64{1} << (a.K - k)) - 1;
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) {
      const int8_t* p = a.w + (n0 + r) * a.K + k;
      _mm_prefetch(reinterpret_cast<const char*>(p + quant::kPrefetchAhead), _MM_HINT_T1);
      wv[r] = _mm512_maskz_loadu_epi8(mask, p);
      corr[r] = _mm512_dpbusd_epi32(corr[r], bias, wv[r]);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_loadu_si512(a.xq + (m0 + i) * a.kp + k);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], xv, wv[r]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const int32_t c = _mm512_reduce_add_epi32(corr[r]);
    for (int i = 0; i < MR; ++i)
      store(a, m0 + i, n0 + r,
            static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][r])) -
                                 static_cast<uint32_t>(c)));
  }
}

INFOPT_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int NR, int MR>
INFOPT_AVX2 void w8a8_tile_avx2(const W8a8Args& a, int64_t n0, int64_t m0) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < a.K; k += 32) {
    __m256i aw[NR], wv[NR];
    for (int r = 0; r < NR; ++r) {
      const int8_t* p = a.w + (n0 + r) * a.K + k;
      if (k + 32 <= a.K) {
        wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      } else {  // copy the partial tail: never read past the row
        alignas(32) int8_t tmp[32] = {};
        std::memcpy(tmp, p, static_cast<size_t>(a.K - k));
        wv[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
      }
      aw[r] = _mm256_abs_epi8(wv[r]);
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m0 + i) *
                                                                                     a.kp + k));
      for (int r = 0; r < NR; ++r) {
        const __m256i p16 = _mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, wv[r]));
        acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_madd_epi16(p16, ones));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) store(a, m0 + i, n0 + r, hsum_epi32(acc[i][r]));
}

#endif  // __x86_64__

template <int NR, int MR>
void w8a8_tile_scalar(const W8a8Args& a, int64_t n0, int64_t m0) {
  for (int i = 0; i < MR; ++i) {
    const int8_t* xr = a.xq + (m0 + i) * a.kp;
    for (int r = 0; r < NR; ++r) {
      const int8_t* wr = a.w + (n0 + r) * a.K;
      int32_t acc = 0;
      for (int64_t k = 0; k < a.K; ++k) acc += int32_t{xr[k]} * int32_t{wr[k]};
      store(a, m0 + i, n0 + r, acc);
    }
  }
}


#if defined(__x86_64__)
INFOPT_TILE_RANGE(w8a8_range_vnni, W8a8Args, w8a8_tile_vnni, INFOPT_AVX512VNNI)
INFOPT_TILE_RANGE(w8a8_range_avx2, W8a8Args, w8a8_tile_avx2, INFOPT_AVX2)
#endif
INFOPT_TILE_RANGE(w8a8_range_scalar, W8a8Args, w8a8_tile_scalar, )

at::Tensor int8_dynamic_linear_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                   const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  const char* op = "int8_dynamic_linear";
  const int64_t K = quant::check_x(op, x);
  TORCH_CHECK(qweight.device().is_cpu(), "infopt::", op, " (CPU): qweight must be a CPU tensor");
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "infopt::", op, ": qweight must be int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == K, "infopt::", op,
              ": qweight must have shape [N, K] with K = x.shape[-1] = ", K, ", got ",
              qweight.sizes());
  TORCH_CHECK(K < (int64_t{1} << 17), "infopt::", op, ": K = ", K,
              " could overflow int32 accumulation (limit 2**17)");
  const int64_t N = qweight.size(0);
  quant::check_vec(op, "scale", scale, N);
  if (bias) quant::check_vec(op, "bias", *bias, N);

  const at::Tensor xf = quant::f32c(x.reshape({-1, K}));
  const int64_t M = xf.size(0);
  quant::Out out(x, M, N);
  if (M == 0 || N == 0) return out.finish(x);
  const Isa isa = quant::cpu_isa();
  const bool vnni = isa == Isa::kAvx512Vnni;
  const int64_t kp = quant::round_up(std::max<int64_t>(K, 1), 64);
  at::Tensor xq = at::empty({M, kp}, xf.options().dtype(at::kChar));
  at::Tensor xs = at::empty({M}, xf.options());
  quantize_rows(xf, kp, vnni ? 128 : 0, isa, xq.mutable_data_ptr<int8_t>(),
                xs.mutable_data_ptr<float>());
  const at::Tensor w = qweight.contiguous(), s = quant::f32c(scale);
  const at::Tensor b = bias ? quant::f32c(*bias) : at::Tensor();
  W8a8Args a{xq.const_data_ptr<int8_t>(), kp, xs.const_data_ptr<float>(),
             w.const_data_ptr<int8_t>(), s.const_data_ptr<float>(),
             b.defined() ? b.const_data_ptr<float>() : nullptr,
             out.acc.mutable_data_ptr<float>(), M, N, K};
  const int64_t tiles = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, quant::row_grain(K * std::min<int64_t>(M, 16)) / 4);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * 4, n1 = std::min(N, t1 * 4);
#if defined(__x86_64__)
    if (vnni) return w8a8_range_vnni(a, n0, n1);
    if (isa >= Isa::kAvx2) return w8a8_range_avx2(a, n0, n1);
#endif
    w8a8_range_scalar(a, n0, n1);
  });
  return out.finish(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(infopt, CPU, m) { m.impl("int8_dynamic_linear", &int8_dynamic_linear_cpu); }

}  // namespace infopt
