// The one and only definition of the infopt:: op schemas.
//
// Every backend library (CPU here, CUDA in csrc/cuda/) only adds TORCH_LIBRARY_IMPL blocks, so the
// schemas cannot drift between backends. Fake (meta) impls live in infopt/ops/library.py.
// To add an op: one m.def(...) line here, a CPU impl in its own .cpp, a fake in library.py.

#include <torch/library.h>

TORCH_LIBRARY(infopt, m) {
  // y = weight * to(x.dtype)(x * rsqrt(mean(x^2, -1) + eps)), fp32 math; y has x's shape/dtype.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // y [M, N] = x [M, K] @ weight[N, K]^T (+ bias [N]), float32: the few rows of a decode step
  // (infopt/ops/dense.py).
  m.def("dense_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Quantized linears (semantics and packed int4 layout: infopt/ops/quant_ref.py). x [..., K]
  // float32/bfloat16/float16 -> [..., N] in x.dtype, fp32 (or exact int32) accumulation.
  //   int8 weight-only: qweight int8 [N, K], scale [N] (per output channel).
  m.def(
      "int8_weight_only_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor");
  //   int4 weight-only: qweight uint8 [N, ceil(K/2)] (low nibble = even k), scale [N, G] float,
  //   zero [N, G] uint8, G = ceil(K / group_size).
  m.def(
      "int4_weight_only_linear(Tensor x, Tensor qweight, Tensor scale, Tensor zero, int group_size,"
      " Tensor? bias) -> Tensor");
  //   int4 weights (layout as above) x int8 activations quantized on the fly per block of 32
  //   along K (symmetric, amax / 127): y = xhat @ dequant(qweight).T + bias.
  m.def(
      "int4_dynamic_linear(Tensor x, Tensor qweight, Tensor scale, Tensor zero, int group_size,"
      " Tensor? bias) -> Tensor");
  //   int4 weight-only on the tiled CUDA layout (infopt/ops/int4_tiled.py): codes uint8
  //   [ceil(N/16), K/128, 1024], meta uint8 [ceil(N/16), G, 80]; CUDA impl only.
  m.def(
      "int4_tiled_linear(Tensor x, Tensor codes, Tensor meta, int n, int group_size, Tensor? bias)"
      " -> Tensor");
  //   w8a8: dynamic per-token symmetric int8 activations x int8 weights, exact int32 accumulation.
  m.def("int8_dynamic_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor");
  // Paged attention (layouts and semantics: infopt/ops/paged_attention.py): packed varlen q
  // [N, Hq, D], k/v_cache [num_blocks, block_size, Hkv, D], block_tables int32 [B, max_blocks],
  // seq_lens int32 [B], query_start_loc int32 [B + 1]; causal, GQA; -> [N, Hq, D] in q.dtype.
  // int8 / float8_e4m3fn caches take k/v_scale float32 [num_blocks, block_size, Hkv].
  // window (>= 1): query at position p sees keys p - window < j <= p only; softcap (> 0): scores
  // become softcap * tanh(scale * q.k / softcap) before the softmax.
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables,"
      " Tensor seq_lens, Tensor query_start_loc, float scale, Tensor? k_scale=None,"
      " Tensor? v_scale=None, int? window=None, float? softcap=None) -> Tensor");
}
