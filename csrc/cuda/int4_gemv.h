// C interface of the CUDA int4 weight-only GEMV (int4_gemv.cu): raw pointers and a stream, no
// torch types; torch_binding.cpp is the thin adapter. Dtype codes: InfoptDType in rmsnorm.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// y[m, n] = sum_k x[m, k] * (code[n, k] - zero[n, k / gs]) * scale[n, k / gs] + bias[n]
//   x      : [M, K] in x_dtype (fp32 / fp16 / bf16); row m at x + m * x_row_stride (elements),
//            K unit-stride.
//   qweight: [N, ceil(K/2)] uint8, row-major; byte j of a row = code 2j | code 2j+1 << 4.
//   scale  : [N, G] float32, zero: [N, G] uint8, G = ceil(K / group_size), row-major.
//   bias   : [N] float32 or nullptr.
//   y      : [M, N] in x_dtype, contiguous.
// fp32 accumulation. Any M, any K and even group_size. fp16/bf16 x on sm_80+ with K % 128 == 0,
// group_size = 128 * 2^j and 16-byte aligned rows runs on tensor cores (mma.sync, 8 or 16
// activation rows per pass over the weights); otherwise a SIMT kernel (tiles of up to 8 rows),
// whose 128-bit-load path needs K % 32 == 0, group_size % 32 == 0 and 16-byte aligned rows. Returns cudaErrorInvalidValue for bad
// arguments, else the launch status; does not synchronize.
cudaError_t infopt_int4_gemv_cuda(const void* x, int64_t x_row_stride, const uint8_t* qweight,
                                  const float* scale, const uint8_t* zero, const float* bias,
                                  void* y, int64_t M, int64_t N, int64_t K, int64_t group_size,
                                  int x_dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
