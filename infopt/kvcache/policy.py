"""Bounded-memory eviction policies: StreamingLLM (sinks + window) and H2O (heavy hitters).

Both evict whole *full* blocks from the middle of a sequence's block table, so the pool memory a
sequence holds stays bounded while it generates; the paged kernels need no change (the kept
tokens stay in order, and causal masking by stored index equals causal masking by position).

Positions: kept tokens keep the RoPE positions they were written with, and new tokens take HF's
running position (``get_seq_length()`` keeps counting every token ever fed). That is the simple,
HF-compatible choice: nothing is re-rotated. (The StreamingLLM paper re-assigns positions inside
the cache instead, which lets a model run past its trained context; with original positions the
model still sees absolute positions up to the total length, so stay within
``max_position_embeddings``.)

* ``streaming`` (StreamingLLM, Xiao et al. 2023): keep the first ``n_sink`` tokens (rounded up
  to whole blocks: the attention sinks) and at least the last ``window`` tokens. Before each
  step, the oldest non-sink block is freed while the recent tokens left (plus this step's) would
  still be ``>= window``. A sequence holds at most ``sinks + window + block_size - 1`` tokens
  before a step's new ones.
* ``h2o`` (Heavy-Hitter Oracle, Zhang et al. 2023): every layer adds the attention probability
  each stored token received (summed over query heads and this step's queries) to that token's
  score; before each step, while the sequence would exceed ``budget`` tokens, the full block
  with the lowest score outside the last ``window`` tokens is freed. Blocks are shared by all
  layers, so the score is summed over layers and heads too (per-layer/per-head eviction as in the
  paper would need per-layer block tables).
"""

from __future__ import annotations

import torch

from .allocator import BlockManager
from .config import KVConfig

__all__ = ["EvictionPolicy", "make_policy"]


class EvictionPolicy:
    """Decides which full blocks a sequence gives up before a step (base: keeps everything)."""

    needs_scores = False

    def __init__(self, config: KVConfig):
        self.config = config
        self.block_size = config.block_size
        self.evicted_blocks = 0

    def limit(self) -> int | None:
        """Tokens a sequence holds at most before a step's new tokens (None: unbounded)."""
        return None

    def evict(self, manager: BlockManager, sid: int, n_new: int) -> None:
        """Free blocks of ``sid`` before it appends ``n_new`` tokens."""

    def fork(self, src: int, dst: int) -> None:
        pass

    def forget(self, sid: int) -> None:
        pass

    def truncate(self, sid: int, num_tokens: int) -> None:
        """``sid`` was cut back to its first ``num_tokens`` stored tokens (``Cache.crop``)."""


class StreamingPolicy(EvictionPolicy):
    def __init__(self, config: KVConfig):
        super().__init__(config)
        self.sink_blocks = -(-config.n_sink // self.block_size)
        self.window = config.window

    def limit(self) -> int:
        return self.sink_blocks * self.block_size + self.window + self.block_size - 1

    def evict(self, manager: BlockManager, sid: int, n_new: int) -> None:
        seq = manager.seqs[sid]
        bs = self.block_size
        sinks = self.sink_blocks * bs
        # Free the oldest non-sink block while what stays (plus this step's tokens) still
        # covers the window. The block must be full: it is never the sequence's last block here.
        while seq.num_tokens - sinks - bs + n_new >= self.window and len(seq.blocks) > (
            self.sink_blocks + 1
        ):
            manager.drop_block(sid, self.sink_blocks)
            self.evicted_blocks += 1


class H2OPolicy(EvictionPolicy):
    needs_scores = True

    def __init__(self, config: KVConfig):
        super().__init__(config)
        self.budget, self.window = config.budget, config.window
        self.scores: dict[int, torch.Tensor] = {}  # sid -> fp32 [num_tokens] accumulated attention

    def limit(self) -> int:
        return self.budget

    def add_scores(self, sid: int, probs: torch.Tensor) -> None:
        """Add ``probs`` ``[L]`` (attention received by each stored token, L = stored tokens
        after this step) to ``sid``'s scores, zero-extending for the step's new tokens."""
        old = self.scores.get(sid)
        n = probs.shape[0]
        if old is None or old.shape[0] < n:
            grown = probs.new_zeros(n)
            if old is not None:
                grown[: old.shape[0]] = old
            old = grown
        old[:n] += probs
        self.scores[sid] = old

    def evict(self, manager: BlockManager, sid: int, n_new: int) -> None:
        seq = manager.seqs[sid]
        bs = self.block_size
        scores = self.scores.get(sid)
        if scores is None or scores.shape[0] != seq.num_tokens:
            return  # nothing observed yet (first step)
        while seq.num_tokens + n_new > self.budget:
            # candidates: full blocks entirely before the recent window
            n_cand = max(0, seq.num_tokens - self.window) // bs
            if n_cand == 0:
                break
            per_block = scores[: n_cand * bs].view(n_cand, bs).sum(1)
            i = int(per_block.argmin())
            manager.drop_block(sid, i)
            scores = torch.cat([scores[: i * bs], scores[(i + 1) * bs :]])
            self.evicted_blocks += 1
        self.scores[sid] = scores

    def fork(self, src: int, dst: int) -> None:
        if src in self.scores:
            self.scores[dst] = self.scores[src].clone()

    def forget(self, sid: int) -> None:
        self.scores.pop(sid, None)

    def truncate(self, sid: int, num_tokens: int) -> None:
        if sid in self.scores:
            self.scores[sid] = self.scores[sid][:num_tokens]


def make_policy(config: KVConfig) -> EvictionPolicy:
    """The policy object for ``config.policy``."""
    if config.policy == "streaming":
        return StreamingPolicy(config)
    if config.policy == "h2o":
        return H2OPolicy(config)
    return EvictionPolicy(config)
