// C interface of the CUDA RMSNorm kernel: raw pointers and a stream, no torch types, so the .cu
// builds with plain nvcc and the torch binding (torch_binding.cpp) stays a thin adapter.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// Element types understood by the launchers (values are part of the C ABI; keep them stable).
enum InfoptDType { INFOPT_FLOAT32 = 0, INFOPT_FLOAT16 = 1, INFOPT_BFLOAT16 = 2 };

// y[r, :] = w * to_xdtype(x[r, :] * rsqrt(mean(x[r, :]^2) + eps)), fp32 math, for r < rows.
//   x, y    : [rows, hidden] in x_dtype; row r starts at x + r * x_row_stride (elements), and the
//             hidden dim is unit-stride. y likewise with y_row_stride.
//   weight  : [hidden], w_dtype == x_dtype or INFOPT_FLOAT32.
// Returns cudaErrorInvalidValue for unsupported dtype combos / negative sizes, else the launch
// status (cudaGetLastError); it does not synchronize.
cudaError_t infopt_rms_norm_cuda(const void* x, const void* weight, void* y, int64_t rows,
                                 int64_t hidden, int64_t x_row_stride, int64_t y_row_stride,
                                 float eps, int x_dtype, int w_dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
