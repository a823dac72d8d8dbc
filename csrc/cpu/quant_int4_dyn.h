// Shared by quant_int4_dyn.cpp (the ops, activation quantization, AVX-512 VNNI tiles) and
// quant_int4_dyn_avx2.cpp (the AVX2 tiles): the activation layout and the tiles' arguments.
// See quant_int4_dyn.cpp for the math.
#pragma once

#include "quant_common.h"

namespace infopt {
namespace dyn {

constexpr int64_t kBlock = 32;   // activation quantization block along K
constexpr int64_t kChunk = 128;  // k per decode step of a row: 64 packed bytes

// Limbs: x ~= s1 q1 + s2 q2 + s3 q3 per block, s2 = s1 / 128, s3 = s2 / 128 (exact powers of
// two; each residual is at most half the previous step, so |q2|, |q3| <= 64). One limb is the
// int8 rounding of int4_dynamic_linear; three represent x to ~2^-22 of its block maximum, about
// an fp32 sum's precision, which is how int4_weight_only_linear uses the same kernel. The ratio
// 128 lets the kernel merge the limbs in integers, D = (d1 * 128 + d2) * 128 + d3 = sum code *
// (16384 q1 + 128 q2 + q3) (< 2^28 per lane: 8 products of at most 15 * 127 * 16513), scaled
// once by s3: a third of the float work of three separately scaled dot products.
constexpr int kMaxLimbs = 3;

struct DynArgs {
  const int8_t* xq;  // [L, M, C * 128] codes, per chunk [64 even k | 64 odd k], zero padded
  const float* xs;   // [M, C, 16] lane scales of the last limb: lane i of chunk c = block 4c + i / 4
  const float* xsum; // [M, C, 16] per-lane sums of the merged codes (for the zero points)
  int64_t C;         // chunks per row: ceil(K / 128)
  const uint8_t* w;  // [N, kb] packed codes
  const float* s;    // [N, G]
  const uint8_t* z;  // [N, G]
  const float* b;    // [N] or nullptr
  float* y;          // [M, N] fp32
  int64_t M, N, K, G, gs, kb;
  int L;             // activation limbs: 1 or kMaxLimbs
};

#if defined(__x86_64__)
// AVX2 + FMA (quant_int4_dyn_avx2.cpp); the caller checks quant::cpu_isa() >= kAvx2.

// Row xr [K] -> L limbs of codes (limb l at qr + l * limb_stride, [nb * 32] each, per chunk
// [64 even | 64 odd] if `permuted`, else natural k order) and the nb block scales of limb 1.
void quantize_row_avx2(const float* xr, int64_t K, int64_t nb, bool permuted, int8_t* qr,
                       float* bs, int L, int64_t limb_stride);
// Per-lane sums of the merged codes of every row and chunk: out [M, C, 16].
void lane_sums_avx2(const int8_t* xq, int64_t M, int64_t C, int L, float* out);
// Rows [n_begin, n_end) of y, all M activation rows.
void dyn_range_avx2(const DynArgs& a, int64_t n_begin, int64_t n_end);
// True if no element of x[0, n) is NaN or +-inf.
bool all_finite_avx2(const float* x, int64_t n);
#endif

}  // namespace dyn
}  // namespace infopt
