// Shared pieces of the CPU paged attention kernels: the task arguments, the vectorizable exp /
// tanh, and the per-task steps both loop bodies use (load the queries, the online softmax of
// one page, the final normalization). paged_attention.cpp holds the op, its checks and the
// portable loop body; paged_attention_avx2.cpp the AVX2 + FMA loop body (head_dim % 8 == 0).
// Every helper is always_inline so it compiles for the ISA of the function that calls it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace infopt {
namespace paged {

#define INFOPT_PA_INLINE __attribute__((always_inline)) inline

struct Dims {
  int64_t n, hq, hkv, d, block_size, num_blocks, max_blocks;
  int64_t kb, kt, kh, vb, vt, vh;  // cache strides (block, token, head); D is unit-stride
};

// Queries per task in a prefill: enough to amortize each K/V row load over many dot products,
// few enough that a tile's accumulators stay in L1 (8 x G x D fp32).
constexpr int64_t kTile = 8;

template <typename T, typename KV>
struct Args {
  const T* q;
  const KV* kc;
  const KV* vc;
  const float* ks;  // [num_blocks, block_size, Hkv] contiguous, or nullptr (unquantized)
  const float* vs;
  T* out;
  const int32_t* bt;
  const int64_t* tok_seq;
  const int64_t* tok_pos;
  const int64_t* tile_start;  // [num_tiles + 1] first query token of each tile
  int64_t num_tiles;
  Dims s;
  float scale;
  int64_t window;  // keys per query window; 0 = full causal attention
  float softcap;   // 0 = no soft-capping
};

// exp for the softmax, written so `#pragma omp simd` loops vectorize it (std::exp is a scalar
// libm call and was the kernel's bottleneck for long pages). Cephes expf: x = k ln2 + r with a
// two-constant Cody-Waite reduction, degree-5 polynomial on |r| <= ln2/2, 2^k via the exponent
// bits; relative error ~1e-7 (about one fp32 ulp) on [-87.3, 88.7], inputs clamped to that range
// (softmax arguments are <= 0; exp(-87.3) ~ 1e-38 stands in for 0).
INFOPT_PA_INLINE float exp_simd(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// tanh for the soft-cap, vectorizable like exp_simd: Cephes tanhf (odd polynomial for |x| <
// 0.625, no cancellation near 0; 1 - 2 / (exp(2|x|) + 1) above, where exp_simd's clamp at 88.7
// still gives 1 to fp32 precision). Both branches are computed and one is selected (no branch
// in the loop). Error ~2 fp32 ulps. Inputs are finite scores (|x| < ~1e38 / softcap).
INFOPT_PA_INLINE float tanh_simd(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
        1.33314422036e-1f) *
           z -
       3.33332819422e-1f) *
          z * x +
      x;
  float big = 1.f - 2.f / (exp_simd(2.f * a) + 1.f);
  big = x < 0.f ? -big : big;
  return a < 0.625f ? small : big;
}

// Per-task state: the tile's query rows (tile x G query heads of one KV head) in fp32, their
// online-softmax statistics and output accumulators, and the key range each row may see.
struct TaskBuffers {
  float *qf, *acc, *scores, *m, *l;
  int64_t *limit, *lo;
};

// Loads the task's query rows and resets its statistics; returns the number of rows. Query i
// of the tile sees keys lo_i ..= tok_pos[i] (lo_i = 0, or tok_pos[i] - window + 1 clamped at 0).
template <typename T, typename KV>
INFOPT_PA_INLINE int64_t task_begin(const Args<T, KV>& a, const TaskBuffers& w, int64_t t0,
                                    int64_t nq, int64_t kvh) {
  const int64_t g_size = a.s.hq / a.s.hkv, d = a.s.d;
  for (int64_t qi = 0; qi < nq; ++qi) {
    for (int64_t g = 0; g < g_size; ++g) {
      const int64_t r = qi * g_size + g;
      const T* qr = a.q + ((t0 + qi) * a.s.hq + kvh * g_size + g) * d;
      for (int64_t i = 0; i < d; ++i) w.qf[r * d + i] = static_cast<float>(qr[i]);
      w.m[r] = -std::numeric_limits<float>::infinity();
      w.l[r] = 0.f;
      w.limit[r] = a.tok_pos[t0 + qi];  // last key position this row may attend to
      w.lo[r] = a.window > 0 ? std::max<int64_t>(0, w.limit[r] - a.window + 1) : 0;  // first one
    }
  }
  const int64_t rows = nq * g_size;
  std::fill(w.acc, w.acc + rows * d, 0.f);
  return rows;
}

