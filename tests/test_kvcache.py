"""Paged KV cache: allocator, config, and the HF integration on tiny random models (no weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import infopt
from infopt.kvcache import (
    BlockAllocator,
    BlockManager,
    KVConfig,
    OutOfBlocksError,
    PagedCache,
    disable_paged,
    enable_paged,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --- allocator / block manager ---------------------------------------------------------------


def test_allocator_refcounts_and_out_of_blocks():
    with pytest.raises(ValueError, match="power of two"):
        BlockAllocator(4, 12)
    a = BlockAllocator(4, 8)
    assert a.allocate(3) == [0, 1, 2] and a.num_free == 1
    with pytest.raises(OutOfBlocksError) as e:
        a.allocate(2)
    assert (e.value.needed, e.value.free) == (2, 1) and a.num_free == 1  # nothing taken
    a.incref([1])
    a.free([0, 1])
    assert a.refcount[:3] == [0, 1, 1] and a.num_free == 2
    with pytest.raises(ValueError, match="double free"):
        a.free([0])
    a.grow(6)
    assert a.num_free == 4 and a.allocate(1) == [0]  # old free blocks are reused first


def test_manager_append_fork_copy_on_write_truncate():
    m = BlockManager(BlockAllocator(8, 4))
    s = m.add_sequence()
    plan = m.append({s: 6})
    assert plan.slots[s] == [0, 1, 2, 3, 4, 5] and plan.copies == []
    f = m.fork(s)  # shares blocks 0 (full) and 1 (2 of 4 slots used)
    assert m.allocator.refcount[:2] == [2, 2]
    plan = m.append({f: 1})  # f writes into the shared partial block -> private copy
    ((src, dst),) = plan.copies
    assert src == 1 and m.seqs[f].blocks == [0, dst] and plan.slots[f] == [dst * 4 + 2]
    assert m.allocator.refcount[1] == 1  # s keeps block 1 alone and appends in place
    assert m.append({s: 1}).copies == [] and m.seqs[s].num_tokens == 7
    allocated, used = m.token_counts()  # blocks 0, 1, dst: 12 slots, 4 + 3 + 3 tokens
    assert (allocated, used) == (12, 10)
    m.truncate(s, 3)
    assert m.seqs[s].blocks == [0] and m.allocator.refcount[1] == 0
    m.free_sequence(f)
    m.free_sequence(s)
    assert m.allocator.num_free == 8


def test_manager_batch_append_is_all_or_nothing():
    m = BlockManager(BlockAllocator(3, 4))
    a, b = m.add_sequence(), m.add_sequence()
    m.append({a: 4})
    with pytest.raises(OutOfBlocksError):
        m.append({a: 1, b: 5})  # needs 1 + 2 blocks, 2 free
    assert m.seqs[a].num_tokens == 4 and m.seqs[b].num_tokens == 0 and m.allocator.num_free == 2


# --- config ----------------------------------------------------------------------------------


def test_kvconfig_validation_and_round_trip():
    cfg = KVConfig(block_size=32, max_tokens=1000)
    assert infopt.InfoptConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.resolve_num_blocks(bytes_per_block=1) == 32
    assert KVConfig(max_bytes=10_000).resolve_num_blocks(bytes_per_block=3000) == 3
    for bad in (
        {"block_size": 24},
        {"num_blocks": 4, "max_tokens": 64},
        {"num_blocks": 0},
        {"cache_dtype": "int4"},
        {"policy": "h2o"},
    ):
        with pytest.raises(ValueError):
            KVConfig(**bad)
    assert "paged" in infopt.accepted_options()["kv"]


# --- HF integration on tiny random models ------------------------------------------------------


def tiny_llama(**kw):
    cfg = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.generation_config.pad_token_id = 0
    return model


def greedy(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_tiny_llama_greedy_identity_batch1(heads):
    model = tiny_llama(num_attention_heads=heads[0], num_key_value_heads=heads[1])
    prompts = [torch.randint(1, 97, (1, n)) for n in (1, 5, 16, 17, 33)]
    ref = [greedy(model, p, 20) for p in prompts]
    infopt.wrap_model(model, kv=KVConfig(block_size=8))
    assert model.config._attn_implementation == "infopt_paged"
    for p, r in zip(prompts, ref):
        assert torch.equal(greedy(model, p, 20), r)


def test_tiny_llama_left_padded_batch_matches_hf_batch_and_single():
    model = tiny_llama()
    lens = [3, 17, 8, 1]
    seqs = [torch.randint(1, 97, (n,)) for n in lens]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, -len(s) :], mask[i, -len(s) :] = s, 1
    ref_batch = greedy(model, ids, 12, attention_mask=mask)
    ref_single = [greedy(model, s[None], 12)[0, len(s) :] for s in seqs]
    enable_paged(model, KVConfig(block_size=4))
    cache = PagedCache.from_model(model, KVConfig(block_size=4))
    out = greedy(model, ids, 12, attention_mask=mask, past_key_values=cache)
    assert torch.equal(out, ref_batch)
    for i in range(len(lens)):
        assert torch.equal(out[i, ids.shape[1] :], ref_single[i])
    # pads are never stored: each row holds its real prompt + 11 decoded tokens (the 12th is
    # sampled from the last forward and never fed back)
    assert cache.seq_lens() == [n + 11 for n in lens]
    stats = cache.memory_stats()
    assert stats["used_bytes"] == sum(n + 11 for n in lens) * stats["bytes_per_token"]
    assert stats["allocated_bytes"] - stats["used_bytes"] == stats["waste_bytes"] >= 0


def test_plain_forward_without_cache_is_unchanged():
    model = tiny_llama()
    x = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
        infopt.wrap_model(model, kv="paged")
        out = model(x, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_fixed_pool_raises_out_of_blocks_and_is_catchable():
    model = tiny_llama()
    enable_paged(model, KVConfig(block_size=4, num_blocks=3))  # 12 tokens per sequence max
    with pytest.raises(OutOfBlocksError, match="out of blocks"):
        greedy(model, torch.randint(1, 97, (1, 6)), 10)
    cache = PagedCache.from_model(model, KVConfig(block_size=4, num_blocks=3))
    greedy(model, torch.randint(1, 97, (1, 6)), 6, past_key_values=cache)  # 11 tokens: fits
    assert cache.memory_stats()["free_blocks"] == 0


def test_beam_search_forks_share_blocks():
    model = tiny_llama()
    ids = torch.randint(1, 97, (1, 10))
    ref = greedy(model, ids, 8, num_beams=3)
    enable_paged(model, KVConfig(block_size=4))
    assert torch.equal(greedy(model, ids, 8, num_beams=3), ref)


def test_growable_pool_and_disable():
    model = tiny_llama()
    ids = torch.randint(1, 97, (1, 30))
    ref = greedy(model, ids, 5)
    enable_paged(model)
    cache = PagedCache.from_model(model, KVConfig(block_size=8), tokens_hint=8)  # 1 block
    assert torch.equal(greedy(model, ids, 5, past_key_values=cache), ref)
    assert cache.num_blocks >= 5
    disable_paged(model)
    assert model.config._attn_implementation != "infopt_paged" and "generate" not in vars(model)
    assert torch.equal(greedy(model, ids, 5), ref)


def test_qwen2_bias_gqa_identity():
    cfg = Qwen2Config(vocab_size=97, hidden_size=56, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2)  # fmt: skip  # Hq/Hkv = 7
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(1, 97, (1, 13))
    ref = greedy(model, ids, 10, pad_token_id=0)
    enable_paged(model)
    assert torch.equal(greedy(model, ids, 10, pad_token_id=0), ref)


def test_unsupported_models_fail_clearly():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable_paged(torch.nn.Linear(2, 2))
    # The PagedCache layer runs full attention only (wrap_model(kv=...) runs windowed and
    # hybrid models on the engine: tests/test_batching_models.py).
    model = tiny_llama(layer_types=["full_attention", "sliding_attention"], sliding_window=8)
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        enable_paged(model)
    # A cache used without the paged attention function is detected, not silently misused.
    model = tiny_llama()
    cache = PagedCache.from_model(model)
    with pytest.raises(RuntimeError, match="needs the model's attn_implementation"):
        model(torch.randint(1, 97, (1, 4)), past_key_values=cache)
