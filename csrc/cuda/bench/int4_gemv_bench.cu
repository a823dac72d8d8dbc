// Standalone GPU benchmark of the int4 GEMVs (int4_gemv.cu, int4_tiled.cu) against cuBLAS bf16,
// torch-free.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 csrc/cuda/bench/int4_gemv_bench.cu csrc/cuda/int4_tiled.cu \
//        -o /tmp/int4_bench -lcublas
//   /tmp/int4_bench [KxN ...]      # INFOPT_BENCH_WARMUP_MS=1000: busy GPU first
//
// It includes int4_gemv.cu, so besides its public launcher (the row-major layout's dispatch) it
// can time that tensor-core kernel at other (warps, unroll) choices; "tiled" is the public
// launcher of int4_tiled.cu on weights repacked here into its layout (int4_tiled.h). Every call uses another copy of the
// weights (512 MiB in rotation, 10x the H100's L2), so weights stream from HBM as in decode.
// Timing: CUDA events around a CUDA-graph replay of 100 calls, median of 15 replays. Before
// timing, each kernel's output is checked against a float64 host reference (relative L2 error).
// Also prints two floors: an empty kernel in a graph, and a plain streaming read of as many
// bytes as the int4 weights + scales + zero points. Figures: docs/results.md.
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "../int4_gemv.cu"
#include "../int4_tiled.h"

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
const Variant kVariants[] = {{"row-major", shipped}, {"w8u4", tc<8, 4>}};

