"""Paged attention kernels (cpp, triton) vs the pure-torch reference (gather + fp32 SDPA)."""

from __future__ import annotations

import pytest
import torch
from ops_utils import assert_finite

from infopt import ops
from infopt.ops import Backend, BackendUnavailableError
from infopt.ops.extensions import cpp_probe
from infopt.ops.paged_attention import _triton_probe

# fp32: kernel and oracle differ only in summation order (online softmax over pages vs SDPA);
# outputs are convex combinations of V rows (|v| ~ 1), so a few fp32 ulps of 1 bound the error:
# 1e-5 absolute leaves headroom and still catches a wrong mask or scale (errors of O(1e-2)).
# bf16/fp16: both round the same fp32 value once, which can flip one ulp: 2 * 2**-7 / 2**-10.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2 * 2**-7, "atol": 1e-5},
}
GQA = [(4, 4), (4, 2), (8, 2), (14, 2), (7, 1)]  # group sizes 1, 2, 4, 7, 7 (MQA)

requires_cpp = pytest.mark.skipif(cpp_probe("cpu") is not None, reason="cpp backend unavailable")
requires_triton_cpu = pytest.mark.skipif(
    _triton_probe("cpu") is not None, reason="triton cannot run CPU tensors here"
)


def make_batch(seq_lens, query_lens, hq, hkv, d, block_size, dtype, device="cpu", spare=3):
    """A ragged batch in a shuffled pool: each sequence's blocks are scattered, spare blocks hold
    garbage (NaN) that a correct kernel never reads."""
    blocks_per = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per) + spare
    perm = torch.randperm(num_blocks).tolist()
    max_blocks = max(blocks_per) + 1
    table = torch.full((len(seq_lens), max_blocks), num_blocks - 1, dtype=torch.int32)
    i = 0
    for b, nb in enumerate(blocks_per):
        table[b, :nb] = torch.tensor(perm[i : i + nb], dtype=torch.int32)
        i += nb
    used = set(perm[:i])
    k = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)
    v = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)
    for blk in range(num_blocks):  # unused blocks: NaN poison
        if blk not in used:
            k[blk], v[blk] = float("nan"), float("nan")
    for b, n in enumerate(seq_lens):  # slots past each length in its last block: poison too
        last, fill = table[b, blocks_per[b] - 1], n - (blocks_per[b] - 1) * block_size
        k[last, fill:], v[last, fill:] = float("nan"), float("nan")
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, d, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    dev = torch.device(device)
    return [t.to(dev) for t in (q, k, v, table, lens, qsl)]


