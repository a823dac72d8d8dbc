"""Speculative decoding inside the engine: proposers and the verify step.

A running request that is decoding may carry draft tokens (``Request.spec_token_ids``) from a
proposer. The scheduler then gives it ``1 + k`` tokens in the same :class:`StepPlan` (its last
real token and the ``k`` drafts, at consecutive positions) and asks for the logits of all of
them. :func:`verify` keeps the longest prefix of drafts the target agrees with (greedy: equal to
its argmax; sampling: the exact rejection rule of Leviathan et al. / Chen et al., so outputs are
distributed exactly as without speculation) and adds one token from the target. The scheduler
rolls the request's computed tokens back to what was verified: the K/V written for rejected
drafts sit in slots that the next steps overwrite, and blocks past the verified tokens are freed.

Speculation switches itself off for a step when more than ``spec_disable_batch_size`` requests
are running: a large batch already keeps the matmuls busy, and every rejected draft row is
compute that produced nothing (vLLM's ``speculative_disable_by_batch_size`` rule).
"""

from __future__ import annotations

from typing import Any

import torch

from ..speculative.drafts import lookup_continuation
from ..speculative.sampling import rejection_accept
from .request import Request, TokenLogprobs
from .sampler import Sampler, apply_top_k_top_p

__all__ = ["PromptLookupProposer", "build_proposer", "verify"]


class PromptLookupProposer:
    """Drafts the tokens that followed the latest earlier occurrence of the request's last
    ``max_ngram .. min_ngram`` tokens (prompt lookup / n-gram speculation; no draft model)."""

    def __init__(self, num_draft_tokens: int, max_ngram: int, min_ngram: int):
        self.k, self.max_ngram, self.min_ngram = num_draft_tokens, max_ngram, min_ngram

    def propose(self, req: Request, limit: int) -> list[int]:
        k = min(self.k, limit)
        if k <= 0:
            return []
        return lookup_continuation(req.all_token_ids, k, self.max_ngram, self.min_ngram)


def build_proposer(config: Any, target: Any = None, engine_config: Any = None,
                   max_model_len: int | None = None) -> Any:
    """A proposer for a ``wrap_model(spec=...)`` config: prompt lookup, or a draft model /
    layer-skip draft with its own paged KV pool (:mod:`infopt.batching.draft`; these need the
    target model, the engine's config and ``max_model_len``)."""
    from ..speculative.config import DraftModelConfig, LayerSkipConfig, PromptLookupConfig

    if isinstance(config, PromptLookupConfig):
        return PromptLookupProposer(config.num_draft_tokens, config.max_ngram,
                                    config.min_ngram or 1)
    if isinstance(config, DraftModelConfig | LayerSkipConfig):
        if target is None or engine_config is None or max_model_len is None:
            raise ValueError(f"{type(config).__name__} needs the target model, the engine's "
                             "config and max_model_len to build its draft pool")
        from .draft import build_draft_proposer

        return build_draft_proposer(config, target, engine_config, max_model_len)
    raise TypeError(
        f"the engine cannot speculate with {type(config).__name__}; accepted: "
        "PromptLookupConfig, DraftModelConfig, LayerSkipConfig"
    )


def verify(sampler: Sampler, logits: torch.Tensor, req: Request, drafts: list[int]) -> list[int]:
    """The tokens ``req`` emits after a speculative step.

    logits ``[k + 1, V]`` fp32: row ``i`` is the target's distribution after the request's
    known tokens and ``drafts[:i]``. Returns ``drafts[:n] + [one target token]``; appends their
    :class:`TokenLogprobs` when the request asked for them.
    """
    sp = req.sampling
    k = len(drafts)
    n_out = len(req.output_token_ids)
    masked = logits.clone()
    stop = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(sampler.eos_token_ids))
    stop_ids = [t for t in stop if t < logits.shape[-1]]
    for i in range(k + 1):  # min_tokens counts the tokens before each row's choice
        if n_out + i < sp.min_tokens and stop_ids:
            masked[i, stop_ids] = float("-inf")
    if sp.temperature == 0:
        choice = masked.argmax(-1).tolist()
        n = 0
        while n < k and drafts[n] == choice[n]:
            n += 1
        tokens = drafts[:n] + [choice[n]]
    else:
        rows = [apply_top_k_top_p(masked[i] / sp.temperature, sp.top_k, sp.top_p)
                for i in range(k + 1)]
        p = torch.stack(rows).softmax(-1)[None]  # [1, k + 1, V]
        draft = torch.tensor([drafts], dtype=torch.long)
        n_t, tok = rejection_accept(draft, None, p, generator=req.generator)
        n = int(n_t)
        tokens = drafts[:n] + [int(tok)]
    if req.logprobs is not None:
        logp = logits[: len(tokens)].log_softmax(-1)
        for i, t in enumerate(tokens):
            top = ()
            if sp.logprobs:
                vals, idx = torch.topk(logp[i], sp.logprobs)
                top = tuple(zip(idx.tolist(), vals.tolist()))
            req.logprobs.append(TokenLogprobs(t, float(logp[i, t]), top))
    return tokens
