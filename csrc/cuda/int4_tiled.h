// C interface of the CUDA int4 GEMV on the tiled weight layout (int4_tiled.cu): raw pointers and
// a stream, no torch types; torch_binding.cpp is the thin adapter. Dtype codes: rmsnorm.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// y[m, n] = sum_k x[m, k] * (code[n, k] - zero[n, k / gs]) * scale[n, k / gs] + bias[n], with the
// weights in the tiled layout of infopt/ops/int4_tiled.py (T = ceil(N / 16), S = K / 128,
// G = K / gs):
//   codes: [T, S, 1024] uint8. Chunk (t, s) holds rows 16t .. 16t + 15, k = 128s .. 128s + 127:
//          byte 512 h + 16 (4 g + c) + 4 j + b holds, for row 16t + g + 8h, the codes of
//          k = 128s + 32c + 8j + p(2b) (low nibble) and p(2b + 1) (high nibble), where
//          p = (0, 2, 4, 6, 1, 3, 5, 7): extracting (word >> 4i) & 0x000F000F then yields codes
//          (k0 + 2i, k0 + 2i + 1), the pair an mma B fragment holds. Rows >= N are zero.
//   meta : [T, G, 80] uint8. Bytes 8g .. 8g + 7: float32 scale of rows 16t + g and 16t + g + 8;
//          bytes 64 + 2g, 65 + 2g: uint8 zero of the same two rows.
//   x    : [M, K] fp16 / bf16, row m at x + m * x_row_stride (elements), 16-byte aligned rows.
//   bias : [N] float32 or nullptr; y: [M, N] in x's dtype, contiguous.
// Needs sm_80+, K % 128 == 0, gs = 128 * 2^j, 16-byte aligned codes / meta / x rows. Returns
// cudaErrorInvalidValue for arguments it cannot take, cudaErrorNotSupported before sm_80, else
// the launch status; does not synchronize.
cudaError_t infopt_int4_tiled_gemv_cuda(const void* x, int64_t x_row_stride,
                                        const uint8_t* codes, const uint8_t* meta,
                                        const float* bias, void* y, int64_t M, int64_t N,
                                        int64_t K, int64_t group_size, int x_dtype,
                                        cudaStream_t stream);

#ifdef __cplusplus
}
#endif
