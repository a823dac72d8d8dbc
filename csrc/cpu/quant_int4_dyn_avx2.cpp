// AVX2 + FMA tiles of infopt::int4_dynamic_linear and of int4_weight_only_linear's exact decode
// GEMV (declarations, layout and limbs in quant_int4_dyn.h; the math in quant_int4_dyn.cpp).
//
// vpmaddubsw + vpmaddwd stand in for AVX-512 VNNI's vpdpbusd (llama.cpp's Q4 x Q8 AVX2 dot
// product). A 128-k chunk is processed as two 32-byte halves. maddubs multiplies unsigned
// nibbles by signed codes and adds adjacent pairs to int16 (|pair| <= 2 * 15 * 127 = 3810; the
// low- and high-nibble products added, <= 7620: never saturates), then madd_epi16 adds pairs to
// int32, so lane j of half h sums bytes 4j..4j+3 of the half: AVX-512 lane 8h + j. The VNNI
// activation layout, lane scales and lane sums serve unchanged.
//
// Three limbs (the exact GEMV): madd_epi16 multiplies limb l's int16 pair sums by 128^(L-1-l)
// (16384, 128, 1: each fits int16) while it widens them, so the limbs merge in int32 with two
// adds (the merged D stays below 2^28, quant_int4_dyn.h). Per 64 weights and activation row
// that is 6 maddubs, 3 madd and 5 adds against 2 + 1 + 1 for one limb; the nibble split and the
// float epilogue are shared. On an AVX2 EPYC (Zen 3), M = 1, 2 threads, weights streamed from
// DRAM: 17 GB/s against 9 GB/s for the fp32 tiles of quant_int4.cpp and 24-27 GB/s for one limb
// (docs/results.md, "CPU int4 weight-only GEMV on AVX2: three int8 limbs").

#include "quant_int4_dyn.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace infopt {
namespace dyn {

#if defined(__x86_64__)
namespace {

// AVX2 (8 lanes): the same math a 32-block at a time (vdivps is IEEE, vroundps rounds half to
// even). The 32 int32 codes are packed to bytes in natural k order, then one in-lane byte
// shuffle and a qword permute give [16 even | 16 odd] for the permuted layout. Limbs after the
// first quantize the residual (one rounding, by the fma) with the scale divided by 128, exactly
// as quantize_row_avx512, so both produce the same codes.
INFOPT_AVX2 void quantize_row_impl(const float* xr, int64_t K, int64_t nb, bool permuted,
                                   int8_t* qr, float* bs, int L, int64_t limb_stride) {
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // packs_epi32 + packs_epi16 leave the dwords (4 k each) in order 0, 8, 16, 24, 4, 12, 20, 28.
  const __m256i natural = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock, left = K - k0;
    __m256 v[4];
    if (left >= kBlock) {
      for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xr + k0 + 8 * j);
    } else {  // a partial or padding block: zeros past K, nothing past the row is read
      float tmp[kBlock] = {};
      if (left > 0) std::memcpy(tmp, xr + k0, static_cast<size_t>(left) * sizeof(float));
      for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(tmp + 8 * j);
    }
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                             _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float sc = left <= 0 ? 0.f : amax > 0.f ? amax / 127.0f : 1.0f;
    bs[blk] = sc;
    __m256 sv = _mm256_set1_ps(left <= 0 ? 1.f : sc);  // padding: codes 0, not NaN
    for (int l = 0; l < L; ++l) {
      __m256i q[4];
      for (int j = 0; j < 4; ++j) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(v[j], sv),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q[j] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
        if (l + 1 < L) v[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q[j]), sv, v[j]);
      }
      sv = _mm256_mul_ps(sv, _mm256_set1_ps(1.0f / 128.0f));
      int8_t* ql = qr + l * limb_stride;
      __m256i p =
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      p = _mm256_permutevar8x32_epi32(p, natural);
      if (!permuted) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ql + k0), p);
        continue;
      }
      // Per 128-bit lane [8 even | 8 odd], then qwords (0, 2, 1, 3): [16 even | 16 odd].
      p = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(p, split), 0xD8);
      const int64_t base = k0 - k0 % kChunk, bi = (k0 % kChunk) / kBlock;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ql + base + 16 * bi), _mm256_castsi256_si128(p));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ql + base + 64 + 16 * bi),
                       _mm256_extracti128_si256(p, 1));
    }
  }
}

