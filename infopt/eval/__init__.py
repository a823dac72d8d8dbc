"""Quality measurement: evaluation texts, perplexity and reference-vs-candidate agreement.

Typical use::

    from infopt.eval import compare, perplexity

    perplexity(model, tok)                  # default text: Lee news corpus, 4096 tokens
    compare(reference, optimized, tok).to_dict()
    compare_through_cache(reference, kv_wrapped, tok)   # quality as a KV cache is read
    compare_domains(reference, optimized, tok)          # prose / code / chat, one result each
    evaluate_humaneval(model, tok, limit=20).pass_at_1  # does generated code still pass?

See ``docs/eval.md`` for the definitions and reference numbers.
"""

from .domains import DOMAINS, DomainQuality, compare_domains, domain_text, perplexity_domains
from .humaneval import HumanEvalResult, evaluate_humaneval
from .metrics import (
    CompareResult,
    Divergence,
    PerplexityResult,
    compare,
    generate_greedy,
    greedy_agreement,
    perplexity,
    tokenize_text,
    window_spans,
)
from .texts import (
    CODE_PROMPTS,
    DEFAULT_TEXT,
    GROUNDED_PROMPTS,
    LEE_SHA256,
    TEXT_NAMES,
    cache_dir,
    default_text,
    eval_prompts,
    fetch_lee,
    get_text,
    lee_articles,
    pydoc_paragraphs,
)
from .through_cache import CacheCompareResult, compare_through_cache

__all__ = [
    "CODE_PROMPTS",
    "DEFAULT_TEXT",
    "DOMAINS",
    "GROUNDED_PROMPTS",
    "LEE_SHA256",
    "TEXT_NAMES",
    "CacheCompareResult",
    "CompareResult",
    "Divergence",
    "DomainQuality",
    "HumanEvalResult",
    "PerplexityResult",
    "cache_dir",
    "compare",
    "compare_domains",
    "compare_through_cache",
    "default_text",
    "domain_text",
    "eval_prompts",
    "evaluate_humaneval",
    "fetch_lee",
    "generate_greedy",
    "get_text",
    "greedy_agreement",
    "lee_articles",
    "perplexity",
    "perplexity_domains",
    "pydoc_paragraphs",
    "tokenize_text",
    "window_spans",
]
