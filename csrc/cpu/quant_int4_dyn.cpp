// CPU infopt::int4_dynamic_linear (schema in schema.cpp, reference in infopt/ops/quant_ref.py):
// int4 group-wise weights (the int4_weight_only_linear layout) times int8 activations quantized
// on the fly per block of 32 along K (symmetric, scale = amax / 127, round half to even):
//   xhat[m, k] = xq[m, k] * xs[m, k / 32]
//   y[m, n]    = sum_k xhat[m, k] * (code[n, k] - zero[n, k / gs]) * scale[n, k / gs] + bias[n]
// The activation codes match the reference bit for bit; only the fp32 summation order differs.
//
// Why: the fp32 int4 GEMV (quant_int4.cpp) is bound by its shuffle port (a widen and two vpermps
// per 32 weights: ~14 G weights/s per core), below one core's share of DRAM bandwidth. Here
// AVX-512 VNNI vpdpbusd multiplies 64 (unsigned nibble, signed int8) pairs per instruction, the
// nibbles are split with an and and a shift, and decode is bound by memory instead (llama.cpp's
// Q4 x Q8 dot product and IPEX's weight-only "lowp_mode INT8" make the same trade).
//
// Decode layout, per 128-k chunk c of a row (64 packed bytes = one cache line): vpdpbusd lane i
// sums bytes 4i..4i+3, i.e. k in [8i, 8i + 8) of the chunk, low nibbles (even k) against the
// chunk's even activations and high nibbles (odd k) against its odd ones. So activations are
// stored per chunk as [64 even-k codes | 64 odd-k codes], and lane i's int32 dot product belongs
// to one 32-block (i / 4) and one weight group (8i / gs). The zero point comes out per lane in
// integers, sum (code - zero) * xq = dot - zero * sum xq (exact in fp32: all below 2^24, so a
// code equal to its zero contributes exactly 0, as in the reference), then the two scales.
//
// AVX2 (CPUs without VNNI): vpmaddubsw + vpmaddwd in place of vpdpbusd, in
// quant_int4_dyn_avx2.cpp with its measurements; the activation layout, lane scales and lane
// sums here serve unchanged, for one limb and for three.
// Large M (prefill), group sizes that do not tile 128 and CPUs without AVX2 dequantize xhat to
// fp32 and run the int4 weight-only op on it: the same math (quant_common.h).

#include "quant_int4_dyn.h"

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace infopt {
namespace {

using quant::Isa;
using namespace dyn;

// GEMV tiles below this M, dequantized xhat + the int4 weight-only op (MKL) from it on.
constexpr int64_t kPrefillMinM = 32;
// Largest M for the AVX2 tiles (CPUs without VNNI): at M = 32 they beat the fallback on all
// five measured shapes (1.08-1.50x), at M = 64 on two of five (0.89-1.19x); see docs/ops.md.
constexpr int64_t kAvx2MaxM = 32;
// Largest M for int4_weight_only_linear's three-limb GEMV on AVX2 (CPUs without VNNI). Against
// quant_int4.cpp's fp32 tiles (M < 8) / dequantize + MKL, 2 threads of an AVX2 EPYC, g128, on
// 1536x1536, 1536x8960, 8960x1536, 576x1536, 1536x576: M = 1 1.4-1.9x, M = 2-3 1.5-2.6x,
// M = 4 0.92-1.15x (the fp32 tiles' 4 x 4 tile), M = 6 1.3-1.6x, M = 8 1.0-1.8x, M = 9
// 1.06-1.5x, M = 10 0.99-1.48x; M = 12 0.77-1.46x (MKL wins on the two large shapes), M = 16
// 0.63-1.12x. 10 covers speculative verification of up to 9 tokens (adaptive k <= 8).
constexpr int64_t kAvx2ExactMaxM = 10;

// Block scales exactly as quant_ref.quantize_blockwise_int8: amax / 127 in fp32, 1 for an
// all-zero block (whose codes are then 0); codes round_half_even(x / scale) clamped to +-127.
// Blocks past K (padding) get scale 0 and codes 0.
struct QuantOut {
  int8_t* q;   // [L, M, C * 128] codes: per chunk [64 even k | 64 odd k] if permuted, else natural
  float* bs;   // [M, C * 4] block scales (of limb 1)
  float* xs;   // [M, C, 16] lane scales of the last limb (lane i of chunk c: block 4c + i / 4),
               // or nullptr: the only scale the kernel needs once the limbs are merged
  int L;       // limbs (1 or 3; 3 only with permuted)
};

void quantize_row_scalar(const float* xr, int64_t K, int64_t nb, bool permuted, int8_t* qr,
                         float* bs) {
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock;
    float amax = 0.f;
    for (int64_t k = k0; k < std::min(K, k0 + kBlock); ++k) amax = std::max(amax, std::fabs(xr[k]));
    const float sc = k0 >= K ? 0.f : amax > 0.f ? amax / 127.0f : 1.0f;
    for (int64_t k = k0; k < k0 + kBlock; ++k) {
      // IEEE division, round half to even (the default mode), as torch.round(x / scale).
      float v = k < K ? std::nearbyint(xr[k] / sc) : 0.f;
      v = std::min(127.f, std::max(-127.f, v));
      const int8_t code = static_cast<int8_t>(static_cast<int>(v));
      const int64_t kl = k % kChunk;  // position in the chunk
      qr[permuted ? k - kl + (kl & 1) * 64 + (kl >> 1) : k] = code;
    }
    bs[blk] = sc;
  }
}

#if defined(__x86_64__)
// The same math 16 lanes at a time (vdivps is IEEE, vrndscaleps rounds half to even). The even
// and odd k of a block are split on the fp32 side (vpermt2ps) so the permuted layout needs no
// byte shuffle; the scalar loop cost ~4 ns per activation, as much as a small GEMV.
INFOPT_AVX512 inline __m512i quant16(__m512 v, __m512 sv, __m512 lo, __m512 hi) {
  v = _mm512_roundscale_ps(_mm512_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, v)));
}

