// Element conversions shared by the CUDA kernels: load T as fp32, store fp32 as T with
// round-to-nearest-even (the rounding torch uses, so kernels match the references bit-wise).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace infopt_cuda {

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ __forceinline__ static float to_f(float v) { return v; }
  __device__ __forceinline__ static float from_f(float v) { return v; }
};
template <>
struct Cvt<__half> {
  __device__ __forceinline__ static float to_f(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ __forceinline__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace infopt_cuda
