"""The speculative decoding loop: propose -> verify (one batched target pass) -> accept.

Batch > 1: rows advance by different amounts. The target and every model draft keep one KV
cache per model whose length is the slowest active row's committed length; faster rows re-feed
their extra committed tokens in the next chunk (see :mod:`infopt.speculative.cached_lm`). This keeps
every cache dense and exact at the cost of re-computing at most ``k + 1`` tokens per row per
step, and needs no per-row caches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .cached_lm import CachedLM, build_chunk
from .drafts import DraftContext, DraftSource, ModelDraft
from .sampling import (
    Sampling,
    emitted_tokens,
    greedy_accept,
    next_draft_length,
    rejection_accept,
)


@dataclasses.dataclass
class SpecStats:
    """Counters for one speculative generate call (summed over rows).

    ``row_steps`` counts (verification step, active row) pairs, so per-row means are honest for
    batches: ``mean_accepted_length`` = accepted draft tokens per row per step,
    ``tokens_per_step`` = emitted tokens per row per step (1 + mean accepted, less at the end).
    """

    proposed: int = 0
    accepted: int = 0
    emitted: int = 0
    row_steps: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    wall_time_s: float = 0.0
    proposed_per_position: list[int] = dataclasses.field(default_factory=list)
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    draft_lengths: list[int] = dataclasses.field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.row_steps if self.row_steps else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [
            a / p if p else 0.0
            for a, p in zip(self.accepted_per_position, self.proposed_per_position)
        ]

    def record(self, n_valid: Sequence[int], n_kept: Sequence[int]) -> None:
        """One verification step: per active row, drafts proposed and drafts kept."""
        width = max(n_valid, default=0)
        grow = width - len(self.proposed_per_position)
        if grow > 0:
            self.proposed_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for nv, nk in zip(n_valid, n_kept):
            self.row_steps += 1
            self.proposed += nv
            self.accepted += nk
            for j in range(nv):
                self.proposed_per_position[j] += 1
            for j in range(nk):
                self.accepted_per_position[j] += 1

    def merge(self, other: SpecStats) -> None:
        """Add ``other``'s counters to these (e.g. to sum several generate calls)."""
        for f in ("proposed", "accepted", "emitted", "row_steps", "target_forwards",
                  "draft_forwards", "wall_time_s"):  # fmt: skip
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for f in ("proposed_per_position", "accepted_per_position"):
            mine, theirs = getattr(self, f), getattr(other, f)
            mine += [0] * (len(theirs) - len(mine))
            for j, v in enumerate(theirs):
                mine[j] += v
        self.draft_lengths += other.draft_lengths

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
            tokens_per_step=self.tokens_per_step,
            acceptance_rate_per_position=self.acceptance_rate_per_position,
        )
        return d


@dataclasses.dataclass
class SpecOutput:
    """``sequences [B, P + new]`` (prompt then new tokens, finished rows padded with the pad id,
    like ``model.generate``) and the call's :class:`SpecStats`."""

    sequences: torch.Tensor
    stats: SpecStats


def _first_eos(tokens: list[int], eos: frozenset[int]) -> int | None:
    for i, t in enumerate(tokens):
        if t in eos:
            return i
    return None


