// Shared plumbing for the quantized-matmul CPU kernels (quant_int8.cpp, quant_int4.cpp,
// quant_w8a8.cpp): runtime ISA selection, argument checks, activation/epilogue helpers and the
// large-M (prefill) driver that dequantizes blocks of W to fp32 and hands them to at::mm (MKL).
//
// One build serves every x86-64 CPU: SIMD kernels are compiled per function with
// __attribute__((target(...))) (no -march flags) and chosen at run time by cpu_isa().
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

// Target attributes for the SIMD kernels. Every function that uses intrinsics (including small
// inline helpers) must carry the attribute of its ISA, else GCC refuses to inline them.
#define INFOPT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define INFOPT_AVX512VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
#define INFOPT_AVX2 __attribute__((target("avx2,fma")))

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace infopt {
namespace quant {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };

// Best ISA this CPU supports, capped by INFOPT_CPU_ISA=scalar|avx2|avx512|avx512vnni (read once; lets the
// tests exercise the lower paths on an AVX-512 machine, and users dodge a misbehaving path).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kScalar;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      best = __builtin_cpu_supports("avx512vnni") ? Isa::kAvx512Vnni : Isa::kAvx512;
    }
#endif
    const char* env = std::getenv("INFOPT_CPU_ISA");
    if (env != nullptr && *env != '\0') {
      const std::string s(env);
      Isa cap = Isa::kAvx512Vnni;
      if (s == "scalar") cap = Isa::kScalar;
      else if (s == "avx2") cap = Isa::kAvx2;
      else if (s == "avx512") cap = Isa::kAvx512;
      else TORCH_CHECK(s == "avx512vnni", "INFOPT_CPU_ISA=", s,
                       " is not an ISA cap; accepted values: scalar, avx2, avx512, avx512vnni "
                       "(or unset for the best this CPU has)");
      best = std::min(best, cap);
    }
    return best;
  }();
  return isa;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Vnni: return "avx512vnni";
  }
  return "?";
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

#if defined(__x86_64__)
// Sum of the 8 lanes of v (the AVX2 tiles' final reduction).
INFOPT_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Software prefetch distance of the decode (GEMV) tiles, in bytes ahead of the weight line being
// read, into L2. Weight rows are short (a few KiB) so the hardware prefetcher restarts on every
// row and one core then pulls only ~9 GB/s; prefetching the next tile (NR rows, 3-6 KiB ahead)
// was not far enough either. Measured single-thread on a 100 MB int4 matrix (K = 1536, Xeon with
// AVX-512): 1 KiB ahead 17.9, 4 KiB 23.7, 16 KiB 25.7, 32 KiB 25.9 G weights/s, vs 26.5 with the
// weights in L2, i.e. 16 KiB hides DRAM latency and the tile becomes compute-bound. Prefetching
// past the end of the tensor is harmless (prefetches never fault).
constexpr int64_t kPrefetchAhead = 16384;

// Shape/dtype/device checks shared by the int4 ops (quant_int4.cpp); returns N.
int64_t check_int4_args(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                        const at::Tensor& scale, const at::Tensor& zero, int64_t group_size,
                        const std::optional<at::Tensor>& bias);

// The CPU int4 weight-only linear (quant_int4.cpp), reused by int4_dynamic_linear.
at::Tensor int4_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                       const at::Tensor& scale, const at::Tensor& zero,
                                       int64_t group_size, const std::optional<at::Tensor>& bias);

// Decode GEMV of int4_weight_only_linear on int8 dot products (quant_int4_dyn.cpp): x is split
// into three int8 limbs per 32-block (x ~= s1 q1 + s2 q2 + s3 q3, s2 = s1 / 128, s3 = s2 / 128:
// to ~2^-22 of the block maximum, about an fp32 sum's precision), so it computes the weight-only op at fp32-grade accuracy
// while streaming weights like the int8-activation kernel. _ok: shapes and CPU it runs on.
// Returns an undefined tensor when x holds NaN or inf (the fp32 tiles then propagate them).
bool int4_exact_gemv_ok(int64_t M, int64_t K, int64_t N, int64_t gs);
at::Tensor int4_exact_gemv(const at::Tensor& x, const at::Tensor& xf, const at::Tensor& qweight,
                           const at::Tensor& scale, const at::Tensor& zero, int64_t gs,
                           const std::optional<at::Tensor>& bias);

// --- argument checks shared by the three ops (messages name the argument) ---

inline int64_t check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "infopt::", op, " (CPU): x must be a CPU tensor");
  TORCH_CHECK(x.dim() >= 1, "infopt::", op, ": x must have at least 1 dimension ([..., K])");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "infopt::", op,
              ": x dtype must be float32, bfloat16 or float16, got ", t);
  return x.size(-1);
}

