// CPU implementation of infopt::paged_attention (schema in schema.cpp; semantics, layouts and the
// pure-torch oracle in infopt/ops/paged_attention.py).
//
// q [N, Hq, D] packed varlen queries; k/v_cache [num_blocks, block_size, Hkv, D]; block_tables
// int32 [B, max_blocks]; seq_lens int32 [B] (this step's tokens included); query_start_loc int32
// [B + 1]. Query i of sequence b sits at position seq_lens[b] - n_b + i and attends causally.
//
// Work is split with at::parallel_for over (query token, KV head). One task handles the
// G = Hq / Hkv query heads that share a KV head, so every K/V row is read once per group (GQA/MQA
// without repeating KV). It walks the block table page by page with an online softmax in fp32:
// scores of a whole page first, then one rescale of the accumulators per page (not per token).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace infopt {
namespace {

struct Dims {
  int64_t n, hq, hkv, d, block_size, num_blocks, max_blocks;
  int64_t kb, kt, kh, vb, vt, vh;  // cache strides (block, token, head); D is unit-stride
};

template <typename T>
void paged_attention_impl(const T* q, const T* kc, const T* vc, T* out, const int32_t* bt,
                          const int64_t* tok_seq, const int64_t* tok_pos, const Dims& s,
                          float scale) {
  const int64_t g_size = s.hq / s.hkv;
  const int64_t d = s.d, bs = s.block_size;
  const int64_t tasks = s.n * s.hkv;
  // Task cost is ~kv_len * G * D multiply-adds. Aim for >= ~256K per chunk: waking threads for
  // less costs more than it saves (decode of one short sequence runs on the calling thread).
  int64_t work = 0;
  for (int64_t t = 0; t < s.n; ++t) work += (tok_pos[t] + 1) * s.hq * d;
  const int64_t grain = std::max<int64_t>(1, tasks * (int64_t{1} << 18) / std::max<int64_t>(work, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(g_size * d), acc(g_size * d), scores(g_size * bs), kv_row(d);
    std::vector<float> m(g_size), l(g_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tok = task / s.hkv, kvh = task % s.hkv;
      const int64_t b = tok_seq[tok];
      const int64_t kv_len = tok_pos[tok] + 1;
      const int32_t* table = bt + b * s.max_blocks;
      for (int64_t g = 0; g < g_size; ++g) {
        const T* qr = q + (tok * s.hq + kvh * g_size + g) * d;
        for (int64_t i = 0; i < d; ++i) qf[g * d + i] = static_cast<float>(qr[i]);
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t pages = (kv_len + bs - 1) / bs;
      for (int64_t p = 0; p < pages; ++p) {
        const int64_t blk = table[p];
        const int64_t ntok = std::min(bs, kv_len - p * bs);
        // scores[g, t] = scale * <q_g, k_t>
        for (int64_t t = 0; t < ntok; ++t) {
          const T* kr = kc + blk * s.kb + t * s.kt + kvh * s.kh;
          for (int64_t i = 0; i < d; ++i) kv_row[i] = static_cast<float>(kr[i]);
          for (int64_t g = 0; g < g_size; ++g) {
            const float* qg = qf.data() + g * d;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; ++i) dot += qg[i] * kv_row[i];
            scores[g * bs + t] = dot * scale;
          }
        }
        // One rescale per page: m_new = max(m, page max); acc, l *= exp(m - m_new).
        for (int64_t g = 0; g < g_size; ++g) {
          float* sg = scores.data() + g * bs;
          float page_max = sg[0];
          for (int64_t t = 1; t < ntok; ++t) page_max = std::max(page_max, sg[t]);
          const float m_new = std::max(m[g], page_max);
          const float alpha = std::exp(m[g] - m_new);  // exp(-inf) = 0 on the first page
          float psum = 0.f;
          for (int64_t t = 0; t < ntok; ++t) {
            sg[t] = std::exp(sg[t] - m_new);
            psum += sg[t];
          }
          l[g] = l[g] * alpha + psum;
          m[g] = m_new;
          float* ag = acc.data() + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ag[i] *= alpha;
        }
        // acc[g] += sum_t p[g, t] * v_t
        for (int64_t t = 0; t < ntok; ++t) {
          const T* vr = vc + blk * s.vb + t * s.vt + kvh * s.vh;
          for (int64_t i = 0; i < d; ++i) kv_row[i] = static_cast<float>(vr[i]);
          for (int64_t g = 0; g < g_size; ++g) {
            const float pg = scores[g * bs + t];
            float* ag = acc.data() + g * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) ag[i] += pg * kv_row[i];
          }
        }
      }
      for (int64_t g = 0; g < g_size; ++g) {
        T* orow = out + (tok * s.hq + kvh * g_size + g) * d;
        const float inv = 1.f / l[g];
        for (int64_t i = 0; i < d; ++i) orow[i] = static_cast<T>(acc[g * d + i] * inv);
      }
    }
  });
}

