"""Draft sources: where the speculative tokens come from.

All share one small protocol (:class:`DraftSource`): ``begin`` once per generate call,
``propose(ctx, k)`` before each verification, ``accept(n_kept)`` after it so a stateful draft
can roll its KV cache back. Three implementations:

* :class:`ModelDraft` - a smaller model sharing the target's tokenizer, with its own KV cache.
* :class:`PromptLookupDraft` - n-gram lookup in the context (no model, deterministic).
* :class:`LayerSkipDraft` - the target itself with some decoder layers skipped (shared weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn as nn

from ..module_walk import find_decoder_blocks
from .cached_lm import CachedLM, build_chunk
from .sampling import NO_TOKEN, Sampling, sample


@dataclasses.dataclass
class DraftContext:
    """What a draft source may look at (read-only).

    Attributes:
        tokens: ``[B, T]`` committed tokens; row ``b`` is ``tokens[b, :lens[b]]`` (the prompt,
            left-padded to ``prompt_len``, then generated tokens).
        lens: committed length per row (padding included).
        active: rows still generating; finished rows must get ``-1`` proposals.
        prompt_valid: ``[B, prompt_len]`` bool mask of real prompt tokens, None if unpadded.
        prompt_len: padded prompt length ``P``; row ``b`` has generated ``lens[b] - P`` tokens.
        sampling: the target's token choice rule (a sampling draft should mirror it).
        generator: RNG for sampling drafts.
        pad_id: token id used for padding.
    """

    tokens: torch.Tensor
    lens: list[int]
    active: list[bool]
    prompt_valid: torch.Tensor | None
    prompt_len: int
    sampling: Sampling
    generator: torch.Generator | None = None
    pad_id: int = 0

    def row(self, b: int) -> list[int]:
        """Row ``b``'s real tokens (left padding removed) as a Python list."""
        start = 0
        if self.prompt_valid is not None:
            start = self.prompt_len - int(self.prompt_valid[b].sum())
        return self.tokens[b, start : self.lens[b]].tolist()


class Proposal(NamedTuple):
    """``tokens [B, k']`` long (``-1`` = nothing proposed there, only after a row's real
    proposals); ``probs [B, k', V]`` the processed draft distributions the tokens were sampled
    from, or None for deterministic drafts (greedy drafting or lookup: q is one-hot)."""

    tokens: torch.Tensor
    probs: torch.Tensor | None


@runtime_checkable
class DraftSource(Protocol):
    """Interface every draft source implements."""

    def begin(self, ctx: DraftContext) -> None:
        """Start a new generate call (drop any state from the previous one)."""

    def propose(self, ctx: DraftContext, k: int) -> Proposal:
        """Up to ``k`` tokens per active row continuing ``ctx.tokens[b, :ctx.lens[b]]``."""

    def accept(self, n_kept: Sequence[int]) -> None:
        """``n_kept[b]`` of row ``b``'s last proposal were committed; roll back the rest."""


def _empty(ctx: DraftContext) -> Proposal:
    return Proposal(ctx.tokens.new_full((ctx.tokens.shape[0], 0), NO_TOKEN), None)


# --- prompt lookup ----------------------------------------------------------------------------


class PromptLookupDraft:
    """Propose the continuation of the most recent earlier occurrence of the context's last
    n-gram (``max_ngram`` down to ``min_ngram`` tokens), as in prompt-lookup decoding.

    Deterministic, so q is one-hot: under sampling a token is kept with probability p(token).
    Rows without a match propose nothing (all ``-1``); then the step is plain decoding.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                f"max_ngram={max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def begin(self, ctx: DraftContext) -> None:
        pass

    def propose(self, ctx: DraftContext, k: int) -> Proposal:
        bsz = ctx.tokens.shape[0]
        if k <= 0:
            return _empty(ctx)
        rows = [
            lookup_continuation(ctx.row(b), k, self.max_ngram, self.min_ngram)
            if ctx.active[b]
            else []
            for b in range(bsz)
        ]
        width = max(len(r) for r in rows)
        if width == 0:
            return _empty(ctx)
        out = [r + [NO_TOKEN] * (width - len(r)) for r in rows]
        return Proposal(torch.tensor(out, dtype=torch.long, device=ctx.tokens.device), None)

    def accept(self, n_kept: Sequence[int]) -> None:
        pass


def lookup_continuation(seq: list[int], k: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of ``seq``'s suffix.

    Tries the longest suffix (``max_ngram`` tokens) first. Returns ``[]`` if nothing matches.
    """
    n_seq = len(seq)
    for n in range(min(max_ngram, n_seq - 1), min_ngram - 1, -1):
        suffix = seq[n_seq - n :]
        first = suffix[0]
        # Latest start i < n_seq - n (the suffix itself is excluded) with seq[i:i+n] == suffix.
        for i in range(n_seq - n - 1, -1, -1):
            if seq[i] == first and seq[i : i + n] == suffix:
                return seq[i + n : i + n + k]
    return []