def check(backend, seq_lens, query_lens, hq, hkv, d, bs, dtype, decode=False, device="cpu"):
    q, k, v, table, lens, qsl = make_batch(seq_lens, query_lens, hq, hkv, d, bs, dtype, device)
    scale = d**-0.5
    if decode:
        ref = ops.paged_attention_decode(q, k, v, table, lens, scale, backend="reference")
        out = ops.paged_attention_decode(q, k, v, table, lens, scale, backend=backend)
    else:
        ref = ops.paged_attention_prefill(q, k, v, table, lens, qsl, scale, backend="reference")
        out = ops.paged_attention_prefill(q, k, v, table, lens, qsl, scale, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    assert_finite(out)
    assert_finite(ref, "reference")
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


LENS = [1, 7, 17, 129]


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_cpp_matches_reference(hq, hkv, bs, dtype):
    torch.set_num_threads(1)
    check("cpp", LENS, [1] * 4, hq, hkv, 64, bs, dtype, decode=True)
    # prefill from empty (query = whole sequence) and a chunked prefill over a cached prefix
    check("cpp", LENS, LENS, hq, hkv, 64, bs, dtype)
    check("cpp", LENS, [1, 3, 17, 5], hq, hkv, 64, bs, dtype)


@requires_cpp
def test_cpp_odd_head_dim_fp16_and_empty_queries():
    torch.set_num_threads(1)
    check("cpp", [5, 33], [0, 4], 6, 3, 40, 16, torch.float32)
    q, k, v, table, lens, qsl = make_batch([9, 20], [2, 3], 4, 2, 32, 8, torch.float16)
    ref = ops.paged_attention_prefill(q, k, v, table, lens, qsl, 0.2, backend="reference")
    out = ops.paged_attention_prefill(q, k, v, table, lens, qsl, 0.2, backend="cpp")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * 2**-10, atol=1e-5)


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs,hq,hkv", [(8, 14, 2), (32, 4, 4), (16, 7, 1)])
def test_triton_matches_reference(bs, hq, hkv, dtype):
    # The interpreter costs ~ms per program per page: decode covers the long lengths, prefill
    # the short ones plus a short chunk over the 129-token prefix.
    check("triton", LENS, [1] * 4, hq, hkv, 64, bs, dtype, decode=True)
    check("triton", [1, 7, 17, 129], [1, 7, 9, 3], hq, hkv, 64, bs, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_triton_cuda_matches_reference(hq, hkv, bs, dtype):
    for d in (64, 128):
        check("triton", LENS, [1] * 4, hq, hkv, d, bs, dtype, decode=True, device="cuda")
        check("triton", LENS, LENS, hq, hkv, d, bs, dtype, device="cuda")
        check("triton", LENS, [1, 3, 17, 5], hq, hkv, d, bs, dtype, device="cuda")
    # AUTO on CUDA picks triton (no cuda kernel for this op)
    q, k, v, table, lens, _ = make_batch([5, 9], [1, 1], hq, hkv, 64, bs, dtype, "cuda")
    ref = ops.paged_attention_decode(q, k, v, table, lens, 0.125, backend="reference")
    torch.testing.assert_close(
        ops.paged_attention_decode(q, k, v, table, lens, 0.125).float(), ref.float(), **TOL[dtype]
    )


@requires_cpp
def test_opcheck_and_compile():
    q, k, v, table, lens, qsl = make_batch([3, 18], [3, 2], 4, 2, 16, 8, torch.float32)
    # NaN poison would make opcheck's own comparisons fail; use finite pools here.
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    args = (q, k, v, table, lens, qsl, 0.25)
    torch.library.opcheck(
        torch.ops.infopt.paged_attention.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    fn = torch.compile(
        lambda *a: ops.paged_attention_prefill(*a, backend="cpp"), fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(fn(*args), ops.paged_attention_prefill(*args, backend="reference"))


def test_validation_errors():
    q, k, v, table, lens, qsl = make_batch([3, 18], [3, 2], 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        ops.paged_attention_prefill(q, k, v, table.long(), lens, qsl, 0.25)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        ops.paged_attention_prefill(q[:, :3], k, v, table, lens, qsl, 0.25)
    with pytest.raises(ValueError, match="dtype must equal"):
        ops.paged_attention_prefill(q, k.double(), v.double(), table, lens, qsl, 0.25)
    with pytest.raises(ValueError, match="rows but seq_lens"):
        ops.paged_attention_decode(q, k, v, table, lens, 0.25)
    bad = table.clone()
    bad[1, 0] = 10_000
    with pytest.raises(ValueError, match="block id out of range"):
        ops.paged_attention_prefill(q, k, v, bad, lens, qsl, 0.25, backend="reference")
    if cpp_probe("cpu") is None:
        with pytest.raises(RuntimeError, match="out of range"):
            ops.paged_attention_prefill(q, k, v, bad, lens, qsl, 0.25, backend="cpp")
    with pytest.raises(BackendUnavailableError):
        ops.paged_attention_prefill(q, k, v, table, lens, qsl, 0.25, backend=Backend.CUDA)


# --- quantized caches (int8 / float8_e4m3fn with per-token, per-head fp32 scales) -------------


def quantize_batch(k, v, cache_dtype):
    """Quantize float pools; NaN scales where the float pool held NaN poison (int8 has no NaN),
    so reading an unused slot still poisons the output."""
    from infopt.kvcache.kvquant import quantize_kv

    out = []
    for x in (k, v):
        poison = x.isnan().any(-1)
        qx, sc = quantize_kv(x.nan_to_num(0.0), cache_dtype)
        sc[poison] = float("nan")
        out += [qx, sc]
    return out  # k_q, k_scale, v_q, v_scale


def check_quant(
    backend, seq_lens, query_lens, hq, hkv, d, bs, dtype, cache_dtype, decode=False, device="cpu"
):
    q, k, v, table, lens, qsl = make_batch(seq_lens, query_lens, hq, hkv, d, bs, torch.float32)
    q = q.to(dtype)
    kq, ks, vq, vs = quantize_batch(k, v, cache_dtype)
    dev = torch.device(device)
    q, kq, ks, vq, vs, table, lens, qsl = (t.to(dev) for t in (q, kq, ks, vq, vs, table, lens, qsl))
    kw = {"k_scale": ks, "v_scale": vs}
    if decode:
        ref = ops.paged_attention_decode(q, kq, vq, table, lens, d**-0.5, backend="reference", **kw)
        out = ops.paged_attention_decode(q, kq, vq, table, lens, d**-0.5, backend=backend, **kw)
    else:
        args = (q, kq, vq, table, lens, qsl, d**-0.5)
        ref = ops.paged_attention_prefill(*args, backend="reference", **kw)
        out = ops.paged_attention_prefill(*args, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert_finite(out)
    assert_finite(ref, "reference")
    # Both sides dequantize with the same fp32 product, so the fp32/bf16 tolerances still hold.
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    return ref, q, k, v, table, lens, qsl


QUANT_DTYPES = [torch.int8, torch.float8_e4m3fn]


@requires_cpp
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs,hq,hkv", [(8, 14, 2), (16, 4, 4), (32, 7, 1)])
def test_cpp_quantized_cache_matches_reference(bs, hq, hkv, dtype, cache_dtype):
    torch.set_num_threads(1)
    check_quant("cpp", LENS, [1] * 4, hq, hkv, 64, bs, dtype, cache_dtype, decode=True)
    check_quant("cpp", LENS, [1, 3, 17, 5], hq, hkv, 64, bs, dtype, cache_dtype)
    check_quant("cpp", [5, 33], [0, 4], hq, hkv, 40, bs, dtype, cache_dtype)  # odd D, empty row


@requires_triton_cpu
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("bs,hq,hkv", [(8, 14, 2), (16, 4, 4)])
def test_triton_quantized_cache_matches_reference(bs, hq, hkv, cache_dtype):
    check_quant("triton", LENS, [1] * 4, hq, hkv, 64, bs, torch.float32, cache_dtype, decode=True)
    check_quant("triton", [1, 7, 17], [1, 7, 3], hq, hkv, 40, bs, torch.bfloat16, cache_dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs,hq,hkv", [(8, 14, 2), (16, 4, 4), (32, 7, 1)])
def test_triton_cuda_quantized_cache_matches_reference(bs, hq, hkv, dtype, cache_dtype):
    for d in (64, 128):
        kw = {"device": "cuda"}
        check_quant("triton", LENS, [1] * 4, hq, hkv, d, bs, dtype, cache_dtype, True, **kw)
        check_quant("triton", LENS, [1, 3, 17, 5], hq, hkv, d, bs, dtype, cache_dtype, **kw)


@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
def test_quantized_reference_close_to_float_attention(cache_dtype):
    # The oracle itself: quantization error only (|x| ~ 1 rows, D = 64): int8 keeps ~2 decimal
    # digits per element, e4m3 ~1; attention averages them, so these bounds hold with margin.
    ref, q, k, v, table, lens, qsl = check_quant(
        "reference", LENS, [1, 3, 17, 5], 4, 2, 64, 16, torch.float32, cache_dtype
    )
    full = ops.paged_attention_prefill(q, k, v, table, lens, qsl, 0.125, backend="reference")
    err = (ref - full).abs().max().item()
    assert err < {torch.int8: 0.03, torch.float8_e4m3fn: 0.15}[cache_dtype], err


def test_quantized_validation_errors():
    q, k, v, table, lens, qsl = make_batch([3, 18], [3, 2], 4, 2, 16, 8, torch.float32)
    kq, ks, vq, vs = quantize_batch(k, v, torch.int8)
    with pytest.raises(ValueError, match="k_scale and v_scale are required"):
        ops.paged_attention_prefill(q, kq, vq, table, lens, qsl, 0.25)
    with pytest.raises(ValueError, match="k_scale and v_scale are required"):
        ops.paged_attention_prefill(q, k, v, table, lens, qsl, 0.25, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match=r"k_scale must be float32 \[num_blocks"):
        ops.paged_attention_prefill(
            q, kq, vq, table, lens, qsl, 0.25, k_scale=ks[:, :4], v_scale=vs
        )
    with pytest.raises(ValueError, match="dtype must equal"):
        ops.paged_attention_prefill(
            q, kq, vq.float(), table, lens, qsl, 0.25, k_scale=ks, v_scale=vs
        )
    with pytest.raises(TypeError, match="v_scale must be a torch.Tensor"):
        ops.paged_attention_prefill(q, kq, vq, table, lens, qsl, 0.25, k_scale=ks, v_scale=1.0)
    if cpp_probe("cpu") is None:  # the op's own checks (bypassing the Python validation)
        with pytest.raises(RuntimeError, match="k_scale and v_scale are required"):
            torch.ops.infopt.paged_attention.default(q, kq, vq, table, lens, qsl, 0.25, None, None)


@requires_cpp
def test_quantized_opcheck():
    q, k, v, table, lens, qsl = make_batch([3, 18], [3, 2], 4, 2, 16, 8, torch.float32)
    kq, ks, vq, vs = quantize_batch(k.nan_to_num(0.0), v.nan_to_num(0.0), torch.int8)
    torch.library.opcheck(
        torch.ops.infopt.paged_attention.default,
        (q, kq, vq, table, lens, qsl, 0.25, ks, vs),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