INFOPT_AVX512 void quantize_row_avx512(const float* xr, int64_t K, int64_t nb, bool permuted,
                                       int8_t* qr, float* bs, int L, int64_t limb_stride) {
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock, left = K - k0;
    const __mmask16 m0 = left >= 16 ? 0xFFFF : left > 0 ? (1u << left) - 1 : 0;
    const __mmask16 m1 = left >= 32 ? 0xFFFF : left > 16 ? (1u << (left - 16)) - 1 : 0;
    __m512 a = _mm512_maskz_loadu_ps(m0, xr + k0), b = _mm512_maskz_loadu_ps(m1, xr + k0 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float sc = left <= 0 ? 0.f : amax > 0.f ? amax / 127.0f : 1.0f;
    bs[blk] = sc;
    if (permuted) {  // a: k0 + 2j, b: k0 + 2j + 1 for j < 16
      const __m512 e = _mm512_permutex2var_ps(a, even, b), o = _mm512_permutex2var_ps(a, odd, b);
      a = e;
      b = o;
    }
    // A padding block (left <= 0) has zero inputs: divide by 1 so its codes are 0, not NaN.
    float sl = left <= 0 ? 1.f : sc;
    int64_t oa = k0, ob = k0 + 16;
    if (permuted) {  // block bi of its chunk: even codes at 16 bi, odd codes at 64 + 16 bi
      const int64_t base = k0 - k0 % kChunk, bi = (k0 % kChunk) / kBlock;
      oa = base + 16 * bi;
      ob = base + 64 + 16 * bi;
    }
    for (int l = 0; l < L; ++l) {
      const __m512 sv = _mm512_set1_ps(sl);
      const __m512i qa = quant16(a, sv, lo, hi), qb = quant16(b, sv, lo, hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + l * limb_stride + oa),
                       _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + l * limb_stride + ob),
                       _mm512_cvtepi32_epi8(qb));
      if (l + 1 < L) {  // the residual (one rounding, by the fma) for the next limb
        a = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qa), sv, a);
        b = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qb), sv, b);
        sl = sl * (1.0f / 128.0f);
      }
    }
  }
}
#endif


#if defined(__x86_64__)
// True if no element of x[0, n) is NaN or +-inf.
INFOPT_AVX512 bool all_finite(const float* x, int64_t n) {
  const __m512 inf = _mm512_set1_ps(INFINITY);
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)  // |x| >= inf or unordered (NaN)
    bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + i)), inf, _CMP_NLT_UQ);
  const __mmask16 rest = static_cast<__mmask16>((1u << (n - i)) - 1);
  bad |= _mm512_mask_cmp_ps_mask(rest, _mm512_abs_ps(_mm512_maskz_loadu_ps(rest, x + i)), inf,
                                 _CMP_NLT_UQ);
  return bad == 0;
}
#endif