# --- draft model ------------------------------------------------------------------------------


class ModelDraft:
    """A causal LM drafting ``k`` tokens autoregressively with its own KV cache.

    Greedy targets get greedy drafts (argmax of the draft's EOS-suppressed logits); sampling
    targets get tokens sampled from the draft's processed distribution (same temperature /
    top-k / top-p / EOS suppression as the target), returned as ``q``.
    """

    def __init__(self, model: nn.Module, stop_confidence: float | None = None):
        if stop_confidence is not None and not 0.0 <= stop_confidence < 1.0:
            raise ValueError(f"stop_confidence must be None or in [0, 1), got {stop_confidence!r}")
        self.model = model
        # Drafting stops for a row once the draft's probability of its own token drops below
        # this (HF's assistant_confidence_threshold): long drafts where the draft is sure, short
        # ones where it guesses. The output stays exact: only the draft length changes.
        self.stop_confidence = stop_confidence
        self.lm = CachedLM(model)
        self._lens: list[int] = []
        self._valid: list[int] = []

    def _scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def forwards(self) -> int:
        return self.lm.forwards

    def begin(self, ctx: DraftContext) -> None:
        self.lm.reset()

    def propose(self, ctx: DraftContext, k: int) -> Proposal:
        if k <= 0 or not any(ctx.active):
            return _empty(ctx)
        start = self.lm.length
        chunk, valid, m = build_chunk(
            ctx.tokens, start, ctx.lens, ctx.active, None, ctx.prompt_valid, ctx.pad_id
        )
        width = chunk.shape[1]
        keep = width - min(m) + 1  # logits needed from the earliest row's last real token on
        dev = chunk.device
        gen_base = torch.tensor([n - ctx.prompt_len for n in ctx.lens], device=dev)  # [B]
        act = torch.tensor(ctx.active, device=dev)
        toks, probs = [], []
        fed = 0  # draft tokens fed back through the draft after the first chunk
        drafting = act.clone()  # rows still drafting (confidence stop)
        with torch.inference_mode(), self._scope():
            logits = self.lm.forward(chunk, valid, keep=keep)
            at = torch.tensor(m, device=dev) - 1 - (width - keep)  # [B]
            last = logits[torch.arange(len(m), device=dev), at]  # [B, V]
            for j in range(k):
                tok, q, conf = self._choose(last, gen_base + j, ctx)
                tok = torch.where(drafting, tok, torch.full_like(tok, NO_TOKEN))
                toks.append(tok)
                if q is not None:
                    probs.append(q)
                if self.stop_confidence is not None:
                    drafting &= conf >= self.stop_confidence  # this token stays, later ones go
                    if not bool(drafting.any()):
                        break
                if j + 1 < k:
                    # Every step token is real for its row (finished rows: ignored junk), so
                    # the step is all-valid; holes from the first chunk stay masked.
                    last = self.lm.forward(tok.clamp(min=0).unsqueeze(1), None, keep=1)[:, -1]
                    fed += 1
        # Rows fed without right padding have their first `fed` drafts densely in the cache;
        # padded rows have holes after lens[b], so only their committed prefix is reusable.
        self._lens = list(ctx.lens)
        self._valid = [ctx.lens[b] + (fed if m[b] == width else 0) for b in range(len(m))]
        self._active = list(ctx.active)
        tokens = torch.stack(toks, dim=1)
        return Proposal(tokens, torch.stack(probs, dim=1) if probs else None)

    def _choose(
        self, logits: torch.Tensor, n_generated: torch.Tensor, ctx: DraftContext
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(token [B], q [B, V] when sampling, the draft's probability of token [B] when a
        confidence stop is set)``; the logits are processed once for all three."""
        want_conf = self.stop_confidence is not None
        if not ctx.sampling.do_sample:
            x = ctx.sampling.process(logits, n_generated)
            top, tok = x.max(dim=-1)
            # softmax(x)[argmax] without materialising the distribution
            conf = (top - torch.logsumexp(x, dim=-1)).exp() if want_conf else None
            return tok, None, conf
        q = ctx.sampling.probs(logits, n_generated)
        tok = sample(q, ctx.generator)
        return tok, q, q.gather(1, tok.unsqueeze(1)).squeeze(1) if want_conf else None

    def accept(self, n_kept: Sequence[int]) -> None:
        # Row b's cache is right for positions < lens + n_kept (the correction token that
        # follows differs from the draft). Keep the prefix valid for every still-active row.
        if not self._lens:
            return
        rows = [
            min(self._valid[b], self._lens[b] + n_kept[b])
            for b in range(len(self._lens))
            if self._active[b]
        ]
        if rows:
            self.lm.crop(min(rows))


# --- self-speculative layer skip ------------------------------------------------------------


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The model's decoder block list (:func:`infopt.module_walk.find_decoder_blocks`, the same
    rule as calibrated quantization uses). Returns ``(parent, attr, layers)``."""
    name, layers = find_decoder_blocks(model, "layer skipping")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, layers


def default_skip(n_layers: int, skip_every: int = 0) -> tuple[int, ...]:
    """Layers a training-free self-speculative draft skips by default.

    ``skip_every >= 2``: every ``skip_every``-th layer, never the first or the last.
    ``skip_every == 0``: a contiguous middle block of ``max(1, n // 6)`` layers. Why: without
    training, skipping scattered layers wrecks the draft (SmolLM2-135M, 30 layers: skipping
    every 2nd / 3rd layer agrees with the full model's argmax on 2% / 6% of code tokens), while
    the middle block 13..17 agrees on 76%, a few late layers 28%.
    """
    if skip_every == 0:
        size = max(1, n_layers // 6)
        start = max(1, n_layers // 2 - size // 2)
        return tuple(range(start, min(start + size, n_layers)))
    if skip_every < 2:
        raise ValueError(f"skip_every must be 0 (middle block) or >= 2, got {skip_every}")
    return tuple(i for i in range(1, n_layers - 1) if i % skip_every == skip_every - 1)


class LayerSkipDraft(ModelDraft):
    """Self-speculative draft: the target with the layers in ``skip`` bypassed.

    The draft is the same module object (no weight copy); during draft forwards the decoder's
    block list is swapped for a ``ModuleList`` of the kept blocks (and a per-layer
    ``config.layer_types`` list, if the model has one, is subset to match). Each kept block
    still indexes the KV cache with its own layer index, so the draft's separate cache simply
    leaves skipped layers empty. Layer 0 must be kept: HF caches report their length from it.
    """

    def __init__(self, target: nn.Module, skip: Sequence[int] | None = None, skip_every: int = 0):
        super().__init__(target)
        self.parent, self.attr, self.layers = find_decoder_layers(target)
        n = len(self.layers)
        skip = default_skip(n, skip_every) if not skip else tuple(sorted(set(skip)))
        bad = [i for i in skip if not 0 < i < n]
        if bad:
            raise ValueError(
                f"layer-skip: layers {bad} cannot be skipped; valid are 1..{n - 1} "
                "(layer 0 must be kept)"
            )
        self.skip = skip
        self.kept = [i for i in range(n) if i not in set(skip)]
        self._sub = nn.ModuleList([self.layers[i] for i in self.kept])

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        cfg = getattr(self.parent, "config", None)
        types = getattr(cfg, "layer_types", None)
        swap_types = isinstance(types, list | tuple) and len(types) == len(self.layers)
        # Bypass nn.Module.__setattr__ bookkeeping: this is a temporary view, not a new child.
        self.parent._modules[self.attr] = self._sub
        if swap_types:
            cfg.layer_types = [types[i] for i in self.kept]
        try:
            yield
        finally:
            self.parent._modules[self.attr] = self.layers
            if swap_types:
                cfg.layer_types = types
