"""Quality measurement: evaluation texts, perplexity and reference-vs-candidate agreement.

Typical use::

    from infopt.eval import compare, perplexity

    perplexity(model, tok)                  # default text: Lee news corpus, 4096 tokens
    compare(reference, optimized, tok).to_dict()
    compare_through_cache(reference, kv_wrapped, tok)   # quality as a KV cache is read

See ``docs/eval.md`` for the definitions and reference numbers.
"""

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
    "GROUNDED_PROMPTS",
    "LEE_SHA256",
    "TEXT_NAMES",
    "CacheCompareResult",
    "CompareResult",
    "Divergence",
    "PerplexityResult",
    "cache_dir",
    "compare",
    "compare_through_cache",
    "default_text",
    "eval_prompts",
    "fetch_lee",
    "generate_greedy",
    "get_text",
    "greedy_agreement",
    "lee_articles",
    "perplexity",
    "pydoc_paragraphs",
    "tokenize_text",
    "window_spans",
]
