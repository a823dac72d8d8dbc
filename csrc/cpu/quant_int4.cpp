// CPU infopt::int4_weight_only_linear (schema in schema.cpp, reference + packed layout in
// infopt/ops/quant_ref.py):
//   y[m, n] = sum_k x[m, k] * (code[n, k] - zero[n, k / gs]) * scale[n, k / gs] + bias[n]
// x [..., K] float32/bfloat16/float16; qweight uint8 [N, ceil(K/2)], byte j of a row = code 2j
// (low nibble) | code 2j+1 (high nibble); scale [N, G] float, zero [N, G] uint8, G = ceil(K/gs).
//
// Small M with group sizes that tile 128: quant_int4_dyn.cpp's int8-dot GEMV with x split into
// three int8 limbs per 32-block (fp32-grade: ~2^-22 of the block max). With AVX-512 VNNI (M < 32)
// ~1.2x the tiles below, which are bound by their shuffle port, not by memory; on AVX2
// (vpmaddubsw, M <= 10) 1.04-2.4x the AVX2 tiles / dequantize + MKL, which convert every weight
// to fp32.
// Small M otherwise (decode GEMV, 0.5 byte per weight): dequantization happens in registers.
// AVX-512 builds, once per (row, group), a 16-entry table lut[c] = (c - zero) * scale (exactly
// the reference's fp32 dequantized value) and turns codes into weights with one vpermps per 16
// codes: vpermps only reads the low 4 index bits, so the low nibbles need no mask. A 16-byte load
// holds 32 codes, 16 even and 16 odd k; the activations are pre-permuted once per call into the
// same [16 even | 16 odd] order so each half is one plain FMA. AVX2 widens codes with a mask and a
// shift, subtracts the zero point in int32 and scales once per group (see int4_tile_avx2).
// Large M, unsupported group sizes and CPUs without AVX2: dequantize blocks of W to fp32 and use
// MKL (quant_common.h).

#include "quant_common.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace infopt {
namespace {

using quant::Isa;

// Crossover of the GEMV tiles vs dequantize + MKL, measured. AVX-512: GEMV ~67 us/row vs
// dequantize + MKL ~64 us/row at M=32 (K=N=1536, 1 thread). AVX2 converts and permutes twice as
// many registers per weight, so its tiles lose much earlier: at M=8 they cost what dequantize +
// MKL does and at M=16-31 1.4-1.8x more (1536x576, 576x1536, 8960x1536, 1536x8960; 1 thread).
// Speculative verification (k+1 rows) and mid-size decode batches live in that range.
constexpr int64_t kPrefillMinM = 32;
constexpr int64_t kAvx2PrefillMinM = 8;

struct Int4Args {
  const float* xp;   // [M, kp] activations permuted in blocks (see permute_x), zero padded
  int64_t kp;        // padded row length of xp
  const uint8_t* w;  // [N, kb] packed codes, kb = ceil(K/2)
  const float* s;    // [N, G]
  const uint8_t* z;  // [N, G]
  const float* b;    // [N] or nullptr
  float* y;          // [M, N] fp32
  int64_t M, N, K, G, gs, kb;
};

inline void store(const Int4Args& a, int64_t m, int64_t n, float dot) {
  a.y[m * a.N + n] = a.b ? dot + a.b[n] : dot;
}

// x [M, K] -> xp [M, kp]: within each block of 2*H k's, the H even k's then the H odd k's (the
// order in which a block's H packed bytes yield low and high nibbles); k >= K reads as 0.
at::Tensor permute_x(const at::Tensor& xf, int64_t half) {
  const int64_t M = xf.size(0), K = xf.size(1), blk = 2 * half;
  const int64_t kp = quant::round_up(std::max<int64_t>(K, 1), blk);
  at::Tensor xp = at::zeros({M, kp}, xf.options());
  const float* src = xf.const_data_ptr<float>();
  float* dst = xp.mutable_data_ptr<float>();
  // No per-element division: it cost as much as a small GEMV.
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = src + m * K;
    float* d = dst + m * kp;
    for (int64_t base = 0; base < K; base += blk) {
      const int64_t n = std::min(blk, K - base);
      for (int64_t i = 0; i < n; ++i) d[base + (i & 1) * half + (i >> 1)] = xr[base + i];
    }
  }
  return xp;
}

#if defined(__x86_64__)

// ---- AVX-512: blocks of 32 k (16 bytes); needs gs % 32 == 0 so no block straddles groups ----

