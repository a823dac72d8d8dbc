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
function and the paged kernels in :mod:`infopt.ops`; :class:`KVState` is what a wrapped model
keeps. Quality as the cache is read: :func:`infopt.eval.compare_through_cache`. Importing this
module registers the ``wrap_model`` option ``kv``. See ``docs/kvcache.md``.
"""

from __future__ import annotations

from ..options import register_option
from .allocator import BlockAllocator, BlockManager, OutOfBlocksError, SequenceBlocks, SlotPlan
from .checks import check_kv_supported
from .config import KV_ALIASES, KVConfig
from .hf import ATTN_NAME, KVState, disable_paged, enable_paged, kv_state, model_pool, register
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
    "KVState",
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
    "kv_state",
    "model_pool",
    "register",
]

register_option("kv", KVConfig, KV_ALIASES, description="paged KV cache + paged attention kernels")
