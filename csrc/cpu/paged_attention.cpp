// CPU implementation of infopt::paged_attention (schema in schema.cpp; semantics, layouts and the
// pure-torch oracle in infopt/ops/paged_attention.py).
//
// q [N, Hq, D] packed varlen queries; k/v_cache [num_blocks, block_size, Hkv, D]; block_tables
// int32 [B, max_blocks]; seq_lens int32 [B] (this step's tokens included); query_start_loc int32
// [B + 1]. Query i of sequence b sits at position seq_lens[b] - n_b + i and attends causally.
// Quantized pools: k/v_cache int8 or float8_e4m3fn with k/v_scale float32 [num_blocks,
// block_size, Hkv] (one scale per token and head); a row is dequantized as it is loaded
// (value = stored * scale; the AVX2 body converts one page of one head at a time), so no
// full-precision copy of the cache is ever made.
// Sliding window (window >= 1 keys, 0 = off): query at position p attends to keys p - window < j
// <= p; a task's page loop starts at the page of its first query's first window key, so table
// entries before it are neither read nor validated (they may be stale). Soft-capping (softcap >
// 0, 0 = off): scores become softcap * tanh(score / softcap), score already scaled.
//
// Work is split with at::parallel_for over (query token, KV head). One task handles the
// G = Hq / Hkv query heads that share a KV head, so every K/V row is read once per group (GQA/MQA
// without repeating KV). It walks the block table page by page with an online softmax in fp32:
// scores of a whole page first, then one rescale of the accumulators per page (not per token).
// Every check runs before the parallel region: an exception thrown inside a worker cannot be
// propagated reliably (it was seen to crash the process on some builds).
//
// The build has no -march flags; the loop body is picked once at run time (quant::cpu_isa(), so
// INFOPT_CPU_ISA=scalar forces the portable one): with AVX2 + FMA and head_dim % 8 == 0 the
// intrinsics body of paged_attention_avx2.cpp (8 keys per dot-product block, 2 rows per V
// block); otherwise the portable body below, compiled plain (SSE2) and with target("avx2,fma").
// Shared steps (query load, the per-page online softmax, output) live in paged_attention.h.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "paged_attention.h"
#include "quant_common.h"