// Online softmax over one page for every row, given its raw scaled scores in scores[r * bs + t]
// (t < ntok): masks keys outside the row's range to probability 0, soft-caps, and rescales the
// row's accumulator and sum once per page: m_new = max(m, page max); acc, l *= exp(m - m_new).
// Afterwards scores[r * bs + t] holds exp(score - m_new) (0 where masked).
INFOPT_PA_INLINE void page_softmax(const TaskBuffers& w, int64_t rows, int64_t d, int64_t bs,
                                   int64_t page_pos, int64_t ntok, float softcap) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sg = w.scores + r * bs;
    // keys of this page the row may see: positions lo[r] <= page_pos + t <= limit[r]
    const int64_t vis = std::min(ntok, w.limit[r] - page_pos + 1);
    const int64_t t_lo = std::max<int64_t>(0, w.lo[r] - page_pos);
    if (vis <= t_lo) {  // the whole page is in this row's future or before its window
      std::fill(sg, sg + ntok, 0.f);
      continue;
    }
    float page_max = sg[t_lo];
    if (softcap > 0.f) {  // cap the visible scores: s = softcap * tanh(s / softcap)
      const float cap = softcap, inv_cap = 1.f / softcap;
      page_max = -std::numeric_limits<float>::infinity();
      // a reduction clause: GCC 12 vectorizes this loop with it, not without
#pragma omp simd reduction(max : page_max)
      for (int64_t t = t_lo; t < vis; ++t) {
        sg[t] = cap * tanh_simd(sg[t] * inv_cap);
        page_max = std::max(page_max, sg[t]);
      }
    } else {
      for (int64_t t = t_lo + 1; t < vis; ++t) page_max = std::max(page_max, sg[t]);
    }
    const float m_new = std::max(w.m[r], page_max);
    const float alpha = std::exp(w.m[r] - m_new);  // exp(-inf) = 0 on the first page
    float psum = 0.f;
    for (int64_t t = 0; t < t_lo; ++t) sg[t] = 0.f;
#pragma omp simd reduction(+ : psum)
    for (int64_t t = t_lo; t < vis; ++t) {
      sg[t] = exp_simd(sg[t] - m_new);
      psum += sg[t];
    }
    for (int64_t t = vis; t < ntok; ++t) sg[t] = 0.f;
    w.l[r] = w.l[r] * alpha + psum;
    w.m[r] = m_new;
    float* ag = w.acc + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) ag[i] *= alpha;
  }
}

// Writes acc / l of every row to the output, rounded once to T.
template <typename T, typename KV>
INFOPT_PA_INLINE void task_end(const Args<T, KV>& a, const TaskBuffers& w, int64_t t0,
                               int64_t nq, int64_t kvh) {
  const int64_t g_size = a.s.hq / a.s.hkv, d = a.s.d;
  for (int64_t qi = 0; qi < nq; ++qi) {
    for (int64_t g = 0; g < g_size; ++g) {
      const int64_t r = qi * g_size + g;
      T* orow = a.out + ((t0 + qi) * a.s.hq + kvh * g_size + g) * d;
      const float inv = 1.f / w.l[r];
      for (int64_t i = 0; i < d; ++i) orow[i] = static_cast<T>(w.acc[r * d + i] * inv);
    }
  }
}

// The AVX2 + FMA loop body (paged_attention_avx2.cpp); callers check cpu_isa() >= kAvx2 and
// d % 8 == 0 first.
#if defined(__x86_64__)
template <typename T, typename KV>
__attribute__((target("avx2,fma"))) void run_tasks_avx2(const Args<T, KV>& a, int64_t begin,
                                                          int64_t end);
#endif

}  // namespace paged
}  // namespace infopt
