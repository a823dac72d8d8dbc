"""Exact speculative decoding: draft proposal -> one batched target verification -> acceptance.

    from infopt import speculative
    out = speculative.generate(target, input_ids, draft="prompt-lookup", max_new_tokens=64)
    out.sequences, out.stats.to_dict()

    infopt.wrap_model(model, spec="layer-skip")        # model.generate now speculates
    speculative.attach_draft(model, draft_model)       # ... or with a draft model object

Greedy output is token-identical to the target's greedy decode (up to floating-point ties: the
verification pass computes several positions at once); sampled output follows the target's
processed distribution exactly (rejection sampling). See ``docs/speculative.md``.
"""

from .cached_lm import CachedLM, crop_cache
from .config import DraftModelConfig, LayerSkipConfig, PromptLookupConfig, SpecConfig
from .decode import SpecOutput, SpecStats, speculative_decode
from .drafts import (
    DraftContext,
    DraftSource,
    LayerSkipDraft,
    ModelDraft,
    PromptLookupDraft,
    Proposal,
    find_decoder_layers,
    lookup_continuation,
)
from .generate import attach_draft, detach, generate, last_stats
from .sampling import Sampling, greedy_accept, rejection_accept

__all__ = [
    "CachedLM",
    "DraftContext",
    "DraftModelConfig",
    "DraftSource",
    "LayerSkipConfig",
    "LayerSkipDraft",
    "ModelDraft",
    "PromptLookupConfig",
    "PromptLookupDraft",
    "Proposal",
    "Sampling",
    "SpecConfig",
    "SpecOutput",
    "SpecStats",
    "attach_draft",
    "crop_cache",
    "detach",
    "find_decoder_layers",
    "generate",
    "greedy_accept",
    "last_stats",
    "lookup_continuation",
    "rejection_accept",
    "speculative_decode",
]