template <int NR, int MR>
INFOPT_AVX512 void int4_tile_avx512(const Int4Args& a, int64_t n0, int64_t m0) {
  // Even and odd k accumulate separately when MR == 1 (decode): two FMA chains per row instead
  // of one, measured +6% on a DRAM-streamed matrix. With MR > 1 that would not fit in 32 zmm.
  constexpr int NA = MR == 1 ? 2 : 1;
  __m512 acc[MR][NR][NA];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < NA; ++j) acc[i][r][j] = _mm512_setzero_ps();
  const __m512 iota =
      _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 lut[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t idx = (n0 + r) * a.G + g;
      lut[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(a.z[idx]))),
                             _mm512_set1_ps(a.s[idx]));
    }
    const int64_t k1 = std::min(a.K, (g + 1) * a.gs);
    for (int64_t k = g * a.gs; k < k1; k += 32) {
      __m512 we[NR], wo[NR];
      for (int r = 0; r < NR; ++r) {
        const uint8_t* p = a.w + (n0 + r) * a.kb + k / 2;
        // Once per cache line: request the line kPrefetchAhead bytes on into L2 (quant_common.h).
        if ((k & 127) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(p + quant::kPrefetchAhead), _MM_HINT_T1);
        // The row's last block may be partial: a masked load never reads past the row's bytes.
        const __m128i raw =
            k + 32 <= a.K
                ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((a.K - k + 1) / 2)) - 1), p);
        const __m512i v = _mm512_cvtepu8_epi32(raw);
        we[r] = _mm512_permutexvar_ps(v, lut[r]);  // low nibble = even k
        wo[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut[r]);
      }
      for (int i = 0; i < MR; ++i) {
        const float* xr = a.xp + (m0 + i) * a.kp + k;
        const __m512 xe = _mm512_loadu_ps(xr), xo = _mm512_loadu_ps(xr + 16);
        for (int r = 0; r < NR; ++r) {
          acc[i][r][0] = _mm512_fmadd_ps(xe, we[r], acc[i][r][0]);
          acc[i][r][NA - 1] = _mm512_fmadd_ps(xo, wo[r], acc[i][r][NA - 1]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      const __m512 sum = NA == 2 ? _mm512_add_ps(acc[i][r][0], acc[i][r][NA - 1]) : acc[i][r][0];
      store(a, m0 + i, n0 + r, _mm512_reduce_add_ps(sum));
    }
}

// ---- AVX2+FMA: blocks of 16 k (8 bytes); needs gs % 16 == 0 ----

// Per group the tile sums x * (code - zero) with the difference taken in int32 (exact, so a
// weight that dequantizes to zero contributes exactly zero, as in the reference) and applies
// the group's scale once: one int sub, one convert and one FMA per weight instead of a float
// sub and mul on top (AVX2 has no 16-entry permute to build the AVX-512 path's lookup table).
template <int NR, int MR>
INFOPT_AVX2 void int4_tile_avx2(const Int4Args& a, int64_t n0, int64_t m0) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  const __m256i nib = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < a.G; ++g) {
    __m256 dot[MR][NR];
    __m256i zi[NR];
    for (int r = 0; r < NR; ++r) {
      zi[r] = _mm256_set1_epi32(a.z[(n0 + r) * a.G + g]);
      for (int i = 0; i < MR; ++i) dot[i][r] = _mm256_setzero_ps();
    }
    const int64_t k1 = std::min(a.K, (g + 1) * a.gs);
    for (int64_t k = g * a.gs; k < k1; k += 16) {
      __m256 xe[MR], xo[MR];
      for (int i = 0; i < MR; ++i) {
        const float* xr = a.xp + (m0 + i) * a.kp + k;
        xe[i] = _mm256_loadu_ps(xr);
        xo[i] = _mm256_loadu_ps(xr + 8);
      }
      for (int r = 0; r < NR; ++r) {
        const uint8_t* p = a.w + (n0 + r) * a.kb + k / 2;
        if ((k & 127) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(p + quant::kPrefetchAhead), _MM_HINT_T1);
        __m128i raw;
        if (k + 16 <= a.K) {
          raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        } else {  // a partial last block is copied so nothing past the row is read
          int64_t bytes8 = 0;
          std::memcpy(&bytes8, p, static_cast<size_t>((a.K - k + 1) / 2));
          raw = _mm_cvtsi64_si128(bytes8);
        }
        const __m256i v = _mm256_cvtepu8_epi32(raw);
        const __m256 we =
            _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, nib), zi[r]));
        const __m256 wo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), zi[r]));
        for (int i = 0; i < MR; ++i) {
          dot[i][r] = _mm256_fmadd_ps(xe[i], we, dot[i][r]);
          dot[i][r] = _mm256_fmadd_ps(xo[i], wo, dot[i][r]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 sf = _mm256_set1_ps(a.s[(n0 + r) * a.G + g]);
      for (int i = 0; i < MR; ++i) acc[i][r] = _mm256_fmadd_ps(sf, dot[i][r], acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) store(a, m0 + i, n0 + r, quant::hsum256(acc[i][r]));
}

// Prefill: rows n0..n1 of W -> fp32 [n1 - n0, kp] in the permuted k order of permute_x (the
// activations are permuted the same way, so x_p @ W_p^T == x @ W^T), padding included.
INFOPT_AVX512 void dequant_rows_avx512(const Int4Args& a, int64_t n0, int64_t n1, float* dst) {
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t n = n0; n < n1; ++n) {
    float* d = dst + (n - n0) * a.kp;
    for (int64_t g = 0; g < a.G; ++g) {
      const __m512 lut =
          _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(a.z[n * a.G + g]))),
                        _mm512_set1_ps(a.s[n * a.G + g]));
      const int64_t k1 = std::min(a.K, (g + 1) * a.gs);
      for (int64_t k = g * a.gs; k < k1; k += 32) {
        const uint8_t* p = a.w + n * a.kb + k / 2;
        const __m128i raw =
            k + 32 <= a.K
                ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((a.K - k + 1) / 2)) - 1), p);
        const __m512i v = _mm512_cvtepu8_epi32(raw);
        _mm512_storeu_ps(d + k, _mm512_permutexvar_ps(v, lut));
        _mm512_storeu_ps(d + k + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut));
      }
    }
  }
}

