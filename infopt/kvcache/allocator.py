"""Host-side bookkeeping of a paged KV cache: blocks, reference counts and per-sequence tables.

Nothing here touches tensors. A *block* holds ``block_size`` consecutive tokens of one sequence for
every layer (the pools in :mod:`infopt.kvcache.paged_cache` are indexed by the same block ids), so
one allocation serves the whole model. Sequences may share blocks after :meth:`BlockManager.fork`
(reference counted); the first append into a shared, partially filled last block copies it
(copy-on-write), and the copy is returned to the caller, which owns the tensors.

Running out of blocks raises :class:`OutOfBlocksError` *before* anything is changed, so a
batching engine can catch it, preempt a sequence and retry the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BlockAllocator", "BlockManager", "OutOfBlocksError", "SequenceBlocks", "SlotPlan"]


class OutOfBlocksError(RuntimeError):
    """The KV pool has too few free blocks for a request; nothing was allocated.

    ``needed`` / ``free`` are block counts; catch it to preempt or shrink the batch.
    """

    def __init__(self, needed: int, free: int, capacity: int, what: str = ""):
        self.needed, self.free, self.capacity = needed, free, capacity
        super().__init__(
            f"KV cache out of blocks{f' ({what})' if what else ''}: need {needed}, {free} free "
            f"of {capacity}. Raise KVConfig.num_blocks / max_tokens / max_bytes, or preempt a "
            "sequence and retry."
        )


class BlockAllocator:
    """Fixed-size blocks with a free list and reference counts.

    ``num_blocks`` can grow (:meth:`grow`) but never shrink. Freed blocks are reused LIFO, which
    keeps recently touched memory hot.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.block_size = block_size
        self.refcount: list[int] = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() yields 0, 1, 2...

    @property
    def num_blocks(self) -> int:
        return len(self.refcount)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def grow(self, num_blocks: int) -> None:
        """Extend the pool to ``num_blocks`` (the caller resizes its tensors to match)."""
        old = self.num_blocks
        if num_blocks < old:
            raise ValueError(f"cannot shrink the block pool from {old} to {num_blocks}")
        self.refcount.extend([0] * (num_blocks - old))
        # New ids go to the bottom of the stack so existing free blocks are reused first.
        self._free[:0] = range(num_blocks - 1, old - 1, -1)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks with refcount 1, or :class:`OutOfBlocksError` (nothing taken)."""
        if n > len(self._free):
            raise OutOfBlocksError(n, len(self._free), self.num_blocks)
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self.refcount[b] = 1
        return out

    def is_shared(self, block: int) -> bool:
        """True if writing into ``block`` would change what someone else reads: more than one
        reference (a prefix-caching allocator also counts its content-addressed blocks)."""
        return self.refcount[block] > 1

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refcount[b] <= 0:
                raise ValueError(f"block {b} is free; cannot share it")
            self.refcount[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block; blocks reaching 0 return to the free list."""
        for b in blocks:
            if self.refcount[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self._free.append(b)


@dataclass
class SequenceBlocks:
    """One sequence's block table: token ``j`` is in ``blocks[j // block_size]``."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


@dataclass
class SlotPlan:
    """Where one :meth:`BlockManager.append` put the new tokens.

    ``slots[seq]``: flat slot ids ``block * block_size + offset`` of that sequence's new tokens;
    ``copies``: ``(src_block, dst_block)`` copy-on-write copies the caller must apply to every
    layer's pool *before* writing the new tokens.
    """

    slots: dict[int, list[int]]
    copies: list[tuple[int, int]]


class BlockManager:
    """Sequences -> block tables over one :class:`BlockAllocator`."""

    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.seqs: dict[int, SequenceBlocks] = {}
        self._next_id = 0

    def add_sequence(self) -> int:
        """A new empty sequence; returns its id."""
        sid = self._next_id
        self._next_id += 1
        self.seqs[sid] = SequenceBlocks()
        return sid

    def adopt(self, blocks: list[int], num_tokens: int) -> int:
        """A new sequence over ``blocks`` holding ``num_tokens`` tokens. The caller has already
        taken one reference per block for it (e.g. prefix-cache hits); the sequence owns them."""
        bs = self.block_size
        if (blocks or num_tokens) and not (len(blocks) - 1) * bs < num_tokens <= len(blocks) * bs:
            raise ValueError(f"{len(blocks)} blocks cannot hold exactly {num_tokens} tokens")
        sid = self.add_sequence()
        self.seqs[sid] = SequenceBlocks(list(blocks), num_tokens)
        return sid

    def fork(self, src: int) -> int:
        """A new sequence sharing all of ``src``'s blocks (no copy until one of them appends)."""
        parent = self.seqs[src]
        self.allocator.incref(parent.blocks)
        sid = self.add_sequence()
        self.seqs[sid] = SequenceBlocks(list(parent.blocks), parent.num_tokens)
        return sid

    def free_sequence(self, sid: int) -> None:
        # Tail first: with prefix caching, released blocks queue for LRU eviction in this order,
        # so a sequence's last blocks go before its (more shareable) leading ones.
        self.allocator.free(self.seqs.pop(sid).blocks[::-1])

    def truncate(self, sid: int, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens of ``sid``, releasing whole blocks past them."""
        seq = self.seqs[sid]
        if not 0 <= num_tokens <= seq.num_tokens:
            raise ValueError(f"cannot truncate {seq.num_tokens} tokens to {num_tokens}")
        keep = -(-num_tokens // self.block_size)
        self.allocator.free(seq.blocks[keep:])
        del seq.blocks[keep:]
        seq.num_tokens = num_tokens

    def drop_block(self, sid: int, index: int) -> int:
        """Evict the full block at ``index`` of ``sid``'s table (an eviction policy: the tokens
        after it move up by one block in the table, their K/V untouched). Returns the block id."""
        seq = self.seqs[sid]
        full = seq.num_tokens // self.block_size
        if not 0 <= index < full:
            raise ValueError(f"block index {index} is not a full block of sequence {sid} ({full})")
        block = seq.blocks.pop(index)
        seq.num_tokens -= self.block_size
        self.allocator.free([block])
        return block

    def blocks_needed(self, sid: int, n: int) -> int:
        """Blocks an append of ``n`` tokens to ``sid`` would take (copy-on-write included)."""
        seq = self.seqs[sid]
        if n <= 0:
            return 0
        total = -(-(seq.num_tokens + n) // self.block_size) - len(seq.blocks)
        partial = seq.num_tokens % self.block_size != 0
        if partial and self.allocator.is_shared(seq.blocks[-1]):
            total += 1  # the shared last block gets a private copy first
        return total

    def can_append(self, counts: dict[int, int]) -> bool:
        return sum(self.blocks_needed(s, n) for s, n in counts.items()) <= self.allocator.num_free

    def append(self, counts: dict[int, int]) -> SlotPlan:
        """Reserve slots for ``counts[seq]`` new tokens per sequence, all or nothing.

        Raises :class:`OutOfBlocksError` (with nothing changed) if the free blocks don't cover
        the whole batch.
        """
        needed = sum(self.blocks_needed(s, n) for s, n in counts.items())
        if needed > self.allocator.num_free:
            raise OutOfBlocksError(
                needed,
                self.allocator.num_free,
                self.allocator.num_blocks,
                f"appending {sum(counts.values())} tokens to {len(counts)} sequences",
            )
        bs = self.block_size
        slots: dict[int, list[int]] = {}
        copies: list[tuple[int, int]] = []
        for sid, n in counts.items():
            seq = self.seqs[sid]
            if n <= 0:
                slots[sid] = []
                continue
            if seq.num_tokens % bs and self.allocator.is_shared(seq.blocks[-1]):
                (dst,) = self.allocator.allocate(1)
                copies.append((seq.blocks[-1], dst))
                self.allocator.free([seq.blocks[-1]])
                seq.blocks[-1] = dst
            grow = -(-(seq.num_tokens + n) // bs) - len(seq.blocks)
            seq.blocks.extend(self.allocator.allocate(grow))
            pos = range(seq.num_tokens, seq.num_tokens + n)
            slots[sid] = [seq.blocks[j // bs] * bs + j % bs for j in pos]
            seq.num_tokens += n
        return SlotPlan(slots, copies)

    def token_counts(self) -> tuple[int, int]:
        """``(allocated_slots, used_slots)`` over distinct blocks (a shared block counts once).

        A block's fill is the most tokens any sequence holding it has written into it.
        """
        fill: dict[int, int] = {}
        bs = self.block_size
        for seq in self.seqs.values():
            for i, b in enumerate(seq.blocks):
                fill[b] = max(fill.get(b, 0), min(bs, seq.num_tokens - i * bs))
        return len(fill) * bs, sum(fill.values())
