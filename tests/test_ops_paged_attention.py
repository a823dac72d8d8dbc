"""Paged attention kernels (cpp, triton) vs the pure-torch reference (gather + fp32 SDPA)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
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
    torch.float16: {"rtol": 2 * 2**-10, "atol": 1e-5},
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


def check(
    backend,
    seq_lens,
    query_lens,
    hq,
    hkv,
    d,
    bs,
    dtype,
    decode=False,
    device="cpu",
    window=None,
    softcap=None,
):
    q, k, v, table, lens, qsl = make_batch(seq_lens, query_lens, hq, hkv, d, bs, dtype, device)
    scale = d**-0.5
    kw = {"window": window, "softcap": softcap}
    if decode:
        ref = ops.paged_attention_decode(q, k, v, table, lens, scale, backend="reference", **kw)
        out = ops.paged_attention_decode(q, k, v, table, lens, scale, backend=backend, **kw)
    else:
        args = (q, k, v, table, lens, qsl, scale)
        ref = ops.paged_attention_prefill(*args, backend="reference", **kw)
        out = ops.paged_attention_prefill(*args, backend=backend, **kw)
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
    backend,
    seq_lens,
    query_lens,
    hq,
    hkv,
    d,
    bs,
    dtype,
    cache_dtype,
    decode=False,
    device="cpu",
    window=None,
    softcap=None,
):
    q, k, v, table, lens, qsl = make_batch(seq_lens, query_lens, hq, hkv, d, bs, torch.float32)
    q = q.to(dtype)
    kq, ks, vq, vs = quantize_batch(k, v, cache_dtype)
    dev = torch.device(device)
    q, kq, ks, vq, vs, table, lens, qsl = (t.to(dev) for t in (q, kq, ks, vq, vs, table, lens, qsl))
    kw = {"k_scale": ks, "v_scale": vs, "window": window, "softcap": softcap}
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


# --- sliding window and logit soft-capping ----------------------------------------------------

# Window sizes relative to the block size (resolved per test): 1 (only itself), a few keys, one
# short of / exactly / one past a block, and longer than every sequence (= no window).
WINDOWS = [None, 1, 3, "bs-1", "bs", "bs+1", 1000]
# Strong (scores ~ N(0, 1) get squashed into (-1.5, 1.5)) and Gemma 2's 50 (barely active).
SOFTCAPS = [None, 1.5, 50.0]
# Odd lengths; decode (n = 1) mixed with prefill chunks, a whole-sequence prefill and long ones.
W_LENS = [1, 7, 19, 33]
W_QLENS = [[1, 7, 5, 1], [1, 3, 19, 33]]


def resolve_window(spec, bs):
    return {"bs-1": bs - 1, "bs": bs, "bs+1": bs + 1}.get(spec, spec)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("bs,hq,hkv", [(8, 8, 2), (16, 7, 1), (8, 4, 4)])
def test_cpp_window_matches_reference(bs, hq, hkv, window, dtype):
    torch.set_num_threads(1)
    kw = {"window": resolve_window(window, bs)}
    check("cpp", W_LENS, [1] * 4, hq, hkv, 64, bs, dtype, decode=True, **kw)
    for qlens in W_QLENS:
        check("cpp", W_LENS, qlens, hq, hkv, 64, bs, dtype, **kw)
    check("cpp", [5, 33, 40], [0, 4, 9], hq, hkv, 40, bs, dtype, **kw)  # odd D, empty row


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", SOFTCAPS[1:])
@pytest.mark.parametrize("window", [None, 1, "bs-1", "bs+1"])
def test_cpp_softcap_matches_reference(window, softcap, dtype):
    torch.set_num_threads(1)
    kw = {"window": resolve_window(window, 8), "softcap": softcap}
    check("cpp", W_LENS, [1] * 4, 8, 2, 64, 8, dtype, decode=True, **kw)
    check("cpp", W_LENS, W_QLENS[1], 8, 2, 64, 8, dtype, **kw)
    check("cpp", [5, 33, 40], [0, 4, 9], 7, 1, 40, 16, dtype, **kw)


@requires_cpp
def test_cpp_window_multithreaded():
    # Tiles of one sequence land on different threads; each starts at its own first page.
    torch.set_num_threads(2)
    try:
        check("cpp", [129, 200], [129, 64], 8, 2, 64, 16, torch.float32, window=37, softcap=1.5)
    finally:
        torch.set_num_threads(1)


@requires_triton_cpu
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("bs,hq,hkv,dtype", [(8, 8, 2, torch.float32), (16, 7, 1, torch.bfloat16)])
def test_triton_window_matches_reference(bs, hq, hkv, dtype, window):
    kw = {"window": resolve_window(window, bs)}
    check("triton", W_LENS, [1] * 4, hq, hkv, 64, bs, dtype, decode=True, **kw)
    check("triton", W_LENS, W_QLENS[0], hq, hkv, 40, bs, dtype, **kw)


@requires_triton_cpu
@pytest.mark.parametrize("softcap", SOFTCAPS[1:])
@pytest.mark.parametrize("window", [None, 3, "bs+1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_softcap_matches_reference(window, softcap, dtype):
    kw = {"window": resolve_window(window, 8), "softcap": softcap}
    check("triton", W_LENS, [1] * 4, 4, 2, 64, 8, dtype, decode=True, **kw)
    check("triton", W_LENS, W_QLENS[0], 4, 2, 40, 8, dtype, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs,hq,hkv", [(8, 14, 2), (16, 4, 4), (32, 7, 1)])
def test_triton_cuda_window_matches_reference(bs, hq, hkv, dtype, window, softcap):
    kw = {"window": resolve_window(window, bs), "softcap": softcap, "device": "cuda"}
    for d in (64, 128):
        check("triton", LENS, [1] * 4, hq, hkv, d, bs, dtype, decode=True, **kw)
        check("triton", LENS, LENS, hq, hkv, d, bs, dtype, **kw)
        check("triton", LENS, [1, 3, 17, 5], hq, hkv, d, bs, dtype, **kw)


@requires_cpp
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 3, "bs-1", "bs", "bs+1", 1000])
def test_cpp_window_quantized_cache_matches_reference(window, dtype, cache_dtype):
    torch.set_num_threads(1)
    kw = {"window": resolve_window(window, 8), "softcap": 1.5 if window == 3 else None}
    check_quant("cpp", W_LENS, [1] * 4, 8, 2, 64, 8, dtype, cache_dtype, decode=True, **kw)
    check_quant("cpp", W_LENS, W_QLENS[1], 8, 2, 64, 8, dtype, cache_dtype, **kw)


@requires_triton_cpu
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("window", [1, "bs", "bs+1"])
def test_triton_window_quantized_cache_matches_reference(window, cache_dtype):
    kw = {"window": resolve_window(window, 8), "softcap": 1.5 if window == "bs" else None}
    check_quant("triton", W_LENS, [1] * 4, 4, 2, 64, 8, torch.float32, cache_dtype, True, **kw)
    check_quant("triton", W_LENS, W_QLENS[0], 4, 2, 40, 8, torch.bfloat16, cache_dtype, **kw)


def _backends():
    out = ["reference"]
    if cpp_probe("cpu") is None:
        out.append("cpp")
    if _triton_probe("cpu") is None:
        out.append("triton")
    return out


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("window", [1, 3, 8, 9])
def test_window_never_reads_blocks_before_it(window, decode, quant):
    # Blocks wholly before each sequence's earliest window start may be freed and reused: their
    # table entries get an out-of-range id (-1 or num_blocks + 7: reading them would fail or
    # crash) or a valid block full of NaN (reading it poisons the output). Every backend must
    # still give the answer computed on the intact table.
    bs, seq_lens = 8, [19, 33, 40, 9]
    query_lens = [1] * 4 if decode else [1, 2, 9, 3]
    q, k, v, table, lens, qsl = make_batch(seq_lens, query_lens, 8, 2, 32, bs, torch.float32)
    kw = {"window": window, "softcap": 1.5 if window == 3 else None}
    if quant:
        kq, ks, vq, vs = quantize_batch(k, v, torch.int8)
        k, v = kq, vq
        kw |= {"k_scale": ks, "v_scale": vs}

    def run(tbl, backend):
        if decode:
            return ops.paged_attention_decode(q, k, v, tbl, lens, 0.2, backend=backend, **kw)
        return ops.paged_attention_prefill(q, k, v, tbl, lens, qsl, 0.2, backend=backend, **kw)

    want = run(table, "reference")
    assert_finite(want, "reference")
    bad = table.clone()
    poison = torch.full_like(table, 10**9)  # the NaN block each entry may point to
    hidden = 0
    num_blocks = k.shape[0]
    for b, (n, qn) in enumerate(zip(seq_lens, query_lens, strict=True)):
        first = max(0, n - qn - window + 1) // bs
        for p in range(first):
            blk = int(table[b, p])
            hidden += 1
            kind = (b + p) % 3
            if kind == 0:
                bad[b, p] = -1
            elif kind == 1:
                bad[b, p] = num_blocks + 7
            else:  # keep the id, poison the block (it was "reused")
                poison[b, p] = blk
    assert hidden >= 4  # the test hides blocks in every configuration
    k, v = k.clone(), v.clone()
    for blk in poison[poison < num_blocks].tolist():
        if quant:
            kw["k_scale"][blk] = float("nan")
            kw["v_scale"][blk] = float("nan")
        else:
            k[blk], v[blk] = float("nan"), float("nan")
    for backend in _backends():
        got = run(bad, backend)
        assert_finite(got, backend)
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("window", [1, 2, 5, 8, 13, 100])
def test_reference_window_matches_dense_hf_mask(window, softcap):
    # The oracle itself vs a dense attention with HF's sliding-window causal mask (and, with a
    # softcap, HF's eager Gemma 2 attention): one sequence's keys laid out contiguously.
    masking = pytest.importorskip("transformers.masking_utils")
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    hq, hkv, d, bs, scale = 6, 2, 16, 4, 0.3
    for length, n in ((1, 1), (23, 1), (23, 23), (30, 11)):
        q, k, v, table, lens, qsl = make_batch([length], [n], hq, hkv, d, bs, torch.float32)
        got = ops.paged_attention_prefill(
            q, k, v, table, lens, qsl, scale, window=window, softcap=softcap, backend="reference"
        )
        nb = -(-length // bs)
        kd = k[table[0, :nb].long()].reshape(-1, hkv, d)[:length].transpose(0, 1)[None]
        vd = v[table[0, :nb].long()].reshape(-1, hkv, d)[:length].transpose(0, 1)[None]
        qd = q.transpose(0, 1)[None]  # [1, Hq, n, D]
        mask_fn = masking.sliding_window_causal_mask_function(window)
        q_idx = torch.arange(length - n, length)[:, None]
        kv_idx = torch.arange(length)[None, :]
        mask = mask_fn(0, 0, q_idx, kv_idx)  # [n, L] bool
        assert mask.sum(-1).tolist() == [min(window, int(p) + 1) for p in q_idx[:, 0]]
        if softcap is None:
            want = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True
            )
        else:
            module = SimpleNamespace(num_key_value_groups=hq // hkv, training=False, head_dim=d)
            additive = torch.zeros(n, length).masked_fill(~mask, float("-inf"))
            want, _ = gemma2.eager_attention_forward(
                module, qd, kd, vd, additive, scaling=scale, softcap=softcap
            )
            want = want.transpose(1, 2)  # eager returns [1, n, Hq, D]
        torch.testing.assert_close(got, want[0].transpose(0, 1), **TOL[torch.float32])
        if window < length:  # the window changes the answer (the test has teeth)
            full = ops.paged_attention_prefill(
                q, k, v, table, lens, qsl, scale, softcap=softcap, backend="reference"
            )
            assert (full - got).abs().max() > 1e-3


def test_window_and_softcap_validation_errors():
    q, k, v, table, lens, qsl = make_batch([3, 18], [3, 2], 4, 2, 16, 8, torch.float32)
    args = (q, k, v, table, lens, qsl, 0.25)
    dec = (q[:2], k, v, table, lens, 0.25)
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"window must be None .* or an int >= 1"):
            ops.paged_attention_prefill(*args, window=bad)
        with pytest.raises(ValueError, match=r"window must be None .* or an int >= 1"):
            ops.paged_attention_decode(*dec, window=bad)
    sc_msg = r"softcap must be None .* or a finite real number > 0"
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=sc_msg):
            ops.paged_attention_prefill(*args, softcap=bad)
        with pytest.raises(ValueError, match=sc_msg):
            ops.paged_attention_decode(*dec, softcap=bad)
    # the reference validates them too when called directly
    with pytest.raises(ValueError, match="window must be"):
        ops.paged_attention_prefill_reference(*args, window=0)
    # accepted: ints of any integral type, reals of any real type
    ops.paged_attention_prefill(*args, window=torch.tensor(3).item(), softcap=2)
    if cpp_probe("cpu") is None:  # the op's own checks (bypassing the Python validation)
        op = torch.ops.infopt.paged_attention.default
        with pytest.raises(RuntimeError, match="window must be None or an int >= 1"):
            op(*args, None, None, 0, None)
        with pytest.raises(RuntimeError, match="softcap must be None or a finite float > 0"):
            op(*args, None, None, None, -1.0)
        # with a window, only the entries from the first needed block on are validated
        bad = table.clone()
        bad[1, 0] = 10_000
        with pytest.raises(RuntimeError, match="out of range"):
            op(*args[:3], bad, *args[4:], None, None, 16, None)
        out = op(*args[:3], bad, *args[4:], None, None, 2, None)
        torch.testing.assert_close(out, ops.paged_attention_prefill(*args, window=2))


@requires_cpp
def test_window_softcap_opcheck_and_compile():
    q, k, v, table, lens, qsl = make_batch([3, 18, 27], [3, 2, 9], 4, 2, 16, 8, torch.float32)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    args = (q, k, v, table, lens, qsl, 0.25)
    for window, softcap in ((5, None), (None, 2.0), (9, 1.5)):
        torch.library.opcheck(
            torch.ops.infopt.paged_attention.default,
            (*args, None, None, window, softcap),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )
    kq, ks, vq, vs = quantize_batch(k, v, torch.int8)
    torch.library.opcheck(
        torch.ops.infopt.paged_attention.default,
        (q, kq, vq, table, lens, qsl, 0.25, ks, vs, 3, 1.5),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    fn = torch.compile(
        lambda *a: ops.paged_attention_prefill(*a, window=5, softcap=1.5, backend="cpp"),
        fullgraph=True,
        backend="eager",
    )
    want = ops.paged_attention_prefill(*args, window=5, softcap=1.5, backend="reference")
    torch.testing.assert_close(fn(*args), want)