INFOPT_AVX2 void dequant_rows_avx2(const Int4Args& a, int64_t n0, int64_t n1, float* dst) {
  const __m256i nib = _mm256_set1_epi32(0xF);
  for (int64_t n = n0; n < n1; ++n) {
    float* d = dst + (n - n0) * a.kp;
    for (int64_t g = 0; g < a.G; ++g) {
      const __m256 zf = _mm256_set1_ps(static_cast<float>(a.z[n * a.G + g]));
      const __m256 sf = _mm256_set1_ps(a.s[n * a.G + g]);
      const int64_t k1 = std::min(a.K, (g + 1) * a.gs);
      for (int64_t k = g * a.gs; k < k1; k += 16) {
        const uint8_t* p = a.w + n * a.kb + k / 2;
        __m128i raw;
        if (k + 16 <= a.K) {
          raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        } else {  // a partial last block: nothing past the row is read
          int64_t bytes8 = 0;
          std::memcpy(&bytes8, p, static_cast<size_t>((a.K - k + 1) / 2));
          raw = _mm_cvtsi64_si128(bytes8);
        }
        const __m256i v = _mm256_cvtepu8_epi32(raw);
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, nib));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        _mm256_storeu_ps(d + k, _mm256_mul_ps(_mm256_sub_ps(lo, zf), sf));
        _mm256_storeu_ps(d + k + 8, _mm256_mul_ps(_mm256_sub_ps(hi, zf), sf));
      }
    }
  }
}


INFOPT_TILE_RANGE(int4_range_avx512, Int4Args, int4_tile_avx512, INFOPT_AVX512)
INFOPT_TILE_RANGE(int4_range_avx2, Int4Args, int4_tile_avx2, INFOPT_AVX2)

#endif  // __x86_64__

// Generic: rows n0..n1 of W -> fp32 [n1 - n0, K] in natural k order, exactly (code - zero) *
// scale as in the reference (any even group size, any CPU).
void dequant_rows(const Int4Args& a, int64_t n0, int64_t n1, float* dst) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = a.w + n * a.kb;
    float* d = dst + (n - n0) * a.K;
    for (int64_t g = 0; g < a.G; ++g) {
      const float z = static_cast<float>(a.z[n * a.G + g]), s = a.s[n * a.G + g];
      const int64_t k1 = std::min(a.K, (g + 1) * a.gs);
      for (int64_t k = g * a.gs; k < k1; ++k) {
        const int code = (wr[k >> 1] >> ((k & 1) * 4)) & 0xF;
        d[k] = (static_cast<float>(code) - z) * s;
      }
    }
  }
}

}  // namespace

