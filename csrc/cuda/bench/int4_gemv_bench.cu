// Standalone GPU benchmark of the int4 GEMV (int4_gemv.cu) against cuBLAS bf16, torch-free.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 csrc/cuda/bench/int4_gemv_bench.cu -o /tmp/int4_bench -lcublas
//   /tmp/int4_bench
//
// It includes int4_gemv.cu, so besides the public launcher (the shipped dispatch) it can time
// the tensor-core kernel at other (warps, unroll) choices. Every call uses another copy of the
// weights (512 MiB in rotation, 10x the H100's L2), so weights stream from HBM as in decode.
// Timing: CUDA events around a CUDA-graph replay of 100 calls, median of 15 replays. Before
// timing, each kernel's output is checked against a float64 host reference (relative L2 error).
// Also prints two floors: an empty kernel in a graph, and a plain streaming read of as many
// bytes as the int4 weights + scales + zero points. Figures: docs/ops.md.
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../int4_gemv.cu"

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      printf("CUDA error %s at line %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); \
      exit(1);                                                                         \
    }                                                                                  \
  } while (0)
#define CB(x)                                                         \
  do {                                                                \
    if ((x) != CUBLAS_STATUS_SUCCESS) {                               \
      printf("cuBLAS error %s at line %d\n", #x, __LINE__);           \
      exit(1);                                                        \
    }                                                                 \
  } while (0)

namespace {

template <int W, int U>
cudaError_t tc(const void* x, const uint8_t* q, const float* s, const uint8_t* z, void* y,
               int64_t M, int64_t N, int64_t K, int64_t gs, cudaStream_t st) {
  if (M <= 8) return launch_mma<__nv_bfloat16, 1, W, U>(x, K, q, s, z, nullptr, y, M, N, K, gs, st);
  return launch_mma<__nv_bfloat16, 2, W, U>(x, K, q, s, z, nullptr, y, M, N, K, gs, st);
}
cudaError_t shipped(const void* x, const uint8_t* q, const float* s, const uint8_t* z, void* y,
                    int64_t M, int64_t N, int64_t K, int64_t gs, cudaStream_t st) {
  return infopt_int4_gemv_cuda(x, K, q, s, z, nullptr, y, M, N, K, gs, INFOPT_BFLOAT16, st);
}
using Fn = cudaError_t (*)(const void*, const uint8_t*, const float*, const uint8_t*, void*,
                           int64_t, int64_t, int64_t, int64_t, cudaStream_t);
struct Variant {
  const char* name;
  Fn fn;
};
const Variant kVariants[] = {
    {"shipped", shipped}, {"w16u1", tc<16, 1>}, {"w8u1", tc<8, 1>},
    {"w8u4", tc<8, 4>},   {"w4u4", tc<4, 4>},   {"w16u2", tc<16, 2>},
};

__global__ void empty_kernel() {}

// Streaming read of n16 16-byte words, 4 loads in flight per thread.
__global__ void read_kernel(const uint4* p, int64_t n16, int* out) {
  uint32_t acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n16;
       i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      v[u] = i + u * stride < n16 ? __ldcs(p + i + u * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) out[0] = 1;  // keeps the loads
}

// Median microseconds per call of f(i), i = call index, over a CUDA-graph replay of `calls`.
template <class F>
float time_graph(F f, cudaStream_t st, int calls = 100, int rounds = 15) {
  for (int i = 0; i < 3; ++i) f(i);
  CK(cudaStreamSynchronize(st));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < calls; ++i) f(i);
  CK(cudaStreamEndCapture(st, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  CK(cudaGraphLaunch(ge, st));
  CK(cudaStreamSynchronize(st));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> us;
  for (int r = 0; r < rounds; ++r) {
    CK(cudaEventRecord(a, st));
    CK(cudaGraphLaunch(ge, st));
    CK(cudaEventRecord(b, st));
    CK(cudaEventSynchronize(b));
    float ms = 0.f;
    CK(cudaEventElapsedTime(&ms, a, b));
    us.push_back(ms * 1e3f / calls);
  }
  std::sort(us.begin(), us.end());
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  return us[us.size() / 2];
}

float bf(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cublasHandle_t h;
  CB(cublasCreate(&h));
  CB(cublasSetStream(h, st));
  void* ws;
  CK(cudaMalloc(&ws, 64 << 20));
  CB(cublasSetWorkspace(h, ws, 64 << 20));
  const size_t kRotate = size_t{512} << 20;
  int* sink;
  CK(cudaMalloc(&sink, 4));

  printf("floor: empty kernel in a graph: %.2f us\n",
         time_graph([&](int) { empty_kernel<<<256, 256, 0, st>>>(); }, st));
  for (size_t bytes : {size_t{9050000}, size_t{33554432}}) {
    const int copies = static_cast<int>(std::max<size_t>(2, kRotate / bytes));
    std::vector<uint4*> bufs(copies);
    for (auto& p : bufs) {
      CK(cudaMalloc(&p, bytes));
      CK(cudaMemset(p, 1, bytes));
    }
    const float t = time_graph(
        [&](int i) { read_kernel<<<528, 256, 0, st>>>(bufs[i % copies], bytes / 16, sink); }, st);
    printf("floor: streaming read of %.1f MB: %.2f us = %.0f GB/s\n", bytes / 1e6, t,
           bytes / t / 1e3);
    for (auto& p : bufs) CK(cudaFree(p));
  }

  const int64_t shapes[][2] = {{4096, 4096}, {4096, 11008}, {11008, 4096}, {1536, 8960},
                               {8960, 1536}};
  const int64_t gs = 128;
  std::mt19937 rng(0);
  printf("K x N        M | cuBLAS bf16 us | int4 variants: us (speed-up vs cuBLAS) [rel. error]\n");
  for (const auto& sh : shapes) {
    const int64_t K = sh[0], N = sh[1], G = K / gs;
    const size_t wb = N * K / 2, sb = N * G * 4, zb = N * G;
    const int c4 = static_cast<int>(std::max<size_t>(2, kRotate / (wb + sb + zb)));
    const int c16 = static_cast<int>(std::max<size_t>(2, kRotate / (N * K * 2)));
    std::vector<uint8_t> hq(wb), hz(zb);
    std::vector<float> hs(N * G);
    for (auto& v : hq) v = rng() & 0xFF;
    for (auto& v : hz) v = rng() & 0xF;
    for (auto& v : hs) v = 1e-3f + (rng() % 1000) * 1e-5f;
    std::vector<uint8_t*> q(c4), z(c4);
    std::vector<float*> s(c4);
    for (int i = 0; i < c4; ++i) {  // same values in every copy: the reference fits all
      CK(cudaMalloc(&q[i], wb));
      CK(cudaMalloc(&s[i], sb));
      CK(cudaMalloc(&z[i], zb));
      CK(cudaMemcpy(q[i], hq.data(), wb, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(s[i], hs.data(), sb, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(z[i], hz.data(), zb, cudaMemcpyHostToDevice));
    }
    std::vector<__nv_bfloat16> hw(N * K);
    for (auto& v : hw) v = __float2bfloat16_rn(((int)(rng() % 2001) - 1000) * 2e-5f);
    std::vector<__nv_bfloat16*> w16(c16);
    for (auto& p : w16) {
      CK(cudaMalloc(&p, N * K * 2));
      CK(cudaMemcpy(p, hw.data(), N * K * 2, cudaMemcpyHostToDevice));
    }
    for (int M : {1, 4, 16}) {
      std::vector<__nv_bfloat16> hx(M * K);
      for (auto& v : hx) v = __float2bfloat16_rn(((int)(rng() % 2001) - 1000) * 1e-3f);
      std::vector<double> ref(M * N, 0.0);  // float64 reference of the int4 product
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
          const int code = (hq[n * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF;
          const double wv = (code - static_cast<double>(hz[n * G + k / gs])) * hs[n * G + k / gs];
          for (int m = 0; m < M; ++m) ref[m * N + n] += wv * bf(hx[m * K + k]);
        }
      double ref2 = 0.0;
      for (double v : ref) ref2 += v * v;
      __nv_bfloat16 *x, *y;
      CK(cudaMalloc(&x, M * K * 2));
      CK(cudaMalloc(&y, M * N * 2));
      CK(cudaMemcpy(x, hx.data(), M * K * 2, cudaMemcpyHostToDevice));
      const float one = 1.f, zero_f = 0.f;
      const float tb = time_graph(
          [&](int i) {
            CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w16[i % c16], CUDA_R_16BF,
                            K, x, CUDA_R_16BF, K, &zero_f, y, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
          },
          st);
      printf("%5ldx%-6ld %2d | %8.2f       |", K, N, M, tb);
      for (const auto& v : kVariants) {
        CK(cudaMemset(y, 0xFF, M * N * 2));  // NaN poison: an unwritten output fails the check
        CK(v.fn(x, q[0], s[0], z[0], y, M, N, K, gs, st));
        CK(cudaStreamSynchronize(st));
        std::vector<__nv_bfloat16> got(M * N);
        CK(cudaMemcpy(got.data(), y, M * N * 2, cudaMemcpyDeviceToHost));
        double err2 = 0.0;
        for (size_t i = 0; i < got.size(); ++i) err2 += std::pow(bf(got[i]) - ref[i], 2);
        const double rel = std::sqrt(err2 / ref2);  // NaN if any output is NaN
        const float t = time_graph(
            [&](int i) { CK(v.fn(x, q[i % c4], s[i % c4], z[i % c4], y, M, N, K, gs, st)); }, st);
        printf(" %s %.2f (%.2fx) [%.0e]%s", v.name, t, tb / t, rel,
               rel < 1e-2 ? "" : " WRONG");
      }
      printf("\n");
      CK(cudaFree(x));
      CK(cudaFree(y));
    }
    for (int i = 0; i < c4; ++i) {
      CK(cudaFree(q[i]));
      CK(cudaFree(s[i]));
      CK(cudaFree(z[i]));
    }
    for (auto& p : w16) CK(cudaFree(p));
  }
  return 0;
}