inline void check_vec(const char* op, const char* name, const at::Tensor& v, int64_t n) {
  TORCH_CHECK(v.device().is_cpu(), "infopt::", op, " (CPU): ", name, " must be a CPU tensor");
  TORCH_CHECK(v.is_floating_point(), "infopt::", op, ": ", name, " must be floating, got ",
              v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "infopt::", op, ": ", name, " must have shape [N] = [",
              n, "], got ", v.sizes());
}

// float32 contiguous copy (or the tensor itself when it already is one).
inline at::Tensor f32c(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Result holder: kernels write fp32 [M, N] rows into `acc`; finish() casts to x's dtype and
// restores x's leading shape. For fp32 x the kernels write straight into the result.
struct Out {
  at::Tensor result;  // [M, N] in x.dtype (contiguous)
  at::Tensor acc;     // [M, N] fp32: result itself for fp32 x, else a scratch buffer
  Out(const at::Tensor& x, int64_t m, int64_t n) {
    result = at::empty({m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
    acc = x.scalar_type() == at::kFloat ? result : at::empty({m, n}, x.options().dtype(at::kFloat));
  }
  at::Tensor finish(const at::Tensor& x) {
    if (!acc.is_same(result)) result.copy_(acc);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = result.size(1);
    return result.view(shape);
  }
};

// Decode driver shared by the three ops: rows [n_begin, n_end) x all M of y, NR=4 weight rows
// per tile (a ragged rest one at a time), M in tiles of 4 then 1. A macro, not a template,
// because each instantiation must carry its ISA's target attribute (ATTR) for the tile to be
// inlined. ARGS is the op's argument struct (with an int64_t M), TILE<NR, MR>(a, n0, m0).
#define INFOPT_TILE_RANGE(NAME, ARGS, TILE, ATTR)                   \
  ATTR void NAME(const ARGS& a, int64_t n_begin, int64_t n_end) { \
    int64_t n = n_begin;                                          \
    for (; n + 4 <= n_end; n += 4) {                              \
      int64_t m = 0;                                              \
      for (; m + 4 <= a.M; m += 4) TILE<4, 4>(a, n, m);           \
      for (; m < a.M; ++m) TILE<4, 1>(a, n, m);                   \
    }                                                             \
    for (; n < n_end; ++n) {                                      \
      int64_t m = 0;                                              \
      for (; m + 4 <= a.M; m += 4) TILE<1, 4>(a, n, m);           \
      for (; m < a.M; ++m) TILE<1, 1>(a, n, m);                   \
    }                                                             \
  }

// Rows of W per parallel task so one task streams >= ~64 KiB of weights (thread wake-up costs
// a few microseconds; tiny k/v projections shouldn't be split finer than that).
inline int64_t row_grain(int64_t k_bytes_per_row) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(k_bytes_per_row, 1));
}

// Large-M path: y[M, N] = x[M, K] @ Wf^T where dequant(n0, n1, dst) writes fp32 rows n0..n1 of W
// to dst ([n1 - n0, K] row-major). Each task dequantizes up to ~2 MiB of W and calls
// at::mm on it (2 MiB blocks measured best: bigger MKL calls, still L2-resident on a 2 MiB-L2
// core); inside at::parallel_for MKL runs single-threaded, so the two levels of
// parallelism don't oversubscribe. The weight tile is reused across all M rows, so for prefill
// this runs at fp32-GEMM speed plus one dequantization of W.
template <typename Dequant>
void blocked_dequant_mm(const at::Tensor& xf, int64_t n_total, int64_t k, const Dequant& dequant,
                        at::Tensor& y) {
  // At most one block per thread's share of N: a 576-row projection would otherwise be one
  // block, run by one thread while the other cores wait.
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t per_thread = round_up((n_total + threads - 1) / threads, 16);
  const int64_t nb = std::clamp<int64_t>(
      std::min(round_up((1 << 19) / std::max<int64_t>(k, 1), 16), per_thread), 16, 1024);
  const int64_t blocks = (n_total + nb - 1) / nb;
  // Worker threads of at::parallel_for do not inherit the caller's InferenceMode; without it,
  // mm_out into `y` (an inference tensor when called under torch.inference_mode) is refused.
  const bool inference_mode = c10::InferenceMode::is_enabled();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    c10::InferenceMode guard(inference_mode);
    at::Tensor wb = at::empty({nb, k}, xf.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * nb, n1 = std::min(n_total, n0 + nb);
      dequant(n0, n1, wb.mutable_data_ptr<float>());
      at::Tensor yb = y.narrow(1, n0, n1 - n0);
      at::mm_out(yb, xf, wb.narrow(0, 0, n1 - n0).t());
    }
  });
}

}  // namespace quant
}  // namespace infopt
