"""Prefix caching: the content-addressed allocator, and generate with a persistent pool."""

from __future__ import annotations

import copy

import pytest
import torch
from test_kvcache import greedy, tiny_llama

import infopt
from infopt.kvcache import (
    KVConfig,
    OutOfBlocksError,
    PagedCache,
    PrefixCachingAllocator,
    kv_state,
)
from infopt.kvcache.allocator import BlockManager
from infopt.kvcache.prefix import block_hashes


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# --- allocator ---------------------------------------------------------------------------------


def test_block_hashes_chain_depends_on_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2  # the partial block of a has no name
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different parent
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a


def test_register_match_release_keeps_blocks_cached_then_lru_evicts():
    clock = FakeClock()
    alloc = PrefixCachingAllocator(4, 2, clock=clock)
    m = BlockManager(alloc)
    s = m.add_sequence()
    m.append({s: 5})  # blocks 0, 1 full; 2 partial
    toks = [10, 11, 12, 13, 14]
    assert alloc.register(m.seqs[s].blocks[:2], block_hashes(toks, 2)) == 2
    assert alloc.is_shared(0) and not alloc.is_shared(2)  # named blocks are never written
    m.free_sequence(s)
    # 0 and 1 stay cached (reusable), 2 is free; all three count as free capacity
    assert alloc.num_free == 4 and alloc.num_cached_free == 2
    assert alloc.match(block_hashes([10, 11, 12, 13, 99], 2)) == [0, 1]
    assert alloc.match(block_hashes([10, 11, 99, 13], 2)) == [0]
    # taking all 4 blocks evicts the cached ones, least recently released first: block 1 (the
    # tail, released first) before block 0
    assert alloc.allocate(3) == [2, 3, 1]
    assert alloc.stats.evictions == 1 and alloc.match(block_hashes(toks, 2)) == [0]
    alloc.allocate(1)
    assert alloc.stats.evictions == 2 and alloc.match(block_hashes(toks, 2)) == []
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(1)


def test_acquire_revives_and_ttl_expires():
    clock = FakeClock()
    alloc = PrefixCachingAllocator(3, 2, ttl_s=300, clock=clock)
    (b,) = alloc.allocate(1)
    alloc.register([b], block_hashes([1, 2], 2))
    alloc.free([b])
    clock.t = 200.0
    assert alloc.match(block_hashes([1, 2], 2)) == [b]
    alloc.acquire([b])  # a hit: referenced again, out of the LRU
    assert alloc.refcount[b] == 1 and alloc.num_cached_free == 0
    alloc.free([b])  # released at t=200: expires after t=500
    clock.t = 499.0
    assert alloc.match(block_hashes([1, 2], 2)) == [b]
    clock.t = 501.0
    assert alloc.match(block_hashes([1, 2], 2)) == [] and alloc.stats.expirations == 1
    assert alloc.num_free == 3 and alloc.num_cached == 0
    with pytest.raises(ValueError, match="ttl_s"):
        PrefixCachingAllocator(3, 2, ttl_s=0)
    with pytest.raises(ValueError, match="neither referenced nor cached"):
        alloc.acquire([b])


def test_duplicate_content_keeps_first_block_and_frees_second():
    alloc = PrefixCachingAllocator(4, 2)
    a, b = alloc.allocate(2)
    h = block_hashes([7, 8], 2)
    assert alloc.register([a], h) == 1 and alloc.register([b], h) == 0
    alloc.free([a, b])
    assert alloc.num_cached_free == 1 and alloc.match(h) == [a]


def test_copy_on_write_of_a_cached_block_with_one_reference():
    alloc = PrefixCachingAllocator(4, 4)
    m = BlockManager(alloc)
    s = m.add_sequence()
    m.append({s: 4})
    alloc.register(m.seqs[s].blocks, block_hashes([1, 2, 3, 4], 4))
    m.free_sequence(s)
    (blk,) = alloc.match(block_hashes([1, 2, 3, 4], 4))
    alloc.acquire([blk])
    t = m.adopt([blk], 3)  # a full hit reuses 3 of its 4 tokens (the 4th is recomputed)
    assert m.blocks_needed(t, 1) == 1
    plan = m.append({t: 1})
    assert plan.copies == [(blk, m.seqs[t].blocks[0])] and m.seqs[t].blocks[0] != blk
    assert alloc.refcount[blk] == 0 and alloc.num_cached_free == 1  # cached copy untouched


def test_config_and_alias():
    assert KVConfig(prefix_caching=True, prefix_ttl_s=300).prefix_ttl_s == 300
    assert "paged-prefix" in infopt.accepted_options()["kv"]
    with pytest.raises(ValueError, match="needs prefix_caching"):
        KVConfig(prefix_ttl_s=10)
    with pytest.raises(ValueError, match="prefix_ttl_s"):
        KVConfig(prefix_caching=True, prefix_ttl_s=-1)
    with pytest.raises(TypeError, match="prefix_caching"):
        KVConfig(prefix_caching="yes")
    old = KVConfig().to_dict()
    old["version"] = 1
    del old["fields"]["prefix_caching"], old["fields"]["prefix_ttl_s"]
    assert infopt.InfoptConfig.from_dict(old) == KVConfig()  # version-1 dicts still load