INFOPT_AVX2 void lane_sums_impl(const int8_t* xq, int64_t M, int64_t C, int L, float* out) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c)
      for (int h = 0; h < 2; ++h) {
        __m256i sum = _mm256_setzero_si256();
        for (int l = 0; l < L; ++l) {  // (s1 * 128 + s2) * 128 + s3, as the tiles merge D
          const int8_t* xr = xq + ((l * M + m) * C + c) * kChunk + 32 * h;
          const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
          const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 64));
          const __m256i s16 =
              _mm256_add_epi16(_mm256_maddubs_epi16(ones8, e), _mm256_maddubs_epi16(ones8, o));
          if (l > 0) sum = _mm256_slli_epi32(sum, 7);
          sum = _mm256_add_epi32(sum, _mm256_madd_epi16(s16, ones16));
        }
        _mm256_storeu_ps(out + (m * C + c) * 16 + 8 * h, _mm256_cvtepi32_ps(sum));
      }
}

INFOPT_AVX2 bool all_finite_impl(const float* x, int64_t n) {
  const __m256 inf = _mm256_set1_ps(INFINITY);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  int bad = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)  // |x| >= inf or unordered (NaN)
    bad |= _mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absmask), inf, _CMP_NLT_UQ));
  for (; i < n; ++i) bad |= !std::isfinite(x[i]);
  return bad == 0;
}

// Weight scale and zero point per lane of both halves of a chunk whose first group is g0, for
// GPC groups per chunk (lane j of half h: k in [64h + 8j, 64h + 8j + 8)). GPC 1: one group;
// 2 (gs 64): one per half; 4 (gs 32): one per 128-bit lane. Groups past G (padding lanes, whose
// activations are 0) read as 0.
template <int GPC>
INFOPT_AVX2 inline void lane_groups_avx2(const DynArgs& a, int64_t n, int64_t g0, __m256 sw[2],
                                         __m256 zw[2]) {
  const float* s = a.s + n * a.G;
  const uint8_t* z = a.z + n * a.G;
  if (GPC == 1) {
    sw[0] = sw[1] = _mm256_set1_ps(s[g0]);
    zw[0] = zw[1] = _mm256_set1_ps(static_cast<float>(z[g0]));
    return;
  }
  float sv[4], zv[4];
  for (int j = 0; j < GPC; ++j) {
    const bool in = g0 + j < a.G;
    sv[j] = in ? s[g0 + j] : 0.f;
    zv[j] = in ? static_cast<float>(z[g0 + j]) : 0.f;
  }
  for (int h = 0; h < 2; ++h) {
    const int ja = GPC == 2 ? h : 2 * h, jb = GPC == 2 ? h : 2 * h + 1;
    sw[h] = _mm256_setr_m128(_mm_set1_ps(sv[ja]), _mm_set1_ps(sv[jb]));
    zw[h] = _mm256_setr_m128(_mm_set1_ps(zv[ja]), _mm_set1_ps(zv[jb]));
  }
}

