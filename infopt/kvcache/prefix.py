"""Prefix caching: content-addressed full blocks that outlive the requests that computed them.

A *full* block holding tokens ``[i * bs, (i + 1) * bs)`` of a sequence is named by a hash chain
``h_i = H(h_{i-1}, tokens of block i)`` (``h_{-1}`` = empty), so equal names mean equal token
prefixes and therefore equal K/V (a causal model's K/V of a token depends only on the tokens before
it and their positions, which start at 0 for every stored sequence). ``H`` is BLAKE2b-128 over the
parent digest and the token ids, so a collision, which would silently serve another prompt's K/V,
is out of practical reach (Python's 64-bit ``hash`` would not be).

:class:`PrefixCachingAllocator` is a :class:`~infopt.kvcache.allocator.BlockAllocator` whose
blocks may carry such a name. A named block whose last reference goes away is not freed: it
stays in the pool as *cached* (in an LRU queue) until

* the pool needs a block and the free list is empty: the least recently used cached block is
  evicted (its name forgotten, its memory reused), or
* it has been unreferenced for longer than ``ttl_s`` seconds (expired on the next lookup or
  allocation).

A later request walks its prompt's chain (:meth:`PrefixCachingAllocator.match`) and takes a
reference on every block of the longest cached prefix (:meth:`PrefixCachingAllocator.acquire`),
so its prefill computes only the rest. Named blocks are never written again: the block manager
treats them as shared (copy-on-write) even with a single reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence

from .allocator import BlockAllocator, OutOfBlocksError

__all__ = ["PrefixCachingAllocator", "PrefixStats", "block_hashes"]


def block_hashes(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Chain digests of the full blocks of ``tokens`` (a trailing partial block has none)."""
    out: list[bytes] = []
    parent = b""
    for i in range(len(tokens) // block_size):
        chunk = array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        out.append(parent)
    return out


@dataclasses.dataclass
class PrefixStats:
    """Counters since the allocator was built (or :meth:`reset`).

    ``hit_tokens`` / ``miss_tokens``: prompt tokens served from the cache / computed;
    ``hit_blocks`` / ``miss_blocks``: prompt blocks reused (a partially reused last block
    included) / not found; ``evictions``: cached blocks reclaimed by LRU for new allocations;
    ``expirations``: cached blocks dropped by the TTL; ``requests``: prompts looked up.
    """

    requests: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    hit_blocks: int = 0
    miss_blocks: int = 0
    evictions: int = 0
    expirations: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens served from the cache."""
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0)


class PrefixCachingAllocator(BlockAllocator):
    """A block allocator that keeps unreferenced full blocks as a content-addressed cache.

    Args:
        num_blocks, block_size: as :class:`BlockAllocator`.
        ttl_s: seconds an unreferenced cached block survives (``None``: until evicted by LRU).
        clock: monotonic time source in seconds (injectable for tests).

    ``num_free`` counts free *and* cached-unreferenced blocks: both are available to
    :meth:`allocate`, which takes free blocks first and evicts cached ones LRU-first after.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(num_blocks, block_size)
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 seconds or None, got {ttl_s!r}")
        self.ttl_s = ttl_s
        self.clock = clock
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        # Unreferenced cached blocks -> when they were last released or hit; insertion order is
        # LRU order (re-inserted at the end on every release), so the front is evicted first.
        self._lru: OrderedDict[int, float] = OrderedDict()
        self.stats = PrefixStats()

    # --- capacity ------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks with a cache name (referenced or not)."""
        return len(self._hash_of)

    @property
    def num_cached_free(self) -> int:
        """Unreferenced cached blocks: reusable by a prefix hit, evictable by an allocation."""
        return len(self._lru)

    def is_shared(self, block: int) -> bool:
        # A named block may be matched by a later request at any time: never write into it.
        return self.refcount[block] > 1 or block in self._hash_of

    def _forget(self, block: int) -> None:
        del self._by_hash[self._hash_of.pop(block)]

    def expire(self) -> int:
        """Drop cached blocks unreferenced for longer than ``ttl_s``; returns how many."""
        if self.ttl_s is None or not self._lru:
            return 0
        cutoff = self.clock() - self.ttl_s
        n = 0
        while self._lru:
            block, t = next(iter(self._lru.items()))
            if t > cutoff:
                break  # LRU order is release-time order: the rest are younger
            self._lru.popitem(last=False)
            self._forget(block)
            self._free.append(block)
            n += 1
        self.stats.expirations += n
        return n

    # --- allocation ----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        self.expire()
        if n > self.num_free:
            raise OutOfBlocksError(n, self.num_free, self.num_blocks)
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently used cached block
                b, _ = self._lru.popitem(last=False)
                self._forget(b)
                self.stats.evictions += 1
            self.refcount[b] = 1
            out.append(b)
        return out

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refcount[b] <= 0 and b not in self._lru:
                raise ValueError(f"block {b} is free; cannot share it")
        self.acquire(blocks)

    def acquire(self, blocks: list[int]) -> None:
        """Take one reference on each block, reviving unreferenced cached ones."""
        for b in blocks:
            if self.refcount[b] == 0:
                if b not in self._lru:
                    raise ValueError(f"block {b} is neither referenced nor cached")
                del self._lru[b]
            self.refcount[b] += 1

    def free(self, blocks: list[int]) -> None:
        now = self.clock()
        for b in blocks:
            if self.refcount[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                if b in self._hash_of:
                    self._lru[b] = now  # stays cached; most recently used end
                else:
                    self._free.append(b)

    # --- the content index ---------------------------------------------------------------

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of a chain (no references taken)."""
        self.expire()
        out = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def register(self, blocks: Sequence[int], hashes: Sequence[bytes]) -> int:
        """Name ``blocks[i]`` (full, already written) by ``hashes[i]``; returns how many were new.

        A block already carrying that name is left alone; a name already held by *another* block
        (the same prefix computed twice) keeps its first block and this one stays unnamed, so it
        is freed normally.
        """
        new = 0
        for b, h in zip(blocks, hashes):
            if self._hash_of.get(b) == h or h in self._by_hash:
                continue
            if b in self._hash_of:
                raise ValueError(f"block {b} is already cached under another prefix")
            if self.refcount[b] <= 0:
                raise ValueError(f"block {b} is free; only held blocks can be cached")
            self._by_hash[h] = b
            self._hash_of[b] = h
            new += 1
        return new

    def clear(self) -> None:
        """Forget every cached name; unreferenced cached blocks become free."""
        for b in self._lru:
            self._free.append(b)
        self._lru.clear()
        self._by_hash.clear()
        self._hash_of.clear()
