// CPU implementation of infopt::rms_norm (schema in schema.cpp).
//
// Semantics match HF LlamaRMSNorm: the row statistics and the normalization are computed in fp32,
// the normalized row is rounded to x's dtype, then multiplied by the weight (in fp32, which is
// exact for bf16/fp16 operands, so it equals torch's low-precision multiply) and rounded once more.
// Rows are split across threads with at::parallel_for; the inner loops run on fp32 scratch
// buffers so the compiler can vectorize them (`omp simd` allows reassociating the sum).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace infopt {
namespace {

template <typename T, typename W>
void rms_norm_rows(const T* x, const W* w, T* y, int64_t rows, int64_t hidden, int64_t x_stride,
                   int64_t y_stride, float eps) {
  // The weight in fp32 once per call, shared read-only by all threads.
  std::vector<float> wf(hidden);
  for (int64_t i = 0; i < hidden; ++i) wf[i] = static_cast<float>(w[i]);
  const float* wp = wf.data();
  const float hidden_f = static_cast<float>(hidden);
  // Aim for ~32K elements per task so tiny inputs don't pay for thread wake-ups.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1));

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(hidden);
    float* b = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      T* yr = y + r * y_stride;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = static_cast<float>(xr[i]);
        b[i] = v;
        acc += v * v;
      }
      // mean then 1/sqrt, like torch's fp32 `pow(2).mean(-1)` and `rsqrt(var + eps)`.
      const float inv = 1.0f / std::sqrt(acc / hidden_f + eps);
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) {
        const float normed = static_cast<float>(static_cast<T>(b[i] * inv));  // round to x.dtype
        yr[i] = static_cast<T>(wp[i] * normed);
      }
    }
  });
}

template <typename T>
void dispatch_weight(const at::Tensor& x2, const at::Tensor& w, at::Tensor& y2, float eps) {
  const int64_t rows = x2.size(0), hidden = x2.size(1);
  const T* xp = x2.const_data_ptr<T>();
  T* yp = y2.mutable_data_ptr<T>();
  if (w.scalar_type() == x2.scalar_type()) {
    rms_norm_rows<T, T>(xp, w.const_data_ptr<T>(), yp, rows, hidden, x2.stride(0), y2.stride(0),
                        eps);
  } else {
    rms_norm_rows<T, float>(xp, w.const_data_ptr<float>(), yp, rows, hidden, x2.stride(0),
                            y2.stride(0), eps);
  }
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "infopt::rms_norm (CPU): x and weight must be CPU tensors");
  TORCH_CHECK(x.dim() >= 1, "infopt::rms_norm: x must have at least 1 dimension");
  TORCH_CHECK(weight.dim() == 1, "infopt::rms_norm: weight must be 1-D, got ", weight.dim(), "-D");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.size(0) == hidden, "infopt::rms_norm: weight.shape[0] (", weight.size(0),
              ") must equal x.shape[-1] (", hidden, ")");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
              "infopt::rms_norm: x dtype must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(weight.scalar_type() == xt || weight.scalar_type() == at::kFloat,
              "infopt::rms_norm: weight dtype must equal x dtype or be float32, got ",
              weight.scalar_type());
  TORCH_CHECK(eps >= 0, "infopt::rms_norm: eps must be >= 0, got ", eps);

  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  // Rows may be strided (e.g. a slice of a wider buffer); the hidden dim must be unit-stride.
  at::Tensor x2 = x.reshape({-1, hidden});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  at::Tensor w = weight.contiguous();
  at::Tensor y2 = y.view({-1, hidden});
  const float e = static_cast<float>(eps);
  switch (xt) {
    case at::kFloat: dispatch_weight<float>(x2, w, y2, e); break;
    case at::kBFloat16: dispatch_weight<c10::BFloat16>(x2, w, y2, e); break;
    case at::kHalf: dispatch_weight<c10::Half>(x2, w, y2, e); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(infopt, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }

}  // namespace infopt
