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
// fp32 accumulation. Any M (tiles of up to 8 rows share one pass over the weights), any K and
// even group_size; the 128-bit-load path needs K % 32 == 0, group_size % 32 == 0 and 16-byte
// aligned rows, other shapes take a byte-wise path. Returns cudaErrorInvalidValue for bad
// arguments, else the launch status; does not synchronize.
cudaError_t infopt_int4_gemv_cuda(const void* x, int64_t x_row_stride, const uint8_t* qweight,
                                  const float* scale, const uint8_t* zero, const float* bias,
                                  void* y, int64_t M, int64_t N, int64_t K, int64_t group_size,
                                  int x_dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