// The layout of int4_tiled.h from row-major codes / scales / zeros (zero padding rows).
void tile_host(const std::vector<uint8_t>& q, const std::vector<float>& s,
               const std::vector<uint8_t>& z, int64_t N, int64_t K, int64_t G,
               std::vector<uint8_t>& codes, std::vector<uint8_t>& meta) {
  const int64_t T = (N + 15) / 16, S = K / 128;
  const int p[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  codes.assign(T * S * 1024, 0);
  meta.assign(T * G * 80, 0);
  auto code = [&](int64_t row, int64_t k) {
    return row < N ? (q[row * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF : 0;
  };
  for (int64_t t = 0; t < T; ++t)
    for (int64_t st = 0; st < S; ++st)
      for (int h = 0; h < 2; ++h)
        for (int g = 0; g < 8; ++g)
          for (int c = 0; c < 4; ++c)
            for (int j = 0; j < 4; ++j)
              for (int b = 0; b < 4; ++b) {
                const int64_t row = 16 * t + g + 8 * h, k0 = 128 * st + 32 * c + 8 * j;
                codes[(t * S + st) * 1024 + 512 * h + 16 * (4 * g + c) + 4 * j + b] =
                    static_cast<uint8_t>(code(row, k0 + p[2 * b]) |
                                         code(row, k0 + p[2 * b + 1]) << 4);
              }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t gr = 0; gr < G; ++gr)
      for (int g = 0; g < 8; ++g)
        for (int h = 0; h < 2; ++h) {
          const int64_t row = 16 * t + g + 8 * h;
          uint8_t* m = meta.data() + (t * G + gr) * 80;
          const float sc = row < N ? s[row * G + gr] : 0.f;
          memcpy(m + 8 * g + 4 * h, &sc, 4);
          m[64 + 2 * g + h] = row < N ? z[row * G + gr] : 0;
        }
}

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

int main(int argc, char** argv) {
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

  // Optional warm-up (INFOPT_BENCH_WARMUP_MS): keep the GPU busy with bf16 GEMMs first, so the
  // timings start at the clocks of a GPU that has been decoding for a while, not from idle.
  const char* wu = getenv("INFOPT_BENCH_WARMUP_MS");
  if (wu != nullptr && atoi(wu) > 0) {
    __nv_bfloat16 *a, *b, *c;
    CK(cudaMalloc(&a, 4096 * 4096 * 2));
    CK(cudaMalloc(&b, 64 * 4096 * 2));
    CK(cudaMalloc(&c, 64 * 4096 * 2));
    CK(cudaMemset(a, 0, 4096 * 4096 * 2));
    CK(cudaMemset(b, 0, 64 * 4096 * 2));
    const float one = 1.f, zero_f = 0.f;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventRecord(e0, st));
    float ms = 0.f;
    while (ms < atoi(wu)) {
      for (int i = 0; i < 200; ++i)
        CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, 4096, 64, 4096, &one, a, CUDA_R_16BF, 4096,
                        b, CUDA_R_16BF, 4096, &zero_f, c, CUDA_R_16BF, 4096, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT));
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      CK(cudaEventElapsedTime(&ms, e0, e1));
    }
    printf("warm-up: %.0f ms of bf16 GEMMs\n", ms);
    CK(cudaFree(a));
    CK(cudaFree(b));
    CK(cudaFree(c));
  }
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

  // Shapes "KxN" from the command line, else these.
  std::vector<std::pair<int64_t, int64_t>> shapes = {
      {4096, 4096}, {4096, 11008}, {11008, 4096}, {1536, 8960}, {8960, 1536}};
  if (argc > 1) {
    shapes.clear();
    for (int i = 1; i < argc; ++i) {
      long long k = 0, n = 0;
      if (sscanf(argv[i], "%lldx%lld", &k, &n) != 2 || k <= 0 || n <= 0) {
        printf("bad shape %s (want KxN)\n", argv[i]);
        return 2;
      }
      shapes.emplace_back(k, n);
    }
  }
  const int64_t gs = 128;
  std::mt19937 rng(0);
  printf("K x N        M | cuBLAS bf16 us | int4 variants: us (speed-up vs cuBLAS) [rel. error]\n");
  for (const auto& sh : shapes) {
    const int64_t K = sh.first, N = sh.second, G = (K + gs - 1) / gs;
    const size_t wb = N * K / 2, sb = N * G * 4, zb = N * G;
    const int c4 = static_cast<int>(std::max<size_t>(2, kRotate / (wb + sb + zb)));
    const int c16 = static_cast<int>(std::max<size_t>(2, kRotate / (N * K * 2)));
    std::vector<uint8_t> hq(wb), hz(zb);
    std::vector<float> hs(N * G);
    for (auto& v : hq) v = rng() & 0xFF;
    for (auto& v : hz) v = rng() & 0xF;
    for (auto& v : hs) v = 1e-3f + (rng() % 1000) * 1e-5f;
    std::vector<uint8_t> htc, htm;
    tile_host(hq, hs, hz, N, K, G, htc, htm);
    std::vector<uint8_t*> q(c4), z(c4), tc(c4), tm(c4);
    std::vector<float*> s(c4);
    for (int i = 0; i < c4; ++i) {  // same values in every copy: the reference fits all
      CK(cudaMalloc(&q[i], wb));
      CK(cudaMalloc(&s[i], sb));
      CK(cudaMalloc(&z[i], zb));
      CK(cudaMemcpy(q[i], hq.data(), wb, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(s[i], hs.data(), sb, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(z[i], hz.data(), zb, cudaMemcpyHostToDevice));
      CK(cudaMalloc(&tc[i], htc.size()));
      CK(cudaMalloc(&tm[i], htm.size()));
      CK(cudaMemcpy(tc[i], htc.data(), htc.size(), cudaMemcpyHostToDevice));
      CK(cudaMemcpy(tm[i], htm.data(), htm.size(), cudaMemcpyHostToDevice));
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
      {  // the tiled layout's public launcher
        auto run = [&](int i) {
          return infopt_int4_tiled_gemv_cuda(x, K, tc[i % c4], tm[i % c4], nullptr, y, M, N, K,
                                             gs, INFOPT_BFLOAT16, st);
        };
        CK(cudaMemset(y, 0xFF, M * N * 2));
        CK(run(0));
        CK(cudaStreamSynchronize(st));
        std::vector<__nv_bfloat16> got(M * N);
        CK(cudaMemcpy(got.data(), y, M * N * 2, cudaMemcpyDeviceToHost));
        double err2 = 0.0;
        for (size_t i = 0; i < got.size(); ++i) err2 += std::pow(bf(got[i]) - ref[i], 2);
        const double rel = std::sqrt(err2 / ref2);
        const float t = time_graph([&](int i) { CK(run(i)); }, st);
        printf(" tiled %.2f (%.2fx) [%.0e]%s", t, tb / t, rel, rel < 1e-2 ? "" : " WRONG");
      }
      printf("\n");
      CK(cudaFree(x));
      CK(cudaFree(y));
    }
    for (int i = 0; i < c4; ++i) {
      CK(cudaFree(q[i]));
      CK(cudaFree(s[i]));
      CK(cudaFree(z[i]));
      CK(cudaFree(tc[i]));
      CK(cudaFree(tm[i]));
    }
    for (auto& p : w16) CK(cudaFree(p));
  }
  return 0;
}
