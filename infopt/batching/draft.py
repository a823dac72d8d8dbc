"""Draft-model and layer-skip proposers inside the engine: the draft has its own paged KV pool.

A :class:`DraftProposer` owns a second :class:`~infopt.batching.ModelRunner` over the draft (a
separate small model, or the target itself with a block of layers bypassed) with its own KV pool
and block manager. Each engine step it drafts for the decoding requests as one batch:

1. catch up: every request feeds the draft the tokens it has not seen yet (the whole prompt the
   first time, then the target's verified tokens), as one flat ragged step of the draft runner,
   and the last row's logits give the first draft token;
2. ``k - 1`` single-token steps extend the drafts (greedy; a row stops after a token the draft
   gives less than ``stop_confidence`` probability);
3. what the target rejects is rolled back lazily: the next time a request is drafted for, its
   draft sequence is truncated to the longest prefix of the tokens it fed that the request still
   has (blocks past it go back to the draft pool).

Greedy drafts are point masses, so the target's verify step (greedy or the exact rejection
rule) keeps the output distribution exactly the target's. Draft sequences of requests that are
no longer running are freed; a draft pool that runs out of blocks drafts nothing for the
requests that did not fit (never an error).

Layer skip: the kept blocks keep their layer indices, so the draft pool has a slot for every
layer of the target and the skipped layers' slots stay unused (their share of the draft pool is
the memory cost of sharing the target's modules).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..kvcache.allocator import BlockManager, OutOfBlocksError
from .params import EngineConfig
from .plan import StepPlan
from .request import Request
from .runner import ModelRunner

__all__ = ["DraftProposer", "build_draft_proposer"]


class DraftProposer:
    """Args:
    draft: the draft HF model (for layer skip: the target itself, with ``scope``).
    num_draft_tokens: draft length ``k`` per step.
    stop_confidence: end a row's draft after a token whose draft probability is below this
        (``None``: always ``k`` tokens).
    block_size: the draft pool's block size.
    max_num_seqs: requests drafted for at once (sizes the pool).
    max_model_len: longest sequence.
    scope: a context manager factory entered around every draft forward (layer skip's view).
    """

    def __init__(self, draft: Any, num_draft_tokens: int, stop_confidence: float | None,
                 block_size: int, max_num_seqs: int, max_model_len: int,
                 scope: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.k = num_draft_tokens
        self.stop_confidence = stop_confidence
        self.scope = scope or contextlib.nullcontext
        cfg = EngineConfig(block_size=block_size, max_num_seqs=max_num_seqs,
                           max_model_len=max_model_len)
        self.runner = ModelRunner(draft, cfg, max_model_len)
        self.manager = BlockManager(self.runner.pool.allocator)
        self.block_size = block_size
        self._seqs: dict[str, tuple[int, list[int]]] = {}  # request id -> (sid, tokens fed)
        self.num_forwards = 0

    # --- bookkeeping -----------------------------------------------------------------------

    def release(self, keep: set[str]) -> None:
        """Free the draft sequences of requests not in ``keep``."""
        for rid in [r for r in self._seqs if r not in keep]:
            sid, _ = self._seqs.pop(rid)
            self.manager.free_sequence(sid)

    def _sync(self, req: Request) -> tuple[int, list[int]]:
        """The request's draft sequence, truncated to the tokens the request still has; returns
        ``(sid, tokens to feed)``."""
        tokens = req.all_token_ids
        entry = self._seqs.get(req.request_id)
        if entry is None:
            sid = self.manager.add_sequence()
            self._seqs[req.request_id] = (sid, [])
            return sid, list(tokens)
        sid, fed = entry
        n = 0
        limit = min(len(fed), len(tokens) - 1)  # the last token is always fed again
        while n < limit and fed[n] == tokens[n]:
            n += 1
        if n < len(fed):
            self.manager.truncate(sid, n)
            del fed[n:]
        return sid, list(tokens[n:])

    # --- drafting --------------------------------------------------------------------------

    def propose_batch(self, items: list[tuple[Request, int]]) -> list[list[int]]:
        """Drafts for ``[(request, room)]`` (``room``: most draft tokens that request may
        take). Returns one list per item (possibly empty)."""
        out: list[list[int]] = [[] for _ in items]
        active: list[int] = []
        feeds: dict[int, list[int]] = {}
        for i, (req, room) in enumerate(items):
            if min(room, self.k) <= 0:
                continue
            _, feed = self._sync(req)
            feeds[i] = feed
            active.append(i)
        if not active:
            return out
        with torch.inference_mode(), self.scope():
            limits = {i: min(items[i][1], self.k) for i in active}
            toks, stop = self._step(items, active, feeds)
            while toks:
                for i, tok in toks.items():
                    out[i].append(tok)
                live = [i for i in toks if len(out[i]) < limits[i] and i not in stop]
                if not live:
                    break
                toks, stop = self._step(items, live, {i: [out[i][-1]] for i in live})
        return out

    def _step(self, items: list[tuple[Request, int]], active: list[int],
              feeds: dict[int, list[int]]) -> tuple[dict[int, int], set[int]]:
        """One draft forward over ``feeds[i]`` new tokens per active item. Returns the next
        draft token of each item that fit in the draft pool, and the items whose token was
        unconfident (their draft ends with it)."""
        sids = {i: self._seqs[items[i][0].request_id][0] for i in active}
        fitting = []
        for i in active:
            try:
                slots = self.manager.append({sids[i]: len(feeds[i])})
            except OutOfBlocksError:
                continue  # the draft pool is full: no draft for this request this step
            fitting.append((i, slots.slots[sids[i]]))
        if not fitting:
            return {}
        plan = StepPlan(request_ids=[], num_scheduled=[], token_ids=[], positions=[],
                        slot_mapping=[], query_start_loc=[0], seq_lens=[], block_tables=[],
                        sample_rows=[], sample_request_ids=[],
                        layer_windows=self.runner.windows)
        for i, slots in fitting:
            req = items[i][0]
            sid = sids[i]
            seq = self.manager.seqs[sid]
            feed = feeds[i]
            start = seq.num_tokens - len(feed)
            plan.request_ids.append(req.request_id)
            plan.num_scheduled.append(len(feed))
            plan.token_ids.extend(feed)
            plan.positions.extend(range(start, seq.num_tokens))
            plan.slot_mapping.extend(slots)
            plan.query_start_loc.append(plan.query_start_loc[-1] + len(feed))
            plan.seq_lens.append(seq.num_tokens)
            plan.block_tables.append(list(seq.blocks))
            plan.sample_rows.append(plan.query_start_loc[-1] - 1)
            plan.sample_request_ids.append(req.request_id)
            self._seqs[req.request_id][1].extend(feed)
        logits = self.runner.execute(plan)
        self.num_forwards += 1
        top, tok = logits.max(-1)
        stop: set[int] = set()
        if self.stop_confidence is not None:
            # HF's rule: the unconfident token stays in the draft, drafting stops after it.
            conf = (top - torch.logsumexp(logits, -1)).exp()
            stop = {i for (i, _), ok in zip(fitting, (conf >= self.stop_confidence).tolist())
                    if not ok}
        return {i: int(t) for (i, _), t in zip(fitting, tok.tolist())}, stop


def build_draft_proposer(config: Any, target: Any, engine_config: EngineConfig,
                         max_model_len: int) -> DraftProposer:
    """The engine proposer for a :class:`~infopt.speculative.config.DraftModelConfig` or
    :class:`~infopt.speculative.config.LayerSkipConfig`."""
    from ..speculative.config import DraftModelConfig, LayerSkipConfig

    # Drafts run only while at most spec_disable_batch_size requests run (and never more than
    # max_num_seqs): the draft pool is sized for that many sequences.
    seqs = min(engine_config.spec_disable_batch_size, engine_config.max_num_seqs)
    if isinstance(config, DraftModelConfig):
        from ..speculative.decode import check_draft_model

        draft = config.load(target)
        check_draft_model(target, draft)
        return DraftProposer(draft, config.num_draft_tokens, config.stop_confidence,
                             engine_config.block_size, seqs, max_model_len)
    if isinstance(config, LayerSkipConfig):
        from ..speculative.drafts import LayerSkipDraft

        view = LayerSkipDraft(target, config.skip, config.skip_every)

        @contextlib.contextmanager
        def scope() -> Iterator[None]:
            with view._scope():
                yield

        return DraftProposer(target, config.num_draft_tokens, None, engine_config.block_size,
                             seqs, max_model_len, scope=scope)
    raise TypeError(f"not a draft-model or layer-skip config: {type(config).__name__}")