at::Tensor paged_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_tables,
                               const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                               double scale) {
  const char* op = "infopt::paged_attention (CPU): ";
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  block_tables.device().is_cpu() && seq_lens.device().is_cpu() &&
                  query_start_loc.device().is_cpu(),
              op, "all tensors must be on the CPU");
  TORCH_CHECK(q_in.dim() == 3, op, "q must be [N, Hq, D], got ", q_in.dim(), "-D");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op,
              "k_cache/v_cache must both be [num_blocks, block_size, Hkv, D]");
  const auto dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              "q dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt, op,
              "k/v_cache dtype must equal q dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op,
              "k/v_cache head_dim must be unit-stride");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2, op,
              "block_tables must be int32 [B, max_blocks]");
  const int64_t batch = block_tables.size(0);
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == batch,
              op, "seq_lens must be int32 [B]");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.dim() == 1 &&
                  query_start_loc.size(0) == batch + 1,
              op, "query_start_loc must be int32 [B + 1]");

  Dims s{};
  s.n = q_in.size(0);
  s.hq = q_in.size(1);
  s.d = q_in.size(2);
  s.num_blocks = k_cache.size(0);
  s.block_size = k_cache.size(1);
  s.hkv = k_cache.size(2);
  s.max_blocks = block_tables.size(1);
  TORCH_CHECK(k_cache.size(3) == s.d, op, "head_dim of q (", s.d, ") and cache (",
              k_cache.size(3), ") differ");
  TORCH_CHECK(s.hkv > 0 && s.hq % s.hkv == 0, op, "Hq (", s.hq, ") must be a multiple of Hkv (",
              s.hkv, ")");
  s.kb = k_cache.stride(0);
  s.kt = k_cache.stride(1);
  s.kh = k_cache.stride(2);
  s.vb = v_cache.stride(0);
  s.vt = v_cache.stride(1);
  s.vh = v_cache.stride(2);

  const at::Tensor q = q_in.contiguous();
  const at::Tensor bt = block_tables.contiguous();
  const at::Tensor sl = seq_lens.contiguous();
  const at::Tensor qsl = query_start_loc.contiguous();
  const int32_t* lens = sl.const_data_ptr<int32_t>();
  const int32_t* starts = qsl.const_data_ptr<int32_t>();
  const int32_t* table = bt.const_data_ptr<int32_t>();
  TORCH_CHECK(starts[0] == 0 && starts[batch] == s.n, op,
              "query_start_loc must start at 0 and end at N = ", s.n);

  // Per query token: its sequence and absolute position. Validates every block id it will read,
  // so a bad table is an error here rather than an out-of-bounds read in the kernel.
  std::vector<int64_t> tok_seq(s.n), tok_pos(s.n);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lens[b], nq = starts[b + 1] - starts[b];
    TORCH_CHECK(nq >= 0 && nq <= len && len <= s.max_blocks * s.block_size, op, "sequence ", b,
                ": need 0 <= query len (", nq, ") <= seq_len (", len,
                ") <= max_blocks * block_size (", s.max_blocks * s.block_size, ")");
    if (nq == 0) continue;
    for (int64_t p = 0; p < (len + s.block_size - 1) / s.block_size; ++p) {
      const int32_t blk = table[b * s.max_blocks + p];
      TORCH_CHECK(blk >= 0 && blk < s.num_blocks, op, "sequence ", b, ": block id ", blk,
                  " out of range [0, ", s.num_blocks, ")");
    }
    for (int64_t i = 0; i < nq; ++i) {
      tok_seq[starts[b] + i] = b;
      tok_pos[starts[b] + i] = len - nq + i;
    }
  }

  at::Tensor out = at::empty(q.sizes(), q.options());
  if (s.n == 0) return out;
  const float sc = static_cast<float>(scale);
  switch (dt) {
#define INFOPT_PA_CASE(ST, T)                                                                    \
  case ST:                                                                                      \
    paged_attention_impl<T>(q.const_data_ptr<T>(), k_cache.const_data_ptr<T>(),                  \
                            v_cache.const_data_ptr<T>(), out.mutable_data_ptr<T>(), table,       \
                            tok_seq.data(), tok_pos.data(), s, sc);                              \
    break;
    INFOPT_PA_CASE(at::kFloat, float)
    INFOPT_PA_CASE(at::kBFloat16, c10::BFloat16)
    INFOPT_PA_CASE(at::kHalf, c10::Half)
#undef INFOPT_PA_CASE
    default: TORCH_CHECK(false, "unreachable");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(infopt, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace infopt
