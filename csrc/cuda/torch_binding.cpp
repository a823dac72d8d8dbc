// Thin torch adapter for the CUDA RMSNorm kernel: validates tensors, picks the current stream and
// device, and calls the plain-C launcher in rmsnorm.cu. The schema is defined once in
// csrc/cpu/schema.cpp (the CPU library must be loaded first); this file only adds the CUDA impl.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rmsnorm.h"

namespace infopt {
namespace {

int to_infopt_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return INFOPT_FLOAT32;
    case at::kHalf: return INFOPT_FLOAT16;
    case at::kBFloat16: return INFOPT_BFLOAT16;
    default: return -1;
  }
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda() && x.device() == weight.device(),
              "infopt::rms_norm (CUDA): x and weight must be CUDA tensors on the same device");
  TORCH_CHECK(x.dim() >= 1, "infopt::rms_norm: x must have at least 1 dimension");
  TORCH_CHECK(weight.dim() == 1, "infopt::rms_norm: weight must be 1-D, got ", weight.dim(), "-D");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.size(0) == hidden, "infopt::rms_norm: weight.shape[0] (", weight.size(0),
              ") must equal x.shape[-1] (", hidden, ")");
  const int xd = to_infopt_dtype(x.scalar_type());
  TORCH_CHECK(xd >= 0, "infopt::rms_norm: x dtype must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "infopt::rms_norm: weight dtype must equal x dtype or be float32, got ",
              weight.scalar_type());
  TORCH_CHECK(eps >= 0, "infopt::rms_norm: eps must be >= 0, got ", eps);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  // Rows may be strided (a slice of a wider buffer needs no copy); hidden must be unit-stride.
  at::Tensor x2 = x.reshape({-1, hidden});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const at::Tensor w = weight.contiguous();
  // A single row's stride is meaningless (and may block the vectorized path): use hidden.
  const int64_t x_stride = x2.size(0) == 1 ? hidden : x2.stride(0);
  const cudaError_t err = infopt_rms_norm_cuda(
      x2.const_data_ptr(), w.const_data_ptr(), y.mutable_data_ptr(), x2.size(0), hidden,
      x_stride, hidden, static_cast<float>(eps), xd, to_infopt_dtype(w.scalar_type()),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "infopt::rms_norm CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(infopt, CUDA, m) { m.impl("rms_norm", &rms_norm_cuda); }

}  // namespace infopt
