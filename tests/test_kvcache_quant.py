"""int8 / fp8 KV pools: quantizer, pool storage and accounting, generate, and the cached-quality
check (teacher-forced decoding that reads the quantized cache)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_kvcache import greedy, tiny_llama

import infopt
from infopt.eval.through_cache import compare_through_cache
from infopt.kvcache import KVConfig, PagedCache, kv_state
from infopt.kvcache.kvquant import dequantize_kv, quantize_kv


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("dtype,bound", [(torch.int8, 0.5 / 127), (torch.float8_e4m3fn, 2**-4)])
def test_quantize_kv_round_trip(dtype, bound):
    x = torch.randn(5, 3, 40) * torch.logspace(-3, 3, 5)[:, None, None]  # scales per token
    x[2, 1] = 0.0  # an all-zero row: scale 1, zeros back
    q, s = quantize_kv(x, dtype)
    assert q.dtype == dtype and s.shape == (5, 3) and s[2, 1] == 1.0
    err = (dequantize_kv(q, s) - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert err.max() <= bound  # relative to each row's amax: per-token, per-head scales
    with pytest.raises(ValueError, match="dtype must be one of"):
        quantize_kv(x, torch.int16)
    with pytest.raises(TypeError, match="floating"):
        quantize_kv(x.long(), torch.int8)


@pytest.mark.parametrize("alias,storage", [("paged-int8", torch.int8), ("paged-fp8", None)])
def test_quantized_pool_generate_and_memory(alias, storage):
    storage = storage or torch.float8_e4m3fn
    model = tiny_llama()
    ref = copy.deepcopy(model)
    infopt.wrap_model(model, kv=alias)
    cfg = kv_state(model).config
    cache = PagedCache.from_model(model, KVConfig(block_size=4, cache_dtype=cfg.cache_dtype))
    ids = torch.randint(1, 97, (1, 11))
    out = greedy(model, ids, 9, past_key_values=cache)
    assert out.shape == (1, 20)
    assert cache.layers[0].keys.dtype == storage
    # stored rows dequantize to HF's own K/V of the same tokens (within quantization error)
    hf = ref(out[:, :19], use_cache=True).past_key_values
    seq = cache.manager.seqs[cache.seq_ids[0]]
    slots = torch.tensor([seq.blocks[j // 4] * 4 + j % 4 for j in range(19)])
    pool = cache.pool
    for layer in range(2):
        k = dequantize_kv(
            pool.k[layer].view(-1, 2, 16)[slots], pool.k_scale[layer].view(-1, 2)[slots]
        )
        want = hf.layers[layer].keys[0].transpose(0, 1)  # [T, Hkv, D]
        tol = 0.01 if storage == torch.int8 else 0.07
        assert (k - want).abs().max() <= tol * want.abs().max()
    st = cache.memory_stats()
    # per token and head: D bytes + one fp32 scale, vs D * 4 bytes in the model's fp32
    assert st["bytes_per_token"] == 2 * 2 * 2 * (16 + 4)
    assert st["model_dtype_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert st["cache_dtype"] == str(storage).removeprefix("torch.")


def test_quantized_cow_grow_and_prefix_caching():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    cfg = KVConfig(block_size=4, cache_dtype="int8", prefix_caching=True)
    infopt.wrap_model(model, kv=cfg)
    ids = torch.randint(1, 97, (1, 12))
    first = greedy(model, ids, 6)
    again = greedy(model, ids, 6)  # reuses 11 quantized tokens, copy-on-write of block 3
    assert torch.equal(first, again)
    assert kv_state(model).pool.allocator.stats.hit_tokens == 11
    # beams fork and copy quantized blocks and their scales
    out = greedy(model, ids, 6, num_beams=2)
    assert out.shape == greedy(ref, ids, 6, num_beams=2).shape


def test_compare_through_cache_sees_the_quantized_cache():
    model = tiny_llama()
    ids = torch.randint(1, 97, (200,))
    same = compare_through_cache(model, model, None, ids, window=64, chunk=8)
    assert same.kl_mean == 0.0 and same.ppl_rel_increase == 0.0 and same.top1_agreement == 1.0
    paged = infopt.wrap_model(copy.deepcopy(model), kv=KVConfig(block_size=8))
    r = compare_through_cache(model, paged, None, ids, window=64, chunk=8)
    assert r.kl_max < 1e-6 and r.cand_max_cached_tokens == 64
    q = infopt.wrap_model(copy.deepcopy(model), kv=KVConfig(block_size=8, cache_dtype="fp8"))
    r8 = compare_through_cache(model, q, None, ids, window=64, chunk=8)
    assert r8.kl_mean > 10 * max(r.kl_mean, 1e-9)  # the quantized K/V really is read
    assert r8.n_tokens == r.n_tokens == 200 - 4  # 4 windows, first token of each unscored
    assert r8.cand_max_allocated_bytes < r.cand_max_allocated_bytes / 2
    with pytest.raises(ValueError, match="chunk"):
        compare_through_cache(model, q, None, ids, chunk=0)


def test_config_cache_dtype_values():
    assert KVConfig(cache_dtype="int8").cache_dtype == "int8"
    with pytest.raises(ValueError, match="accepted"):
        KVConfig(cache_dtype="int4")
    for alias in ("paged-int8", "paged-fp8"):
        assert alias in infopt.accepted_options()["kv"]


@pytest.mark.model
def test_smollm2_int8_kv_quality_through_cache():
    model, tok = infopt.load_model("smollm2-135m")
    model.eval()
    q = infopt.wrap_model(copy.deepcopy(model), kv="paged-int8")
    r = compare_through_cache(model, q, tok, max_tokens=512, window=512, chunk=32)
    print(f"\nsmollm2 int8 KV, 512 tokens: {r.to_dict()}")
    assert r.ppl_rel_increase <= 0.005 and r.kl_mean < 0.01