// x [M, K] fp32 -> QuantOut (see there).
void quantize_x(const at::Tensor& xf, bool permuted, const QuantOut& o) {
  const int64_t M = xf.size(0), K = xf.size(1), C = (K + kChunk - 1) / kChunk;
  const int64_t nb = C * (kChunk / kBlock);
  const float* x = xf.const_data_ptr<float>();
  const bool avx512 = quant::cpu_isa() >= Isa::kAvx512;
  const bool avx2 = quant::cpu_isa() >= Isa::kAvx2;
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * K;
      int8_t* qr = o.q + m * C * kChunk;
      float* bs = o.bs + m * nb;
#if defined(__x86_64__)
      if (avx512)
        quantize_row_avx512(xr, K, nb, permuted, qr, bs, o.L, M * C * kChunk);
      else if (avx2)
        quantize_row_avx2(xr, K, nb, permuted, qr, bs, o.L, M * C * kChunk);
      else
#endif
        quantize_row_scalar(xr, K, nb, permuted, qr, bs);
      for (int64_t blk = 0; o.xs != nullptr && blk < nb; ++blk) {
        float sl = bs[blk];  // the last limb's scale, as quantize_row_avx512 derives it
        for (int l = 1; l < o.L; ++l) sl = sl * (1.0f / 128.0f);
        for (int64_t j = 0; j < 4; ++j) o.xs[m * nb * 4 + blk * 4 + j] = sl;
      }
    }
  });
}

#if defined(__x86_64__)

// Per-lane sums of the merged activation codes, sum over the lane's 8 k of (16384 q1 + 128 q2 +
// q3) (or q1 for one limb), for every row and chunk: out [M, C, 16]. Computed once per call
// rather than in every weight tile (it depends on x only).
INFOPT_AVX512VNNI void lane_sums(const int8_t* xq, int64_t M, int64_t C, int L, float* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c) {
      __m512i sum = _mm512_setzero_si512();
      for (int l = 0; l < L; ++l) {
        const int8_t* xr = xq + ((l * M + m) * C + c) * kChunk;
        if (l > 0) sum = _mm512_slli_epi32(sum, 7);
        sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(xr));
        sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(xr + 64));
      }
      _mm512_storeu_ps(out + (m * C + c) * 16, _mm512_cvtepi32_ps(sum));
    }
}

template <int NR, int MR, int L>
INFOPT_AVX512VNNI inline void dyn_tile_impl(const DynArgs& a, int64_t n0, int64_t m0) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(0x0F);
  // Lane i of a chunk covers k in [8i, 8i + 8): weight group 8i / gs of the chunk's groups.
  const int64_t gpc = kChunk / std::min(a.gs, kChunk);  // groups per chunk (1 when gs >= 128)
  const __m512i lane_group =
      _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                        gpc == 4 ? 2 : gpc == 2 ? 3 : 4);
  for (int64_t c = 0; c < a.C; ++c) {
    const int64_t k0 = c * kChunk, g0 = k0 / a.gs;
    const int64_t bytes = std::min<int64_t>(64, a.kb - k0 / 2);
    const __mmask64 bmask = bytes == 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
    __m512i lo[NR], hi[NR];
    __m512 sw[NR], zw[NR];  // per-lane weight scale and zero point
    for (int r = 0; r < NR; ++r) {
      const uint8_t* p = a.w + (n0 + r) * a.kb + k0 / 2;
      _mm_prefetch(reinterpret_cast<const char*>(p + quant::kPrefetchAhead), _MM_HINT_T1);
      // The row's last chunk may be partial: a masked load never reads past the row's bytes.
      const __m512i v = _mm512_maskz_loadu_epi8(bmask, p);
      lo[r] = _mm512_and_si512(v, nib);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      const int64_t gi = (n0 + r) * a.G + g0;
      if (gpc == 1) {
        sw[r] = _mm512_set1_ps(a.s[gi]);
        zw[r] = _mm512_set1_ps(static_cast<float>(a.z[gi]));
      } else {
        const __mmask16 gm = static_cast<__mmask16>((1u << std::min<int64_t>(gpc, a.G - g0)) - 1);
        sw[r] = _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(gm, a.s + gi));
        zw[r] = _mm512_permutexvar_ps(
            lane_group,
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(gm, a.z + gi))));
      }
    }
    for (int i = 0; i < MR; ++i) {
      __m512i xe[L], xo[L];
      for (int l = 0; l < L; ++l) {
        const int8_t* xr = a.xq + ((l * a.M + m0 + i) * a.C + c) * kChunk;
        xe[l] = _mm512_loadu_si512(xr);
        xo[l] = _mm512_loadu_si512(xr + 64);
      }
      // Lane scale of the last limb (s1 for one limb, s1 / 16384 for three) and the per-lane
      // sum of the merged activation codes, for the zero points.
      const __m512 xsv = _mm512_loadu_ps(a.xs + ((m0 + i) * a.C + c) * 16);
      const __m512 xsum = _mm512_loadu_ps(a.xsum + ((m0 + i) * a.C + c) * 16);
      for (int r = 0; r < NR; ++r) {
        __m512i d = _mm512_setzero_si512();
        for (int l = 0; l < L; ++l) {
          if (l > 0) d = _mm512_slli_epi32(d, 7);
          d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d, lo[r], xe[l]), hi[r], xo[l]);
        }
        // sum (code - zero) * xq per lane: exact for one limb (every term an integer below
        // 2^24, so a code equal to its zero contributes exactly 0, as in the reference); for
        // three limbs D and zero * xsum may pass 2^24 and round once each (2^-24 relative).
        const __m512 q = _mm512_fnmadd_ps(zw[r], xsum, _mm512_cvtepi32_ps(d));
        acc[i][r] = _mm512_fmadd_ps(_mm512_mul_ps(q, xsv), sw[r], acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      const int64_t n = n0 + r, m = m0 + i;
      const float dot = _mm512_reduce_add_ps(acc[i][r]);
      a.y[m * a.N + n] = a.b ? dot + a.b[n] : dot;
    }
}