// NR weight rows x MR activation rows, L limbs. Per chunk each weight row is loaded and split
// into nibbles once, then used by the tile's MR activation rows (read from L1 as memory
// operands); only the MR x NR accumulators stay in registers (16 ymm, against VNNI's 32 zmm).
template <int NR, int MR, int GPC, int L>
INFOPT_AVX2 void dyn_tile_avx2(const DynArgs& a, int64_t n0, int64_t m0) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256i limb_mul[L];  // 128^(L-1-l): merges the limbs while madd widens them
  for (int l = 0; l < L; ++l) limb_mul[l] = _mm256_set1_epi16(static_cast<int16_t>(1 << (7 * (L - 1 - l))));
  const int64_t limb_stride = a.M * a.C * kChunk;
  // Group of the chunk's first lane, without a division per chunk: GPC groups per chunk, or
  // (GPC 1, gs a multiple of 128) one group per gs / 128 chunks.
  const int64_t cpg = GPC == 1 ? a.gs / kChunk : 1;
  int64_t g0 = 0, cleft = cpg;
  for (int64_t c = 0; c < a.C; ++c) {
    const int64_t k0 = c * kChunk;
    const int64_t bytes = std::min<int64_t>(64, a.kb - k0 / 2);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const uint8_t* p = a.w + (n0 + r) * a.kb + k0 / 2;
      _mm_prefetch(reinterpret_cast<const char*>(p + quant::kPrefetchAhead), _MM_HINT_T1);
      __m256i v[2];
      // A row's partial last chunk reads on into the following rows' bytes: their nibbles
      // meet activation codes that are zero (padding past K), so they add nothing. Only where
      // fewer than 64 bytes of the matrix are left is the chunk copied, so nothing past the
      // tensor is read.
      if (bytes == 64 || (a.N - n0 - r) * a.kb - k0 / 2 >= 64) {
        v[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        v[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
      } else {
        alignas(32) uint8_t tmp[64] = {};
        std::memcpy(tmp, p, static_cast<size_t>(bytes));
        v[0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
        v[1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp + 32));
      }
      __m256 sw[2], zw[2];
      lane_groups_avx2<GPC>(a, n0 + r, g0, sw, zw);
      __m256i lo[2], hi[2];
      for (int h = 0; h < 2; ++h) {
        lo[h] = _mm256_and_si256(v[h], nib);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(v[h], 4), nib);
      }
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const int8_t* xr = a.xq + ((m0 + i) * a.C + c) * kChunk;
        const int64_t li = ((m0 + i) * a.C + c) * 16;
        for (int h = 0; h < 2; ++h) {
          __m256i d = _mm256_setzero_si256();
          for (int l = 0; l < L; ++l) {
            const int8_t* xl = xr + l * limb_stride + 32 * h;
            const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xl));
            const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xl + 64));
            const __m256i p16 =
                _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xe), _mm256_maddubs_epi16(hi[h], xo));
            const __m256i dl = _mm256_madd_epi16(p16, limb_mul[l]);
            d = l == 0 ? dl : _mm256_add_epi32(d, dl);
          }
          // As the VNNI tile: (dot - zero * sum xq), exact in fp32 for one limb (for three, D
          // and zero * xsum may pass 2^24 and round once each: 2^-24 relative), then the two
          // scales.
          const __m256 q = _mm256_fnmadd_ps(zw[h], _mm256_loadu_ps(a.xsum + li + 8 * h),
                                            _mm256_cvtepi32_ps(d));
          acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(q, _mm256_loadu_ps(a.xs + li + 8 * h)),
                                      sw[h], acc[i][r]);
        }
      }
    }
    if (GPC > 1) {
      g0 += GPC;
    } else if (--cleft == 0) {
      ++g0;
      cleft = cpg;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      const int64_t n = n0 + r, m = m0 + i;
      const float dot = quant::hsum256(acc[i][r]);
      a.y[m * a.N + n] = a.b ? dot + a.b[n] : dot;
    }
}

// Tiles: 4 weight rows for one activation row (decode); for several, one weight row x up to 4
// activation rows. Two weight rows x 4 (8 accumulators) measured slower: GCC then keeps the
// activation vectors shared by the two rows in registers and spills them (16 ymm on AVX2).
template <int GPC, int L>
INFOPT_AVX2 void dyn_range_g(const DynArgs& a, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  if (a.M == 1) {
    for (; n + 4 <= n_end; n += 4) dyn_tile_avx2<4, 1, GPC, L>(a, n, 0);
    for (; n < n_end; ++n) dyn_tile_avx2<1, 1, GPC, L>(a, n, 0);
    return;
  }
  for (; n < n_end; ++n) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) dyn_tile_avx2<1, 4, GPC, L>(a, n, m);
    for (; m + 2 <= a.M; m += 2) dyn_tile_avx2<1, 2, GPC, L>(a, n, m);
    for (; m < a.M; ++m) dyn_tile_avx2<1, 1, GPC, L>(a, n, m);
  }
}

template <int L>
INFOPT_AVX2 void dyn_range_l(const DynArgs& a, int64_t n_begin, int64_t n_end) {
  if (a.gs == 32) return dyn_range_g<4, L>(a, n_begin, n_end);
  if (a.gs == 64) return dyn_range_g<2, L>(a, n_begin, n_end);
  dyn_range_g<1, L>(a, n_begin, n_end);  // gs a multiple of 128 (tiles_ok)
}

}  // namespace

void quantize_row_avx2(const float* xr, int64_t K, int64_t nb, bool permuted, int8_t* qr,
                       float* bs, int L, int64_t limb_stride) {
  quantize_row_impl(xr, K, nb, permuted, qr, bs, L, limb_stride);
}

void lane_sums_avx2(const int8_t* xq, int64_t M, int64_t C, int L, float* out) {
  lane_sums_impl(xq, M, C, L, out);
}

void dyn_range_avx2(const DynArgs& a, int64_t n_begin, int64_t n_end) {
  if (a.L == 1) return dyn_range_l<1>(a, n_begin, n_end);
  dyn_range_l<kMaxLimbs>(a, n_begin, n_end);
}

bool all_finite_avx2(const float* x, int64_t n) { return all_finite_impl(x, n); }

#endif  // __x86_64__

}  // namespace dyn
}  // namespace infopt
