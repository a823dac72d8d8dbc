// Thin torch adapter for the CUDA kernels (rmsnorm.cu, int4_gemv.cu, int4_tiled.cu): validates
// tensors, picks the current stream and device, and calls their plain-C launchers. The schemas
// are defined once in csrc/cpu/schema.cpp (the CPU library must be loaded first); this file only
// adds CUDA impls.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "int4_gemv.h"
#include "int4_tiled.h"
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

// infopt::int4_weight_only_linear on CUDA: x [..., K] fp32/bf16/fp16 -> [..., N] in x.dtype.
at::Tensor int4_weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& qweight,
                                        const at::Tensor& scale, const at::Tensor& zero,
                                        int64_t group_size, const std::optional<at::Tensor>& bias) {
  const char* op = "infopt::int4_weight_only_linear";
  TORCH_CHECK(x.is_cuda() && qweight.device() == x.device() && scale.device() == x.device() &&
                  zero.device() == x.device() && (!bias || bias->device() == x.device()),
              op, " (CUDA): x, qweight, scale, zero and bias must be on one CUDA device");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension ([..., K])");
  const int xd = to_infopt_dtype(x.scalar_type());
  TORCH_CHECK(xd >= 0, op, ": x dtype must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0, op,
              ": group_size must be a positive even integer, got ", group_size);
  const int64_t K = x.size(-1), kb = (K + 1) / 2, G = (K + group_size - 1) / group_size;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.size(1) == kb,
              op, ": qweight must be uint8 [N, ceil(K/2)] = [N, ", kb, "], got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const int64_t N = qweight.size(0);
  TORCH_CHECK(scale.is_floating_point() && scale.dim() == 2 && scale.size(0) == N &&
                  scale.size(1) == G,
              op, ": scale must be a float tensor [N, ceil(K/group_size)] = [", N, ", ", G,
              "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(zero.scalar_type() == at::kByte && zero.dim() == 2 && zero.size(0) == N &&
                  zero.size(1) == G,
              op, ": zero must be a uint8 tensor [N, ", G, "], got ", zero.scalar_type(), " ",
              zero.sizes());
  TORCH_CHECK(!bias || (bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == N), op,
              ": bias must be a float tensor of shape [N] = [", N, "]");

  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  at::Tensor x2 = x.reshape({-1, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  // Small side tensors in the kernel's layout (no-ops for what infopt.quant produces).
  const at::Tensor w = qweight.contiguous(), z = zero.contiguous();
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t x_stride = x2.size(0) == 1 ? K : x2.stride(0);
  const cudaError_t err = infopt_int4_gemv_cuda(
      x2.const_data_ptr(), x_stride, w.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(),
      z.const_data_ptr<uint8_t>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
      y.mutable_data_ptr(), x2.size(0), N, K, group_size, xd, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

// A copy with a 16-byte aligned data pointer (a storage-offset view may not be).
at::Tensor aligned16(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

// infopt::int4_tiled_linear on CUDA: x [..., K] bf16/fp16 -> [..., N] in x.dtype, weights in the
// tiled layout (int4_tiled.h). The Python op validates first; these checks guard direct calls.
at::Tensor int4_tiled_linear_cuda(const at::Tensor& x, const at::Tensor& codes,
                                  const at::Tensor& meta, int64_t n, int64_t group_size,
                                  const std::optional<at::Tensor>& bias) {
  const char* op = "infopt::int4_tiled_linear";
  TORCH_CHECK(x.is_cuda() && codes.device() == x.device() && meta.device() == x.device() &&
                  (!bias || bias->device() == x.device()),
              op, " (CUDA): x, codes, meta and bias must be on one CUDA device");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension ([..., K])");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x dtype must be bfloat16 or float16, got ", x.scalar_type());
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0 && K % 128 == 0, op, ": x.shape[-1] = K must be a multiple of 128, got ", K);
  TORCH_CHECK(group_size >= 128 && (group_size & (group_size - 1)) == 0, op,
              ": group_size must be 128 * 2**j, got ", group_size);
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  const int64_t T = (n + 15) / 16, G = (K + group_size - 1) / group_size;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(0) == T &&
                  codes.size(1) == K / 128 && codes.size(2) == 1024,
              op, ": codes must be uint8 [", T, ", ", K / 128, ", 1024], got ",
              codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 3 && meta.size(0) == T &&
                  meta.size(1) == G && meta.size(2) == 80,
              op, ": meta must be uint8 [", T, ", ", G, ", 80], got ", meta.scalar_type(), " ",
              meta.sizes());
  TORCH_CHECK(!bias || (bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == n), op,
              ": bias must be a float tensor of shape [N] = [", n, "]");

  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  at::Tensor x2 = x.reshape({-1, K});
  // The kernel reads 16-byte pieces of each row: unit stride along K and aligned rows.
  if (x2.stride(1) != 1 || (x2.size(0) > 1 && (x2.stride(0) * 2) % 16 != 0) ||
      reinterpret_cast<uintptr_t>(x2.const_data_ptr()) % 16 != 0) {
    x2 = aligned16(x2);
  }
  const at::Tensor c = aligned16(codes), mt = aligned16(meta);
  const at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t x_stride = x2.size(0) == 1 ? K : x2.stride(0);
  const cudaError_t err = infopt_int4_tiled_gemv_cuda(
      x2.const_data_ptr(), x_stride, c.const_data_ptr<uint8_t>(), mt.const_data_ptr<uint8_t>(),
      b.defined() ? b.const_data_ptr<float>() : nullptr, y.mutable_data_ptr(), x2.size(0), n, K,
      group_size, to_infopt_dtype(x.scalar_type()), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(infopt, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("int4_weight_only_linear", &int4_weight_only_linear_cuda);
  m.impl("int4_tiled_linear", &int4_tiled_linear_cuda);
}

}  // namespace infopt
