// CPU implementation of infopt::dense_gemv (schema in schema.cpp; Python side and the reference,
// F.linear, in infopt/ops/dense.py): y [M, N] = x [M, K] @ W[N, K]^T (+ bias), float32, for the
// few rows of a decode step (M <= ~8).
//
// Why: at M = 1-8, MKL's sgemm reads fp32 weights at 6-15 GB/s on the 2-core AVX2 EPYC this
// project measures on, against ~30 GB/s the memory delivers, and a small fp32 model's decode
// step is almost nothing but these reads. Here each thread streams a contiguous range of W rows
// once: 4 rows at a time, each loaded 8 floats at a time against the same x vector, so there is
// one weight load per FMA and 4 independent accumulators; the 4-row block (4 x K floats, L1/L2
// resident) is then reused for every row of x. Rows are split so each task reads >= ~64 KiB.
//
// The AVX2 + FMA body is picked at run time (quant::cpu_isa(), INFOPT_CPU_ISA=scalar forces the
// portable one); results equal F.linear up to fp32 summation order.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "quant_common.h"

namespace infopt {
namespace {

// Rows n0..n1 of y for every row of x, portable (the compiler vectorizes the inner loop).
void rows_plain(const float* x, const float* w, const float* bias, float* y, int64_t M,
                int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += xm[k] * wr[k];
      y[m * N + n] = s + (bias ? bias[n] : 0.f);
    }
  }
}

#if defined(__x86_64__)
#include <immintrin.h>

INFOPT_AVX2 void rows_avx2(const float* x, const float* w, const float* bias, float* y,
                           int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t k8 = K & ~int64_t{7};
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = w + n * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < k8; k += 8) {
        const __m256 xv = _mm256_loadu_ps(xm + k);
        a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + k), a0);
        a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w1 + k), a1);
        a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w2 + k), a2);
        a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w3 + k), a3);
      }
      float s[4] = {quant::hsum256(a0), quant::hsum256(a1), quant::hsum256(a2),
                    quant::hsum256(a3)};
      for (int64_t k = k8; k < K; ++k) {
        s[0] += xm[k] * w0[k];
        s[1] += xm[k] * w1[k];
        s[2] += xm[k] * w2[k];
        s[3] += xm[k] * w3[k];
      }
      float* ym = y + m * N + n;
      for (int j = 0; j < 4; ++j) ym[j] = s[j] + (bias ? bias[n + j] : 0.f);
    }
  }
  for (; n < n1; ++n) {  // the last N % 4 rows of this range
    const float* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = 0; k < k8; k += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(wr + k), a);
      float s = quant::hsum256(a);
      for (int64_t k = k8; k < K; ++k) s += xm[k] * wr[k];
      y[m * N + n] = s + (bias ? bias[n] : 0.f);
    }
  }
}
#endif

at::Tensor dense_gemv_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  const char* op = "infopt::dense_gemv (CPU): ";
  TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu(), op, "tensors must be on the CPU");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
              "x and weight must be float32, got ", x_in.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2 && x_in.size(1) == weight.size(1), op,
              "x must be [M, K] and weight [N, K], got ", x_in.sizes(), " and ", weight.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight.size(0);
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == N,
                op, "bias must be float32 [N] = [", N, "]");
    b = bias->contiguous();
    bp = b.const_data_ptr<float>();
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  // >= ~64 KiB of weights per task, in whole 4-row blocks
  const int64_t grain = std::max<int64_t>(4, (65536 / std::max<int64_t>(K * 4, 1)) & ~int64_t{3});
#if defined(__x86_64__)
  if (quant::cpu_isa() >= quant::Isa::kAvx2) {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      rows_avx2(xp, wp, bp, yp, M, K, N, n0, n1);
    });
    return y;
  }
#endif
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    rows_plain(xp, wp, bp, yp, M, K, N, n0, n1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(infopt, CPU, m) { m.impl("dense_gemv", &dense_gemv_cpu); }

}  // namespace infopt
