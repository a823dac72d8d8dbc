"""Paged KV cache for any HuggingFace causal LM (phase 1: full policy, model dtype).

    >>> import infopt, infopt.kvcache
    >>> model = infopt.wrap_model(model, kv="paged")          # or kv=KVConfig(block_size=16, ...)
    >>> out = model.generate(input_ids, max_new_tokens=32)     # runs on a fresh PagedCache
    >>> cache = PagedCache.from_model(model, KVConfig(num_blocks=256))
    >>> model.generate(input_ids, past_key_values=cache); cache.memory_stats()

Pieces: :class:`BlockAllocator` / :class:`BlockManager` (blocks, refcounts, copy-on-write forks,
:class:`OutOfBlocksError`), :class:`PagedCache` (a ``transformers`` ``Cache``), the
``"infopt_paged"`` attention function, and the paged kernels in :mod:`infopt.ops`. Importing this
module registers the ``wrap_model`` option ``kv``. See ``docs/kvcache.md``.
"""

from __future__ import annotations

from ..api import register_handler, register_option
from .allocator import BlockAllocator, BlockManager, OutOfBlocksError, SequenceBlocks, SlotPlan
from .cache import PagedCache, PagedLayer
from .config import KV_ALIASES, KVConfig
from .hf import ATTN_NAME, disable_paged, enable_paged, register

__all__ = [
    "ATTN_NAME",
    "BlockAllocator",
    "BlockManager",
    "KVConfig",
    "OutOfBlocksError",
    "PagedCache",
    "PagedLayer",
    "SequenceBlocks",
    "SlotPlan",
    "disable_paged",
    "enable_paged",
    "register",
]

register_option("kv", KVConfig, KV_ALIASES, description="paged KV cache + paged attention kernels")


@register_handler(KVConfig)
def _apply_kv(model, config: KVConfig):
    return enable_paged(model, config)