namespace infopt {
namespace {

using paged::Args;
using paged::Dims;
using paged::kTile;
using paged::TaskBuffers;

// Tasks [begin, end) of the (query tile, KV head) grid, portable loop body. A tile is up to
// kTile consecutive queries of one sequence: each K/V row is loaded (and dequantized) once for
// all tile x G query heads, which is what makes a chunked prefill over a long cached prefix
// cheap. Keys outside a row's range (inside the tile's range) get probability 0.
// always_inline: inlined into both the plain and the AVX2 entry points, each compiled for its ISA.
template <typename T, typename KV>
__attribute__((always_inline)) inline void run_tasks(const Args<T, KV>& a, int64_t begin,
                                                     int64_t end) {
  const Dims& s = a.s;
  const int64_t g_size = s.hq / s.hkv;
  const int64_t d = s.d, bs = s.block_size;
  const int64_t rows_max = kTile * g_size;  // query heads of one task
  std::vector<float> qf(rows_max * d), acc(rows_max * d), scores(rows_max * bs), kv_row(d);
  std::vector<float> m(rows_max), l(rows_max);
  std::vector<int64_t> limit(rows_max), lo(rows_max);
  const TaskBuffers w{qf.data(), acc.data(), scores.data(), m.data(), l.data(), limit.data(),
                      lo.data()};
  float* kvr = kv_row.data();
  for (int64_t task = begin; task < end; ++task) {
    const int64_t tile = task / s.hkv, kvh = task % s.hkv;
    const int64_t t0 = a.tile_start[tile], nq = a.tile_start[tile + 1] - t0;
    const int64_t rows = paged::task_begin(a, w, t0, nq, kvh);
    const int64_t b = a.tok_seq[t0];
    const int64_t kv_len = a.tok_pos[t0 + nq - 1] + 1;  // the tile's last query sees the most
    const int32_t* table = a.bt + b * s.max_blocks;
    const int64_t pages = (kv_len + bs - 1) / bs;
    // The tile's first query has the earliest window: pages before its first key are skipped.
    const int64_t first_page = lo[0] / bs;
    for (int64_t p = first_page; p < pages; ++p) {
      const int64_t blk = table[p];
      const int64_t ntok = std::min(bs, kv_len - p * bs);
      // scores[r, t] = scale * <q_r, k_t>
      for (int64_t t = 0; t < ntok; ++t) {
        const KV* kr = a.kc + blk * s.kb + t * s.kt + kvh * s.kh;
        const float ksc = a.ks ? a.ks[(blk * bs + t) * s.hkv + kvh] : 1.f;
        for (int64_t i = 0; i < d; ++i) kvr[i] = static_cast<float>(kr[i]) * ksc;
        for (int64_t r = 0; r < rows; ++r) {
          const float* qg = qf.data() + r * d;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < d; ++i) dot += qg[i] * kvr[i];
          scores[r * bs + t] = dot * a.scale;
        }
      }
      paged::page_softmax(w, rows, d, bs, p * bs, ntok, a.softcap);
      // acc[r] += sum_t p[r, t] * v_t
      for (int64_t t = 0; t < ntok; ++t) {
        const KV* vr = a.vc + blk * s.vb + t * s.vt + kvh * s.vh;
        const float vsc = a.vs ? a.vs[(blk * bs + t) * s.hkv + kvh] : 1.f;
        for (int64_t i = 0; i < d; ++i) kvr[i] = static_cast<float>(vr[i]) * vsc;
        for (int64_t r = 0; r < rows; ++r) {
          const float pg = scores[r * bs + t];
          float* ag = acc.data() + r * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ag[i] += pg * kvr[i];
        }
      }
    }
    paged::task_end(a, w, t0, nq, kvh);
  }
}

template <typename T, typename KV>
void run_tasks_plain(const Args<T, KV>& a, int64_t begin, int64_t end) {
  run_tasks(a, begin, end);
}

// The portable body compiled for AVX2 + FMA (its omp simd loops vectorize 8-wide): head dims
// that are not a multiple of 8.
template <typename T, typename KV>
__attribute__((target("avx2,fma"))) void run_tasks_autovec_avx2(const Args<T, KV>& a,
                                                                int64_t begin, int64_t end) {
  run_tasks(a, begin, end);
}

template <typename T, typename KV>
void paged_attention_impl(const Args<T, KV>& a) {
  const Dims& s = a.s;
  const int64_t tasks = a.num_tiles * s.hkv;
  // Task cost is ~kv_len * tile * G * D multiply-adds. Aim for >= ~256K per chunk: waking
  // threads for less costs more than it saves (decode of one short sequence stays on one thread).
  int64_t work = 0;
  for (int64_t t = 0; t < s.n; ++t) {
    const int64_t keys = a.window > 0 ? std::min(a.tok_pos[t] + 1, a.window) : a.tok_pos[t] + 1;
    work += keys * s.hq * s.d;
  }
  const int64_t grain = std::max<int64_t>(1, tasks * (int64_t{1} << 18) / std::max<int64_t>(work, 1));
  const bool avx2 = quant::cpu_isa() >= quant::Isa::kAvx2;
  const bool vec = avx2 && s.d % 8 == 0;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    if (vec) {
      paged::run_tasks_avx2(a, begin, end);
      return;
    }
#endif
    if (avx2) {
      run_tasks_autovec_avx2(a, begin, end);
    } else {
      run_tasks_plain(a, begin, end);
    }
  });
}

template <typename T, typename KV>
void dispatch(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
              const float* ks, const float* vs, at::Tensor& out, const int32_t* table,
              const std::vector<int64_t>& tok_seq, const std::vector<int64_t>& tok_pos,
              const std::vector<int64_t>& tiles, const Dims& s, float sc, int64_t window,
              float softcap) {
  Args<T, KV> a{q.const_data_ptr<T>(),
                reinterpret_cast<const KV*>(kc.const_data_ptr()),
                reinterpret_cast<const KV*>(vc.const_data_ptr()),
                ks,
                vs,
                out.mutable_data_ptr<T>(),
                table,
                tok_seq.data(),
                tok_pos.data(),
                tiles.data(),
                static_cast<int64_t>(tiles.size()) - 1,
                s,
                sc,
                window,
                softcap};
  paged_attention_impl<T, KV>(a);
}

template <typename T>
void dispatch_kv(at::ScalarType kv_dt, const at::Tensor& q, const at::Tensor& kc,
                 const at::Tensor& vc, const float* ks, const float* vs, at::Tensor& out,
                 const int32_t* table, const std::vector<int64_t>& tok_seq,
                 const std::vector<int64_t>& tok_pos, const std::vector<int64_t>& tiles,
                 const Dims& s, float sc, int64_t window, float softcap) {
  if (kv_dt == at::kChar) {
    dispatch<T, int8_t>(q, kc, vc, ks, vs, out, table, tok_seq, tok_pos, tiles, s, sc, window,
                        softcap);
  } else if (kv_dt == at::kFloat8_e4m3fn) {
    dispatch<T, c10::Float8_e4m3fn>(q, kc, vc, ks, vs, out, table, tok_seq, tok_pos, tiles, s,
                                    sc, window, softcap);
  } else {
    dispatch<T, T>(q, kc, vc, ks, vs, out, table, tok_seq, tok_pos, tiles, s, sc, window,
                   softcap);
  }
}

