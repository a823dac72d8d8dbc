"""``StepPlan``: what one engine step computes, as plain data (ints and lists, no tensors).

The scheduler emits it; the model runner copies it into tensors. Sequences are packed back to
back into one flat ragged batch of ``N`` tokens (no padding): sequence ``b`` owns flat rows
``query_start_loc[b] : query_start_loc[b + 1]``, which are its tokens at positions
``seq_lens[b] - num_scheduled[b] .. seq_lens[b] - 1``.
"""

from __future__ import annotations

import dataclasses

__all__ = ["StepPlan"]


@dataclasses.dataclass
class StepPlan:
    """One step.

    Attributes:
        request_ids: ``[B]`` the scheduled requests, in batch order.
        num_scheduled: ``[B]`` tokens computed for each this step (1 for a decode, a chunk for a
            prefill).
        token_ids: ``[N]`` input tokens, ``N = sum(num_scheduled)``.
        positions: ``[N]`` absolute positions of those tokens.
        slot_mapping: ``[N]`` flat KV slots (``block * block_size + offset``) their K/V go to.
        query_start_loc: ``[B + 1]`` cumulative ``num_scheduled``.
        seq_lens: ``[B]`` tokens in the cache per sequence after this step.
        block_tables: ``[B][blocks]`` each sequence's block ids (ragged; the runner pads them).
            Blocks that no layer's sliding window reaches any more hold ``0`` (never read).
        sample_rows: ``[S]`` flat rows whose logits are sampled: the last token of each sequence
            whose step reaches the end of its known tokens (a prefill chunk that does not
            finish the prompt samples nothing), and every row of a speculating request.
        sample_request_ids: ``[S]`` the request of each sampled row.
        layer_windows: ``[num_layers]`` sliding window of each layer (``None``: full attention).
        preempted: requests preempted while planning this step (their K/V dropped).
        num_cached_tokens: prompt tokens newly served by the prefix cache this step.
        spec_drafts: draft tokens per speculating request; its sampled rows are its last real
            token's and each draft's (``k + 1`` consecutive rows) and are verified together.
        block_copies: ``(src, dst)`` block copies to apply to every layer before the forward
            (a prefix hit that ends inside a cached block continues in a private copy).
    """

    request_ids: list[str]
    num_scheduled: list[int]
    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]
    sample_request_ids: list[str]
    layer_windows: tuple[int | None, ...] = ()
    preempted: list[str] = dataclasses.field(default_factory=list)
    num_cached_tokens: int = 0
    block_copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    spec_drafts: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.request_ids)

    @property
    def is_empty(self) -> bool:
        return not self.request_ids
