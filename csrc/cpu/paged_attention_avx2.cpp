// AVX2 + FMA loop body of infopt::paged_attention on the CPU (head_dim % 8 == 0); the op, its
// checks and the portable body are in paged_attention.cpp, the shared steps in paged_attention.h.
//
// Per task (up to kTile queries x G query heads = `rows`, one KV head) and page of keys:
// - K and V rows of the page are read in place when the cache is fp32, else dequantized once
//   into a page buffer (bs x D floats: a page, never the cache, is copied).
// - scores: 8 keys at a time per row, one accumulator per key (D / 8 FMAs each, the key row as
//   the memory operand), then one 8 x 8 horizontal reduction (hadd tree) gives the 8 scores in
//   one register: no per-key horizontal sum, no transposed copy of K.
// - softmax: the steps of paged::page_softmax, with the max and exp over 8-lane blocks.
// - acc += P V: two rows at a time over 32-float slices of D, so each V load feeds two FMAs and
//   the 8 accumulators stay in registers across the page's keys.
// Results equal the portable body's up to fp32 summation order.

#if defined(__x86_64__)

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "paged_attention.h"

namespace infopt {
namespace paged {
namespace {

#define INFOPT_PA_AVX2 __attribute__((target("avx2,fma")))

// Sum of each of 8 accumulators' lanes: lane j of the result = sum of a[j]'s 8 lanes.
INFOPT_PA_AVX2 INFOPT_PA_INLINE __m256 hsum8x8(const __m256 a[8]) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23);  // [a0..a3 low halves | a0..a3 high halves]
  const __m256 s4567 = _mm256_hadd_ps(s45, s67);
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

INFOPT_PA_AVX2 INFOPT_PA_INLINE float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// exp_simd (paged_attention.h) on 8 lanes: the same Cephes constants and steps.
INFOPT_PA_AVX2 INFOPT_PA_INLINE __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 k = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(k, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// All-ones lanes where t_lo <= t + lane < vis.
INFOPT_PA_AVX2 INFOPT_PA_INLINE __m256 visible8(int64_t t, int64_t t_lo, int64_t vis) {
  const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(t)),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i ge = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(static_cast<int32_t>(t_lo - 1)));
  const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(vis)), idx);
  return _mm256_castsi256_ps(_mm256_and_si256(ge, lt));
}

// paged::page_softmax with the max and exp loops in 8-lane blocks (GCC leaves the portable
// loops scalar in this translation unit); the soft-cap, when on, runs the portable loop.
INFOPT_PA_AVX2 void page_softmax_avx2(const TaskBuffers& w, int64_t rows, int64_t d, int64_t bs,
                                      int64_t page_pos, int64_t ntok, float softcap) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; ++r) {
    float* sg = w.scores + r * bs;
    const int64_t vis = std::min(ntok, w.limit[r] - page_pos + 1);
    const int64_t t_lo = std::max<int64_t>(0, w.lo[r] - page_pos);
    if (vis <= t_lo) {
      std::fill(sg, sg + ntok, 0.f);
      continue;
    }
    if (softcap > 0.f) {
      const float inv_cap = 1.f / softcap;
      for (int64_t t = t_lo; t < vis; ++t) sg[t] = softcap * tanh_simd(sg[t] * inv_cap);
    }
    const int64_t full = ntok & ~int64_t{7};
    __m256 vmax = neg_inf;
    for (int64_t t = 0; t < full; t += 8)
      vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(sg + t), visible8(t, t_lo, vis)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float page_max = _mm_cvtss_f32(m4);
    for (int64_t t = std::max(full, t_lo); t < vis; ++t) page_max = std::max(page_max, sg[t]);
    const float m_new = std::max(w.m[r], page_max);
    const float alpha = std::exp(w.m[r] - m_new);  // exp(-inf) = 0 on the first page
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t t = 0; t < full; t += 8) {
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + t), vm)), visible8(t, t_lo, vis));
      _mm256_storeu_ps(sg + t, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float psum = hsum(vsum);
    for (int64_t t = full; t < ntok; ++t) {
      sg[t] = t >= t_lo && t < vis ? exp_simd(sg[t] - m_new) : 0.f;
      psum += sg[t];
    }
    w.l[r] = w.l[r] * alpha + psum;
    w.m[r] = m_new;
    float* ag = w.acc + r * d;
    const __m256 va = _mm256_set1_ps(alpha);
    for (int64_t i = 0; i < d; i += 8) _mm256_storeu_ps(ag + i, _mm256_mul_ps(_mm256_loadu_ps(ag + i), va));
  }
}

// out[t] = scale * <q, k_t> for t < ntok; key t at k + t * ks (D contiguous floats).
INFOPT_PA_AVX2 void scores_row(const float* q, const float* k, int64_t ks, int64_t d,
                               int64_t ntok, float scale, float* out) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t t = 0;
  for (; t + 8 <= ntok; t += 8) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    const float* kt = k + t * ks;
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int j = 0; j < 8; ++j)
        acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kt + j * ks + i), acc[j]);
    }
    _mm256_storeu_ps(out + t, _mm256_mul_ps(hsum8x8(acc), vscale));
  }
  for (; t < ntok; ++t) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + t * ks + i), acc);
    out[t] = hsum(acc) * scale;
  }
}