# --- generate on a persistent pool -------------------------------------------------------------


def _stats(model):
    return kv_state(model).pool.allocator.stats


def test_shared_system_prompt_identity_and_hits():
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    infopt.wrap_model(model, kv=KVConfig(block_size=4, num_blocks=64, prefix_caching=True))
    system = torch.randint(1, 97, (1, 22))  # 5 full blocks + 2 tokens
    questions = [torch.randint(1, 97, (1, n)) for n in (3, 9, 1)]
    prompts = [torch.cat([system, q], 1) for q in questions]
    prompts.append(prompts[0].clone())  # a full hit: the same prompt again
    # whole prompt cached, a multiple of the block size: reuses 11 of 12 tokens, sharing the
    # third block up to its 3rd slot (copy-on-write when the 12th token is written)
    prompts.append(system[:, :12])
    hits = []
    for p in prompts:
        before = _stats(model).hit_tokens if kv_state(model).pool is not None else 0
        assert torch.equal(greedy(model, p, 12), greedy(ref_model, p, 12))
        hits.append(_stats(model).hit_tokens - before)
    # first: cold; then the 20 tokens of system's full blocks; the repeat reuses all but its
    # last token (its generated tokens were cached too); the short prefix all but its last
    assert hits == [0, 20, 20, prompts[3].shape[1] - 1, 11]
    st = _stats(model)
    assert st.requests == 5 and st.miss_tokens == sum(p.shape[1] for p in prompts) - sum(hits)


def test_batch_without_padding_reuses_common_prefix_and_padded_batch_is_correct():
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    infopt.wrap_model(model, kv=KVConfig(block_size=4, prefix_caching=True))
    system = torch.randint(1, 97, (1, 16))
    ids = torch.cat([system.expand(3, -1), torch.randint(1, 97, (3, 5))], 1)
    assert torch.equal(greedy(model, ids, 6), greedy(ref_model, ids, 6))
    assert torch.equal(greedy(model, ids, 6), greedy(ref_model, ids, 6))
    assert _stats(model).hit_tokens == 3 * 20  # second call: each row reuses 20 of its 21
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    before = _stats(model).hit_tokens
    out = greedy(model, ids, 6, attention_mask=mask)
    assert torch.equal(out, greedy(ref_model, ids, 6, attention_mask=mask))
    # Each row is its own engine request, padded or not: rows 0 and 2 reuse 20 tokens again;
    # row 1 (its first 3 tokens masked) starts another chain and reuses none.
    assert _stats(model).hit_tokens == before + 2 * 20


def test_beam_search_and_fixed_pool_with_prefix_caching():
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    infopt.wrap_model(model, kv=KVConfig(block_size=4, num_blocks=24, prefix_caching=True))
    ids = torch.randint(1, 97, (1, 14))
    for _ in range(2):
        ref = greedy(ref_model, ids, 5, num_beams=3)
        assert torch.equal(greedy(model, ids, 5, num_beams=3), ref)
    assert _stats(model).hit_tokens == 12  # the prompt's 3 full blocks were named
    pool = kv_state(model).pool
    # nothing referenced after generate; the prompt's 3 named blocks stay cached
    assert pool.num_blocks == 24 and pool.allocator.num_used == 0
    assert pool.allocator.num_cached_free == 3
    # a request larger than the pool fails cleanly and leaves no sequence behind
    with pytest.raises(OutOfBlocksError):
        greedy(model, torch.randint(1, 97, (1, 90)), 10)
    assert not pool.manager.seqs
    assert torch.equal(greedy(model, ids, 5), greedy(ref_model, ids, 5))


def test_reuse_prefix_errors():
    model = tiny_llama()
    infopt.wrap_model(model, kv="paged")
    cache = PagedCache.from_model(model)
    with pytest.raises(ValueError, match="prefix_caching=True"):
        cache.reuse_prefix(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        PagedCache.from_model(tiny_llama(num_key_value_heads=4), pool=cache.pool)


@pytest.mark.model
def test_smollm2_shared_system_prompt_identity():
    model, tok = infopt.load_model("smollm2-135m")
    model.eval()
    cached = infopt.wrap_model(copy.deepcopy(model), kv="paged-prefix")
    system = (
        "You are a concise assistant for a news desk. Answer in one sentence, cite no sources, "
        "and say 'unknown' when unsure."
    )
    qs = ["Who won the match?", "What is the weather in Sydney today?", "Summarize the budget."]
    prompts = [system + " Question: " + q for q in qs] + [system + " Question: " + qs[0], system]
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids
        assert torch.equal(greedy(cached, ids, 8), greedy(model, ids, 8)), text
    st = kv_state(cached).pool.allocator.stats
    assert st.hit_tokens > 0 and st.requests == len(prompts)