// Shape/dtype/device checks of the int4 ops (messages name the argument); returns N.
int64_t quant::check_int4_args(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scale, const at::Tensor& zero,
                               int64_t group_size, const std::optional<at::Tensor>& bias) {
  const int64_t K = quant::check_x(op, x);
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0, "infopt::", op,
              ": group_size must be a positive even integer, got ", group_size);
  TORCH_CHECK(qweight.device().is_cpu() && scale.device().is_cpu() && zero.device().is_cpu(),
              "infopt::", op, " (CPU): qweight, scale and zero must be CPU tensors");
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "infopt::", op, ": qweight must be uint8, got ",
              qweight.scalar_type());
  const int64_t kb = (K + 1) / 2, G = (K + group_size - 1) / group_size;
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == kb, "infopt::", op,
              ": qweight must have shape [N, ceil(K/2)] with K = x.shape[-1] = ", K,
              ", i.e. [N, ", kb, "], got ", qweight.sizes());
  const int64_t N = qweight.size(0);
  TORCH_CHECK(scale.is_floating_point() && scale.dim() == 2 && scale.size(0) == N &&
                  scale.size(1) == G,
              "infopt::", op, ": scale must be a float tensor of shape [N, ceil(K/group_size)] = [",
              N, ", ", G, "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(zero.scalar_type() == at::kByte && zero.dim() == 2 && zero.size(0) == N &&
                  zero.size(1) == G,
              "infopt::", op, ": zero must be a uint8 tensor of shape [N, ", G, "], got ",
              zero.scalar_type(), " ", zero.sizes());
  if (bias) quant::check_vec(op, "bias", *bias, N);
  return N;
}

// Not file-local: quant_int4_dyn.cpp runs its large-M and non-VNNI cases through it.
at::Tensor quant::int4_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                              const at::Tensor& scale, const at::Tensor& zero,
                                              int64_t group_size,
                                              const std::optional<at::Tensor>& bias) {
  const int64_t N = quant::check_int4_args("int4_weight_only_linear", x, qweight, scale, zero,
                                           group_size, bias);
  const int64_t K = x.size(-1);
  const int64_t kb = (K + 1) / 2, G = (K + group_size - 1) / group_size;

  const at::Tensor xf = quant::f32c(x.reshape({-1, K}));
  const int64_t M = xf.size(0);
  if (quant::int4_exact_gemv_ok(M, K, N, group_size)) {
    at::Tensor y = quant::int4_exact_gemv(x, xf, qweight, scale, zero, group_size, bias);
    if (y.defined()) return y;  // undefined: x holds NaN / inf, handled below
  }
  quant::Out out(x, M, N);
  if (M == 0 || N == 0) return out.finish(x);
  const at::Tensor w = qweight.contiguous(), z = zero.contiguous(), s = quant::f32c(scale);
  const at::Tensor b = bias ? quant::f32c(*bias) : at::Tensor();
  Int4Args a{nullptr, 0, w.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(),
             z.const_data_ptr<uint8_t>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
             out.acc.mutable_data_ptr<float>(), M, N, K, G, group_size, kb};

  const Isa isa = quant::cpu_isa();
#if defined(__x86_64__)
  const bool use512 = K > 0 && isa >= Isa::kAvx512 && group_size % 32 == 0;
  const bool use256 = K > 0 && !use512 && isa >= Isa::kAvx2 && group_size % 16 == 0;
  if (use512 || use256) {
    const at::Tensor xp = permute_x(xf, use512 ? 16 : 8);
    a.xp = xp.const_data_ptr<float>();
    a.kp = xp.size(1);
    if (M < (use512 ? kPrefillMinM : kAvx2PrefillMinM)) {
      const int64_t tiles = (N + 3) / 4;
      const int64_t grain = std::max<int64_t>(1, quant::row_grain(kb) / 4);
      at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
        const int64_t n0 = t0 * 4, n1 = std::min(N, t1 * 4);
        if (use512) return int4_range_avx512(a, n0, n1);
        int4_range_avx2(a, n0, n1);
      });
      return out.finish(x);
    }
    quant::blocked_dequant_mm(
        xp, N, a.kp,
        [&](int64_t n0, int64_t n1, float* dst) {
          if (use512) return dequant_rows_avx512(a, n0, n1, dst);
          dequant_rows_avx2(a, n0, n1, dst);
        },
        out.acc);
    if (a.b != nullptr) out.acc.add_(b);
    return out.finish(x);
  }
#endif
  (void)isa;
  quant::blocked_dequant_mm(
      xf, N, K, [&](int64_t n0, int64_t n1, float* dst) { dequant_rows(a, n0, n1, dst); },
      out.acc);
  if (a.b != nullptr) out.acc.add_(b);
  return out.finish(x);
}

TORCH_LIBRARY_IMPL(infopt, CPU, m) {
  m.impl("int4_weight_only_linear", &quant::int4_weight_only_linear_cpu);
}

}  // namespace infopt