template <int NR, int MR>
INFOPT_AVX512VNNI void dyn_tile_vnni(const DynArgs& a, int64_t n0, int64_t m0) {
  dyn_tile_impl<NR, MR, 1>(a, n0, m0);
}
// Three limbs: 2 x 3 activation registers per row; MR > 1 tiles would spill, so M rows go one
// at a time (the weight tile stays in L1 across them).
template <int NR, int MR>
INFOPT_AVX512VNNI void dyn3_tile_vnni(const DynArgs& a, int64_t n0, int64_t m0) {
  for (int i = 0; i < MR; ++i) dyn_tile_impl<NR, 1, kMaxLimbs>(a, n0, m0 + i);
}

INFOPT_TILE_RANGE(dyn_range_vnni, DynArgs, dyn_tile_vnni, INFOPT_AVX512VNNI)
INFOPT_TILE_RANGE(dyn3_range_vnni, DynArgs, dyn3_tile_vnni, INFOPT_AVX512VNNI)


#endif  // __x86_64__

// 128 % gs == 0 or gs % 128 == 0 (with gs % 32 == 0) keeps every lane in one group.
bool tiles_ok(int64_t gs) {
  return gs % kBlock == 0 && (kChunk % gs == 0 || gs % kChunk == 0);
}

// The int8-dot decode GEMV with `limbs` activation limbs on validated arguments (xf = x as
// fp32 [M, K], M > 0, K > 0, N > 0, tiles_ok(gs)): AVX-512 VNNI tiles when `vnni`, else the
// AVX2 tiles.
at::Tensor dot_gemv(const at::Tensor& x, const at::Tensor& xf, const at::Tensor& qweight,
                    const at::Tensor& scale, const at::Tensor& zero, int64_t gs,
                    const std::optional<at::Tensor>& bias, int limbs, bool vnni) {
#if defined(__x86_64__)
  TORCH_CHECK(limbs == 1 || limbs == kMaxLimbs, "infopt: int8-dot GEMV limbs must be 1 or ",
              kMaxLimbs, ", got ", limbs);
  const int64_t M = xf.size(0), K = xf.size(1), N = qweight.size(0);
  const int64_t C = (K + kChunk - 1) / kChunk, G = (K + gs - 1) / gs, nb = C * (kChunk / kBlock);
  // Activation codes, block / lane scales and lane sums: per-call scratch of a few KiB in
  // buffers kept per thread (a decode step makes hundreds of these calls; four tensor
  // allocations each were ~3 % of a SmolLM2 step).
  thread_local std::vector<int8_t> q_buf;
  thread_local std::vector<float> f_buf;
  q_buf.resize(static_cast<size_t>(limbs * M * C * kChunk));
  f_buf.resize(static_cast<size_t>(M * nb * 5 + M * C * 16));
  int8_t* q = q_buf.data();
  float* bs = f_buf.data();
  float* xs = bs + M * nb;
  float* xsum = xs + M * nb * 4;
  quantize_x(xf, true, {q, bs, xs, limbs});
  quant::Out out(x, M, N);
  const at::Tensor w = qweight.contiguous(), z = zero.contiguous(), s = quant::f32c(scale);
  const at::Tensor b = bias ? quant::f32c(*bias) : at::Tensor();
  if (vnni)
    lane_sums(q, M, C, limbs, xsum);
  else
    lane_sums_avx2(q, M, C, limbs, xsum);
  const DynArgs a{q, xs, xsum, C, w.const_data_ptr<uint8_t>(),
                  s.const_data_ptr<float>(), z.const_data_ptr<uint8_t>(),
                  b.defined() ? b.const_data_ptr<float>() : nullptr,
                  out.acc.mutable_data_ptr<float>(), M, N, K, G, gs, (K + 1) / 2, limbs};
  const int64_t tiles = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, quant::row_grain(a.kb) / 4);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * 4, n1 = std::min(N, t1 * 4);
    if (!vnni) return dyn_range_avx2(a, n0, n1);
    if (limbs == 1) return dyn_range_vnni(a, n0, n1);
    dyn3_range_vnni(a, n0, n1);
  });
  return out.finish(x);