// acc_r[i] += sum_t p_r[t] * v_t[i] for NR rows (1 or 2) over a slice of NV vectors of D
// starting at i0; v_t at v + t * vs.
template <int NR, int NV>
INFOPT_PA_AVX2 INFOPT_PA_INLINE void pv_slice(float* const acc[NR], const float* const p[NR],
                                              const float* v, int64_t vs, int64_t ntok,
                                              int64_t i0) {
  __m256 c[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = _mm256_loadu_ps(acc[r] + i0 + 8 * j);
  for (int64_t t = 0; t < ntok; ++t) {
    __m256 vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = _mm256_loadu_ps(v + t * vs + i0 + 8 * j);
    for (int r = 0; r < NR; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p[r] + t);
      for (int j = 0; j < NV; ++j) c[r][j] = _mm256_fmadd_ps(pr, vv[j], c[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(acc[r] + i0 + 8 * j, c[r][j]);
}

template <int NR>
INFOPT_PA_AVX2 INFOPT_PA_INLINE void pv_rows(float* const acc[NR], const float* const p[NR],
                                             const float* v, int64_t vs, int64_t d,
                                             int64_t ntok) {
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) pv_slice<NR, 4>(acc, p, v, vs, ntok, i);
  for (; i < d; i += 8) pv_slice<NR, 1>(acc, p, v, vs, ntok, i);
}

// The page's ntok rows of one KV head as floats: in place for an unscaled fp32 cache (returns
// the row stride), else converted (times the per-token scale) into buf (stride d).
template <typename KV>
INFOPT_PA_AVX2 INFOPT_PA_INLINE const float* page_rows(const KV* base, int64_t tstride,
                                                       const float* sc, int64_t sc_stride,
                                                       int64_t d, int64_t ntok, float* buf,
                                                       int64_t* stride) {
  if constexpr (std::is_same_v<KV, float>) {
    if (sc == nullptr) {
      *stride = tstride;
      return base;
    }
  }
  for (int64_t t = 0; t < ntok; ++t) {
    const KV* row = base + t * tstride;
    const float s = sc ? sc[t * sc_stride] : 1.f;
    for (int64_t i = 0; i < d; ++i) buf[t * d + i] = static_cast<float>(row[i]) * s;
  }
  *stride = d;
  return buf;
}

}  // namespace

template <typename T, typename KV>
INFOPT_PA_AVX2 void run_tasks_avx2(const Args<T, KV>& a, int64_t begin, int64_t end) {
  const Dims& s = a.s;
  const int64_t g_size = s.hq / s.hkv;
  const int64_t d = s.d, bs = s.block_size;
  const int64_t rows_max = kTile * g_size;
  std::vector<float> qf(rows_max * d), acc(rows_max * d), scores(rows_max * bs);
  std::vector<float> kbuf(bs * d), vbuf(bs * d), m(rows_max), l(rows_max);
  std::vector<int64_t> limit(rows_max), lo(rows_max);
  const TaskBuffers w{qf.data(), acc.data(), scores.data(), m.data(), l.data(), limit.data(),
                      lo.data()};
  for (int64_t task = begin; task < end; ++task) {
    const int64_t tile = task / s.hkv, kvh = task % s.hkv;
    const int64_t t0 = a.tile_start[tile], nq = a.tile_start[tile + 1] - t0;
    const int64_t rows = task_begin(a, w, t0, nq, kvh);
    const int64_t b = a.tok_seq[t0];
    const int64_t kv_len = a.tok_pos[t0 + nq - 1] + 1;  // the tile's last query sees the most
    const int32_t* table = a.bt + b * s.max_blocks;
    const int64_t pages = (kv_len + bs - 1) / bs;
    for (int64_t p = lo[0] / bs; p < pages; ++p) {  // pages before the first window key: skipped
      const int64_t blk = table[p];
      const int64_t ntok = std::min(bs, kv_len - p * bs);
      const float* ksc = a.ks ? a.ks + blk * bs * s.hkv + kvh : nullptr;
      const float* vsc = a.vs ? a.vs + blk * bs * s.hkv + kvh : nullptr;
      int64_t kst = 0, vst = 0;
      const float* kp = page_rows(a.kc + blk * s.kb + kvh * s.kh, s.kt, ksc, s.hkv, d, ntok,
                                  kbuf.data(), &kst);
      for (int64_t r = 0; r < rows; ++r)
        scores_row(qf.data() + r * d, kp, kst, d, ntok, a.scale, scores.data() + r * bs);
      page_softmax_avx2(w, rows, d, bs, p * bs, ntok, a.softcap);
      const float* vp = page_rows(a.vc + blk * s.vb + kvh * s.vh, s.vt, vsc, s.hkv, d, ntok,
                                  vbuf.data(), &vst);
      int64_t r = 0;
      for (; r + 2 <= rows; r += 2) {
        float* const ar[2] = {acc.data() + r * d, acc.data() + (r + 1) * d};
        const float* const pr[2] = {scores.data() + r * bs, scores.data() + (r + 1) * bs};
        pv_rows<2>(ar, pr, vp, vst, d, ntok);
      }
      if (r < rows) {
        float* const ar[1] = {acc.data() + r * d};
        const float* const pr[1] = {scores.data() + r * bs};
        pv_rows<1>(ar, pr, vp, vst, d, ntok);
      }
    }
    task_end(a, w, t0, nq, kvh);
  }
}

#define INFOPT_PA_INSTANTIATE(T, KV) \
  template void run_tasks_avx2<T, KV>(const Args<T, KV>&, int64_t, int64_t);
#define INFOPT_PA_INSTANTIATE_Q(T)  \
  INFOPT_PA_INSTANTIATE(T, T)       \
  INFOPT_PA_INSTANTIATE(T, int8_t)  \
  INFOPT_PA_INSTANTIATE(T, c10::Float8_e4m3fn)
INFOPT_PA_INSTANTIATE_Q(float)
INFOPT_PA_INSTANTIATE_Q(c10::BFloat16)
INFOPT_PA_INSTANTIATE_Q(c10::Half)

}  // namespace paged
}  // namespace infopt

#endif  // __x86_64__
