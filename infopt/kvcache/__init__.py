"""Paged KV cache for any HuggingFace causal LM: prefix caching, int8/fp8 pools, eviction policies.

    >>> import infopt, infopt.kvcache
    >>> model = infopt.wrap_model(model, kv="paged")          # or kv=KVConfig(block_size=16, ...)
    >>> out = model.generate(input_ids, max_new_tokens=32)     # runs on a fresh PagedCache
    >>> cache = PagedCache.from_model(model, KVConfig(num_blocks=256))
    >>> model.generate(input_ids, past_key_values=cache); cache.memory_stats()
    >>> infopt.wrap_model(model, kv="paged-prefix")   # also "paged-int8", "paged-fp8", or
    >>> infopt.wrap_model(model, kv=KVConfig(policy="streaming", n_sink=4, window=1024))

Pieces: :class:`BlockAllocator` / :class:`BlockManager` (blocks, refcounts, copy-on-write forks,
:class:`OutOfBlocksError`), :class:`PrefixCachingAllocator` (content-addressed blocks, LRU/TTL),
:class:`KVPool` (the per-layer tensors, possibly quantized), :class:`PagedCache` (a
``transformers`` ``Cache``), eviction policies (:mod:`.policy`), the ``"infopt_paged"`` attention
function, the paged kernels in :mod:`infopt.ops`, and :mod:`.quality` (quality measured through
the cache). Importing this module registers the ``wrap_model`` option ``kv`` and the kv bench
rows. See ``docs/kvcache.md``.
"""

from __future__ import annotations

from ..api import register_option
from ..bench.configs import BenchConfig, register_bench_config
from .allocator import BlockAllocator, BlockManager, OutOfBlocksError, SequenceBlocks, SlotPlan
from .checks import check_kv_supported
from .config import KV_ALIASES, KVConfig
from .hf import ATTN_NAME, disable_paged, enable_paged, model_pool, register
from .paged_cache import PagedCache, PagedLayer
from .pool import KVMemoryError, KVPool
from .prefix import PrefixCachingAllocator, PrefixStats

__all__ = [
    "ATTN_NAME",
    "BlockAllocator",
    "BlockManager",
    "KVConfig",
    "KVMemoryError",
    "KVPool",
    "OutOfBlocksError",
    "PagedCache",
    "PagedLayer",
    "PrefixCachingAllocator",
    "PrefixStats",
    "SequenceBlocks",
    "SlotPlan",
    "check_kv_supported",
    "disable_paged",
    "enable_paged",
    "model_pool",
    "register",
]

register_option("kv", KVConfig, KV_ALIASES, description="paged KV cache + paged attention kernels")

# Bench rows. Their quality columns come from infopt.kvcache.quality.compare_through_cache
# (chunked decoding through the cache, so a quantized or evicting cache is actually read);
# infopt.eval.compare alone scores use_cache=False forwards, which never touch the KV cache.
def _quality_through_cache(reference, candidate, tokenizer, text, max_tokens):
    from .quality import compare_through_cache

    res = compare_through_cache(
        reference, candidate, tokenizer, text, max_tokens=max_tokens, window=min(512, max_tokens)
    )
    d = res.to_dict()
    d["source"] = "compare + kvcache.quality.compare_through_cache (ppl, KL, top1)"
    return d


for _name, _desc in (
    ("paged", "kv: paged KV cache + paged attention ops"),
    (
        "paged-prefix",
        "kv: paged + prefix caching (the bench repeats one prompt: timed runs are prefix hits)",
    ),
    ("paged-int8", "kv: paged, int8 K/V with per-token per-head scales"),
    ("paged-fp8", "kv: paged, float8_e4m3fn K/V with per-token per-head scales"),
):
    register_bench_config(
        BenchConfig(_name, _desc, wrap_options={"kv": _name}, quality=_quality_through_cache),
        overwrite=True,
    )