#else
  TORCH_CHECK(false, "infopt: the int8-dot GEMV needs x86-64");
#endif
}

at::Tensor int4_dynamic_linear_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                   const at::Tensor& scale, const at::Tensor& zero,
                                   int64_t group_size, const std::optional<at::Tensor>& bias) {
  const int64_t N =
      quant::check_int4_args("int4_dynamic_linear", x, qweight, scale, zero, group_size, bias);
  const int64_t K = x.size(-1);
  const at::Tensor xf = quant::f32c(x.reshape({-1, K}));
  const int64_t M = xf.size(0), C = (K + kChunk - 1) / kChunk;
  const int64_t nb = C * (kChunk / kBlock);
  if (K > 0 && M > 0 && N > 0 && tiles_ok(group_size)) {
    const Isa isa = quant::cpu_isa();
    if (isa >= Isa::kAvx512Vnni && M < kPrefillMinM)
      return dot_gemv(x, xf, qweight, scale, zero, group_size, bias, 1, true);
    if (isa >= Isa::kAvx2 && isa < Isa::kAvx512Vnni && M <= kAvx2MaxM)
      return dot_gemv(x, xf, qweight, scale, zero, group_size, bias, 1, false);
  }
  // Otherwise xhat in fp32, natural k order, through the weight-only op: the same math.
  at::Tensor q = at::empty({M, C * kChunk}, xf.options().dtype(at::kChar));
  at::Tensor bs = at::empty({M, nb}, xf.options());
  if (M > 0 && K > 0)
    quantize_x(xf, false, {q.mutable_data_ptr<int8_t>(), bs.mutable_data_ptr<float>(), nullptr, 1});
  const at::Tensor xhat = q.view({M, nb, kBlock}).to(at::kFloat).mul(bs.unsqueeze(-1))
                              .view({M, C * kChunk})
                              .narrow(1, 0, K);
  at::Tensor y = quant::int4_weight_only_linear_cpu(xhat, qweight, scale, zero, group_size, bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace

bool quant::int4_exact_gemv_ok(int64_t M, int64_t K, int64_t N, int64_t gs) {
  if (!(K > 0 && M > 0 && N > 0 && tiles_ok(gs))) return false;
  const Isa isa = quant::cpu_isa();
  return isa >= Isa::kAvx512Vnni ? M < kPrefillMinM : isa >= Isa::kAvx2 && M <= kAvx2ExactMaxM;
}

at::Tensor quant::int4_exact_gemv(const at::Tensor& x, const at::Tensor& xf,
                                  const at::Tensor& qweight, const at::Tensor& scale,
                                  const at::Tensor& zero, int64_t gs,
                                  const std::optional<at::Tensor>& bias) {
#if defined(__x86_64__)
  // Limbs cannot carry NaN / inf: such inputs take the caller's fp32 path, which propagates
  // them as the reference does.
  const bool vnni = quant::cpu_isa() >= Isa::kAvx512Vnni;
  const float* xp = xf.const_data_ptr<float>();
  if (!(vnni ? all_finite(xp, xf.numel()) : all_finite_avx2(xp, xf.numel()))) return at::Tensor();
  return dot_gemv(x, xf, qweight, scale, zero, gs, bias, kMaxLimbs, vnni);
#else
  return at::Tensor();
#endif
}

TORCH_LIBRARY_IMPL(infopt, CPU, m) { m.impl("int4_dynamic_linear", &int4_dynamic_linear_cpu); }

}  // namespace infopt