at::Tensor paged_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_tables,
                               const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                               double scale, const std::optional<at::Tensor>& k_scale,
                               const std::optional<at::Tensor>& v_scale,
                               std::optional<int64_t> window_opt,
                               std::optional<double> softcap_opt) {
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
  const auto kv_dt = k_cache.scalar_type();
  const bool quant = kv_dt == at::kChar || kv_dt == at::kFloat8_e4m3fn;
  TORCH_CHECK((kv_dt == dt || quant) && v_cache.scalar_type() == kv_dt, op,
              "k/v_cache dtype must equal q dtype, or both be int8 / float8_e4m3fn");
  TORCH_CHECK(quant == (k_scale.has_value() && v_scale.has_value()) &&
                  (k_scale.has_value() == v_scale.has_value()),
              op, "k_scale and v_scale are required with int8/float8 caches and only then");
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
  TORCH_CHECK(!window_opt.has_value() || *window_opt >= 1, op,
              "window must be None or an int >= 1, got ", window_opt.value_or(0));
  TORCH_CHECK(!softcap_opt.has_value() || (std::isfinite(*softcap_opt) && *softcap_opt > 0.0), op,
              "softcap must be None or a finite float > 0, got ", softcap_opt.value_or(0.0));
  const int64_t window = window_opt.value_or(0);
  const float softcap = static_cast<float>(softcap_opt.value_or(0.0));
  TORCH_CHECK(!softcap_opt.has_value() || (std::isfinite(softcap) && softcap > 0.f), op,
              "softcap ", *softcap_opt, " is not a positive finite float32");

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
  if (quant) {
    for (const at::Tensor* sc : {&*k_scale, &*v_scale}) {
      TORCH_CHECK(sc->device().is_cpu() && sc->scalar_type() == at::kFloat && sc->dim() == 3 &&
                      sc->size(0) == s.num_blocks && sc->size(1) == s.block_size &&
                      sc->size(2) == s.hkv && sc->is_contiguous(),
                  op, "k_scale/v_scale must be contiguous float32 [num_blocks, block_size, Hkv]");
    }
  }
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

  // Per query token: its sequence and absolute position. Validates every block id it will read
  // (from the first page holding a window key of the sequence's first query), so a bad table is
  // an error here rather than an out-of-bounds read in the kernel.
  std::vector<int64_t> tok_seq(s.n), tok_pos(s.n), tiles{0};
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lens[b], nq = starts[b + 1] - starts[b];
    TORCH_CHECK(nq >= 0 && nq <= len && len <= s.max_blocks * s.block_size, op, "sequence ", b,
                ": need 0 <= query len (", nq, ") <= seq_len (", len,
                ") <= max_blocks * block_size (", s.max_blocks * s.block_size, ")");
    if (nq == 0) continue;
    const int64_t first_page =
        window > 0 ? std::max<int64_t>(0, len - nq - window + 1) / s.block_size : 0;
    for (int64_t p = first_page; p < (len + s.block_size - 1) / s.block_size; ++p) {
      const int32_t blk = table[b * s.max_blocks + p];
      TORCH_CHECK(blk >= 0 && blk < s.num_blocks, op, "sequence ", b, ": block id ", blk,
                  " out of range [0, ", s.num_blocks, ")");
    }
    for (int64_t i = 0; i < nq; ++i) {
      tok_seq[starts[b] + i] = b;
      tok_pos[starts[b] + i] = len - nq + i;
    }
    for (int64_t i = kTile; i < nq; i += kTile) tiles.push_back(starts[b] + i);
    tiles.push_back(starts[b + 1]);
  }

  at::Tensor out = at::empty(q.sizes(), q.options());
  if (s.n == 0) return out;
  const float sc = static_cast<float>(scale);
  const float* ks = quant ? k_scale->const_data_ptr<float>() : nullptr;
  const float* vs = quant ? v_scale->const_data_ptr<float>() : nullptr;
  switch (dt) {
    case at::kFloat:
      dispatch_kv<float>(kv_dt, q, k_cache, v_cache, ks, vs, out, table, tok_seq, tok_pos, tiles, s,
                         sc, window, softcap);
      break;
    case at::kBFloat16:
      dispatch_kv<c10::BFloat16>(kv_dt, q, k_cache, v_cache, ks, vs, out, table, tok_seq,
                                 tok_pos, tiles, s, sc, window, softcap);
      break;
    case at::kHalf:
      dispatch_kv<c10::Half>(kv_dt, q, k_cache, v_cache, ks, vs, out, table, tok_seq, tok_pos,
                             tiles, s, sc, window, softcap);
      break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(infopt, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace infopt
