"""Quality of a KV cache *as it is read*: teacher-forced, chunked decoding through the cache.

:func:`infopt.eval.perplexity` / :func:`infopt.eval.compare` run one ``use_cache=False`` forward
per window, which never touches a KV cache (a wrapped model falls back to HF's sdpa there), so
they cannot see what an int8/fp8 pool or an eviction policy does. :func:`compare_through_cache`
feeds each window through the model's cache in chunks (``first_chunk`` tokens, then ``chunk`` at
a time), so every later chunk attends to what the cache *stored*: quantized K/V, or only the
tokens a policy kept. The reference runs the same chunks over HF's ``DynamicCache`` (or its own
paged cache), and the two are compared position by position by the same code as ``compare``
(:class:`~infopt.eval.metrics.Divergence`: fp32 NLL, ``KL(P_ref || P_cand)``, top-1 agreement).

Windowing matches :func:`infopt.eval.window_spans` (non-overlapping windows, the first token of
each unscored), so ``ppl_ref`` equals ``compare``'s up to the chunking's float reordering.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .metrics import Divergence, tokenize_text, window_spans

__all__ = ["CacheCompareResult", "compare_through_cache", "new_cache"]


@dataclasses.dataclass(frozen=True)
class CacheCompareResult:
    """``ppl_rel_increase = ppl_cand / ppl_ref - 1``; KL in nats over scored positions;
    ``cand_max_cached_tokens``: most tokens the candidate's cache held at once (paged caches;
    ``None`` otherwise); ``cand_max_allocated_bytes``: most K/V bytes its blocks held."""

    ppl_ref: float
    ppl_cand: float
    ppl_rel_increase: float
    nll_ref: float
    nll_cand: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    n_tokens: int
    n_windows: int
    window: int
    chunk: int
    first_chunk: int
    cand_max_cached_tokens: int | None
    cand_max_allocated_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def new_cache(model: Any, tokens_hint: int) -> Any:
    """A fresh cache for ``model``: its paged cache if it is wrapped with ``kv=...`` (its own
    private pool, even with prefix caching), else HF's ``DynamicCache``."""
    from ..kvcache.hf import kv_state
    from ..kvcache.paged_cache import PagedCache

    state = kv_state(model)
    if state is not None:
        return PagedCache.from_model(model, state.config, tokens_hint=tokens_hint)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _chunks(n: int, first: int, chunk: int) -> list[tuple[int, int]]:
    out, a = [], 0
    while a < n:
        b = min(n, a + (first if a == 0 else chunk))
        out.append((a, b))
        a = b
    return out


def compare_through_cache(
    reference: Any,
    candidate: Any,
    tokenizer: Any,
    text: Any = None,
    *,
    max_tokens: int = 2048,
    window: int = 512,
    chunk: int = 16,
    first_chunk: int = 1,
) -> CacheCompareResult:
    """Score the first ``max_tokens`` tokens of ``text`` (default: the default eval text) with
    both models, window by window, each window decoded through a fresh cache in chunks.

    Args:
        reference, candidate: HF causal LMs; a model wrapped with ``kv=...`` uses its paged
            cache, an unwrapped one HF's ``DynamicCache``.
        window: tokens per window (each starts from an empty cache).
        chunk, first_chunk: tokens per forward; ``first_chunk=1`` makes every position after
            the first attend through the stored cache (a first chunk from an empty cache runs
            on its fresh states).
    """
    for name, v in (("window", window), ("chunk", chunk), ("first_chunk", first_chunk)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if text is None:
        from .texts import default_text

        text = default_text()
    ids = tokenize_text(tokenizer, text, max_tokens)
    dev = next(reference.parameters()).device
    div = Divergence()
    max_tokens_held: int | None = None
    max_bytes: int | None = None
    spans = window_spans(ids.numel(), window)
    with torch.inference_mode():
        for begin, start, end in spans:
            x = ids[begin:end].to(dev)
            caches = [new_cache(m, end - begin) for m in (reference, candidate)]
            for a, b in _chunks(end - begin, first_chunk, chunk):
                lo = max(a, start - begin - 1)  # first logit row that predicts a scored token
                hi = min(b, end - begin - 1)
                logits = []
                for m, c in zip((reference, candidate), caches):
                    out = m(input_ids=x[None, a:b], past_key_values=c, use_cache=True)
                    logits.append(out.logits[0, lo - a : hi - a])
                held = getattr(caches[1], "seq_lens", None)
                if held is not None:
                    max_tokens_held = max(max_tokens_held or 0, sum(held()))
                    alloc = caches[1].memory_stats()["allocated_bytes"]
                    max_bytes = max(max_bytes or 0, int(alloc))
                if hi <= lo:
                    continue
                div.add(logits[0], logits[1], x[lo + 1 : hi + 1])
    return CacheCompareResult(
        **div.summary(),
        n_windows=len(spans),
        window=window,
        chunk=chunk,
        first_chunk=first_chunk,
        cand_max_cached_tokens=max_tokens_held,
        cand_max_allocated_bytes=max_bytes,
    )