@torch.inference_mode()
def speculative_decode(
    target: nn.Module,
    input_ids: torch.Tensor,
    source: DraftSource,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    attention_mask: torch.Tensor | None = None,
    num_draft_tokens: int = 4,
    max_draft_tokens: int | None = None,
    adaptive: bool = True,
    pad_token_id: int = 0,
    streamer: Any = None,
    generator: torch.Generator | None = None,
) -> SpecOutput:
    """Core loop over already-validated arguments (use :func:`infopt.speculative.generate`).

    Args:
        input_ids: ``[B, P]`` prompts, left-padded when ``attention_mask`` has zeros.
        attention_mask: ``[B, P]`` 0/1 or None.
        num_draft_tokens: initial draft length ``k`` (0 = plain decoding through this loop).
        max_draft_tokens: adaptive upper bound (default ``2 * num_draft_tokens``).
    """
    t0 = time.perf_counter()
    stats = SpecStats()
    bsz, plen = input_ids.shape
    dev = input_ids.device
    eos = frozenset(sampling.eos_token_ids)
    prompt_valid = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        prompt_valid = attention_mask.to(dev).bool()
    k_max = max(num_draft_tokens, max_draft_tokens or 2 * num_draft_tokens)
    k = num_draft_tokens
    if streamer is not None:
        streamer.put(input_ids.cpu())
    buf = torch.full((bsz, plen + max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
    buf[:, :plen] = input_ids
    lens, n_gen, active = [plen] * bsz, [0] * bsz, [max_new_tokens > 0] * bsz
    ctx = DraftContext(buf, lens, active, prompt_valid, plen, sampling, generator, pad_token_id)
    lm = CachedLM(target)
    source.begin(ctx)
    while any(active):
        rows = [b for b in range(bsz) if active[b]]
        remaining = max(max_new_tokens - n_gen[b] for b in rows)
        k_step = max(0, min(k, remaining - 1))  # the step's last token comes from the target
        proposal = source.propose(ctx, k_step) if k_step > 0 else None
        draft = None if proposal is None or proposal.tokens.shape[1] == 0 else proposal.tokens
        n_draft = 0 if draft is None else draft.shape[1]

        # Verify: one target pass over [uncached committed tokens | drafts] for every row.
        start = lm.length
        chunk, valid, m = build_chunk(buf, start, lens, active, draft, prompt_valid, pad_token_id)
        width = chunk.shape[1]
        keep = width - min(m) + 1
        logits = lm.forward(chunk, valid, keep=keep)  # [B, keep, V]
        offs = torch.tensor(m, device=dev) - 1 - (width - keep)  # row b's first needed column
        cols = offs.unsqueeze(1) + torch.arange(n_draft + 1, device=dev)  # [B, n_draft + 1]
        sel = logits.gather(1, cols.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        n_before = torch.tensor([n - plen for n in lens], device=dev).unsqueeze(1)
        n_generated = n_before + torch.arange(n_draft + 1, device=dev)  # [B, n_draft + 1]
        if draft is None:
            draft = buf.new_zeros(bsz, 0)
        if sampling.do_sample:
            p = sampling.probs(sel, n_generated)
            q = None if proposal is None else proposal.probs
            n_acc, tok = rejection_accept(draft, q, p, generator)
            out = emitted_tokens(draft, n_acc, tok)
        else:
            out = sampling.process(sel, n_generated).argmax(dim=-1)
            n_acc = greedy_accept(draft, out)
        # The one host sync of the step.
        n_acc_l, out_l = n_acc.tolist(), out.tolist()
        n_valid_l = (draft >= 0).sum(dim=1).tolist() if n_draft else [0] * bsz

        kept, valid_rows = [0] * bsz, []
        for b in rows:
            new = out_l[b][: n_acc_l[b] + 1][: max_new_tokens - n_gen[b]]
            stop = _first_eos(new, eos) if eos else None
            if stop is not None:
                new = new[: stop + 1]  # stop exactly where the target would: EOS is emitted
            kept[b] = min(n_acc_l[b], len(new))
            buf[b, lens[b] : lens[b] + len(new)] = torch.tensor(new, dtype=torch.long, device=dev)
            lens[b] += len(new)
            n_gen[b] += len(new)
            stats.emitted += len(new)
            if stop is not None or n_gen[b] >= max_new_tokens:
                active[b] = False
            if streamer is not None:
                streamer.put(torch.tensor(new, dtype=torch.long))
            valid_rows.append((n_valid_l[b], kept[b]))
        stats.record([v for v, _ in valid_rows], [c for _, c in valid_rows])
        stats.draft_lengths.append(n_draft)
        source.accept(kept)
        if any(active):
            # Row b's target cache is exact up to its last accepted draft token.
            lm.crop(min(lens[b] - 1 for b in range(bsz) if active[b]))
        if adaptive and n_draft:
            prop = max(v for v, _ in valid_rows)
            all_kept = all(c >= v for v, c in valid_rows)
            mean_kept = sum(c for _, c in valid_rows) / len(valid_rows)
            k = next_draft_length(k, prop, all_kept, mean_kept, k_max)
    if streamer is not None:
        streamer.end()
    stats.target_forwards = lm.forwards
    stats.draft_forwards = getattr(source, "forwards", 0)
    stats.wall_time_s = time.perf_counter() - t0
    total = plen + max(n_gen, default=0)
    return SpecOutput(buf[:, :total].clone(), stats)


def check_draft_model(target: nn.Module, draft: nn.Module) -> None:
    """Raise if ``draft`` cannot share the target's tokenizer (vocabulary size differs)."""
    tv = _vocab_size(target)
    dv = _vocab_size(draft)
    if tv is not None and dv is not None and tv != dv:
        raise ValueError(
            f"draft model vocabulary size {dv} != target vocabulary size {tv}: the draft must "
            "share the target's tokenizer"
        )


def _vocab_size(model: nn.Module) -> int | None:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    cfg = getattr(model, "config", None)
    return getattr(cfg, "vocab_size", None)


def as_draft_source(target: nn.Module, draft: Any) -> DraftSource:
    """``draft`` (model, ``"prompt-lookup"``, ``"layer-skip"``, SpecConfig, DraftSource)
    -> a :class:`DraftSource`."""
    from .config import SpecConfig, alias_config

    if isinstance(draft, str):
        draft = alias_config(draft)
    if isinstance(draft, SpecConfig):
        return draft.build(target)
    if isinstance(draft, nn.Module):
        if draft is not target:
            check_draft_model(target, draft)
        return ModelDraft(draft)
    if isinstance(draft, DraftSource):
        return draft
    raise TypeError(
        "draft must be a draft model (nn.Module), 'prompt-lookup', 'layer-skip', a SpecConfig "
        f"or a DraftSource; got {type(draft).__name__}"
    )
