"""Bounded-memory policies: StreamingLLM sinks + window, and H2O heavy hitters."""

from __future__ import annotations

import copy

import pytest
import torch
from test_kvcache import greedy, tiny_llama

import infopt
from infopt.eval.through_cache import compare_through_cache
from infopt.kvcache import BlockAllocator, BlockManager, KVConfig, PagedCache, kv_state
from infopt.kvcache.policy import H2OPolicy, make_policy


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_policy_config_errors():
    with pytest.raises(ValueError, match="window must be a positive int"):
        KVConfig(policy="streaming")
    with pytest.raises(ValueError, match="n_sink must be a non-negative int"):
        KVConfig(policy="streaming", window=16, n_sink=-1)
    with pytest.raises(ValueError, match="budget is for policy='h2o'"):
        KVConfig(policy="streaming", window=16, budget=64)
    with pytest.raises(ValueError, match="budget must be a positive int"):
        KVConfig(policy="h2o", window=16)
    with pytest.raises(ValueError, match="budget=40 must be >= window"):
        KVConfig(policy="h2o", window=16, budget=40, block_size=16)
    with pytest.raises(ValueError, match="apply to policy='streaming' or 'h2o'"):
        KVConfig(window=16)
    with pytest.raises(ValueError, match="prefix_caching=False"):
        KVConfig(policy="streaming", window=16, prefix_caching=True)
    with pytest.raises(ValueError, match="accepted"):
        KVConfig(policy="lru")
    cfg = KVConfig(policy="h2o", window=16, budget=64)
    assert infopt.InfoptConfig.from_dict(cfg.to_dict()) == cfg


def test_streaming_keeps_sinks_and_window_blocks():
    cfg = KVConfig(block_size=4, policy="streaming", n_sink=3, window=8)
    m = BlockManager(BlockAllocator(16, 4))
    pol = make_policy(cfg)
    s = m.add_sequence()
    m.append({s: 4})  # the sink block (n_sink 3 rounds up to one block)
    kept = list(range(4))
    for pos in range(4, 40):
        before = list(m.seqs[s].blocks)
        pol.evict(m, s, 1)
        if m.seqs[s].blocks != before:  # the oldest non-sink block went
            dropped = before[1]
            assert dropped not in m.seqs[s].blocks and m.allocator.refcount[dropped] == 0
            kept = kept[:4] + kept[8:]
        m.append({s: 1})
        kept.append(pos)
        n = m.seqs[s].num_tokens
        assert n == len(kept) <= pol.limit() + 1
        # sinks + at least the window (once that many tokens exist)
        assert kept[:4] == [0, 1, 2, 3] and len(kept) - 4 >= min(8, pos - 3)
        assert kept[4:] == list(range(kept[4], pos + 1))  # the recent part is contiguous
    assert m.allocator.num_used == -(-m.seqs[s].num_tokens // 4)  # evicted blocks were freed


def test_h2o_evicts_lowest_score_block_outside_window():
    cfg = KVConfig(block_size=2, policy="h2o", window=2, budget=6)
    m = BlockManager(BlockAllocator(8, 2))
    pol = make_policy(cfg)
    assert isinstance(pol, H2OPolicy)
    s = m.add_sequence()
    m.append({s: 6})
    blocks = list(m.seqs[s].blocks)
    pol.add_scores(s, torch.tensor([5.0, 5.0, 0.1, 0.2, 3.0, 3.0]))
    pol.evict(m, s, 1)  # 6 + 1 > 6: drop the block with the lowest sum (block 1)
    assert m.seqs[s].blocks == [blocks[0], blocks[2]] and m.seqs[s].num_tokens == 4
    assert pol.scores[s].tolist() == [5.0, 5.0, 3.0, 3.0]


def _decode_loop(model, cache, ids, steps):
    """Greedy decoding one token per forward; returns the max tokens the cache held."""
    held = 0
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            held = max(held, sum(cache.seq_lens()))
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, past_key_values=cache, use_cache=True)
    return held, out.logits


@pytest.mark.parametrize(
    "cfg",
    [
        KVConfig(block_size=4, policy="streaming", n_sink=4, window=16),
        KVConfig(block_size=4, policy="h2o", window=8, budget=24),
        KVConfig(block_size=4, policy="h2o", window=8, budget=24, cache_dtype="int8"),
    ],
    ids=["streaming", "h2o", "h2o-int8"],
)
def test_budget_respected_and_memory_flat_while_generating(cfg):
    model = tiny_llama()
    infopt.wrap_model(model, kv=cfg)
    cache = PagedCache.from_model(model, cfg)
    limit = cache.policy.limit()
    held, logits = _decode_loop(model, cache, torch.randint(1, 97, (1, 10)), 80)
    assert held <= limit + 1 and torch.isfinite(logits).all()
    assert cache.policy.evicted_blocks > 0
    assert cache.get_seq_length() == 90  # HF positions keep counting (original RoPE positions)
    alloc = cache.memory_stats()["allocated_bytes"]
    assert alloc <= (limit // 4 + 2) * 4 * cache.bytes_per_token


def test_crop_keeps_h2o_scores_aligned():
    model = tiny_llama()
    cfg = KVConfig(block_size=4, policy="h2o", window=8, budget=24)
    infopt.wrap_model(model, kv=cfg)
    cache = PagedCache.from_model(model, cfg)
    _decode_loop(model, cache, torch.randint(1, 97, (1, 10)), 30)
    cache.crop(-3)
    (sid,) = cache.seq_ids
    assert cache.policy.scores[sid].shape[0] == cache.manager.seqs[sid].num_tokens
    _decode_loop(model, cache, torch.randint(1, 97, (1, 1)), 10)  # evicts again after the crop
    assert cache.policy.scores[sid].shape[0] == cache.manager.seqs[sid].num_tokens <= 24


def test_no_eviction_means_identical_to_full():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    infopt.wrap_model(model, kv=KVConfig(block_size=4, policy="streaming", n_sink=4, window=64))
    ids = torch.randint(1, 97, (1, 12))
    assert torch.equal(greedy(model, ids, 20), greedy(ref, ids, 20))  # 32 tokens < window


def test_beam_search_with_h2o_forks_scores():
    model = tiny_llama()
    infopt.wrap_model(model, kv=KVConfig(block_size=4, policy="h2o", window=8, budget=24))
    out = greedy(model, torch.randint(1, 97, (1, 10)), 30, num_beams=2)
    assert out.shape == (1, 40)


def test_quality_through_bounded_cache():
    model = tiny_llama()
    ids = torch.randint(1, 97, (160,))
    stream = infopt.wrap_model(
        copy.deepcopy(model), kv=KVConfig(block_size=4, policy="streaming", n_sink=4, window=32)
    )
    r = compare_through_cache(model, stream, None, ids, window=160, chunk=4, first_chunk=4)
    assert r.cand_max_cached_tokens <= kv_state(stream).config.window + 4 + 4 - 1 + 4
    assert r.kl_mean > 0  # tokens were really dropped
