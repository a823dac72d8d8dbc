"""Versioned ``wrap_model(spec=...)`` configs.

A draft model object cannot live in a JSON config, so :class:`DraftModelConfig` names a model
from the infopt registry (or a local path) and is loaded by :meth:`DraftModelConfig.build`;
to use a model object directly see :func:`infopt.speculative.attach_draft`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..config import InfoptConfig, register_config


@register_config
@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecConfig(InfoptConfig):
    """Base of the speculative-decoding configs (the ``spec=`` option).

    Attributes:
        num_draft_tokens: initial draft length ``k`` (>= 0; 0 = plain decoding).
        max_draft_tokens: adaptive upper bound (None: ``2 * num_draft_tokens``).
        adaptive: grow ``k`` after full acceptance, shrink after early rejection.
    """

    VERSION = 1
    num_draft_tokens: int = 4
    max_draft_tokens: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        check_draft_length(self.num_draft_tokens, "num_draft_tokens")
        if self.max_draft_tokens is not None:
            check_draft_length(self.max_draft_tokens, "max_draft_tokens")
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {self.adaptive!r}")

    def build(self, target: nn.Module) -> Any:
        """A fresh :class:`~infopt.speculative.drafts.DraftSource` for ``target``."""
        raise TypeError(f"{type(self).__name__} is abstract; use a concrete spec config")


def check_draft_length(n: Any, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be an int >= 0, got {n!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: ``DraftModelConfig.dtype`` names -> dtypes (a fixed table: the name may come from a file).
DRAFT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register_config
@dataclasses.dataclass(frozen=True)
class PromptLookupConfig(SpecConfig):
    """Prompt-lookup (n-gram) drafting: no extra model. ``max_ngram``..``min_ngram`` is the
    suffix length searched for in the context (``min_ngram=None``: ``min(2, max_ngram)``)."""

    VERSION = 1
    max_ngram: int = 4
    min_ngram: int | None = None
    # Lookup drafts are free to produce and long copies are the point, so drafts are long and
    # the adaptive rule is off; n-grams start at 2 because single-token matches are mostly wrong
    # guesses that widen every verification pass (sweep: docs/results.md, "Draft length
    # sweeps"). kw_only like the base's fields.
    num_draft_tokens: int = dataclasses.field(default=24, kw_only=True)
    max_draft_tokens: int | None = dataclasses.field(default=None, kw_only=True)
    adaptive: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.max_ngram) or self.max_ngram < 1:
            raise ValueError(f"max_ngram must be an int >= 1, got {self.max_ngram!r}")
        if self.min_ngram is None:
            object.__setattr__(self, "min_ngram", min(2, self.max_ngram))
        elif not _is_int(self.min_ngram) or not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(
                f"min_ngram must be None or an int in 1..max_ngram={self.max_ngram}, got "
                f"{self.min_ngram!r}"
            )

    def build(self, target: nn.Module) -> Any:
        from .drafts import PromptLookupDraft

        return PromptLookupDraft(self.max_ngram, self.min_ngram)


@register_config
@dataclasses.dataclass(frozen=True)
class LayerSkipConfig(SpecConfig):
    """Self-speculative drafting with the target's own layers minus ``skip`` (0-based decoder
    layer indices). Empty ``skip``: ``skip_every=0`` skips a middle block of ``n // 6`` layers,
    ``skip_every >= 2`` every ``skip_every``-th layer except the first and the last (see
    :func:`infopt.speculative.drafts.default_skip`)."""

    VERSION = 1
    skip: tuple[int, ...] = ()
    skip_every: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.skip_every) or self.skip_every == 1 or self.skip_every < 0:
            raise ValueError(
                f"skip_every must be 0 (middle block) or >= 2, got {self.skip_every!r}"
            )
        skip = self.skip
        if isinstance(skip, list):  # from JSON
            skip = tuple(skip)
        # Layer 0 must be kept (HF caches report their length from it); the upper bound
        # depends on the model and is checked when the config is applied.
        if not isinstance(skip, tuple) or not all(_is_int(i) and i >= 1 for i in skip):
            raise ValueError(
                f"skip must be a tuple of decoder layer indices >= 1 (layer 0 is always kept), "
                f"got {self.skip!r}"
            )
        object.__setattr__(self, "skip", skip)

    def check(self, target: nn.Module) -> None:
        """Raise unless ``target`` has a decoder block list these layer indices fit."""
        from .drafts import find_decoder_layers

        n = len(find_decoder_layers(target)[2])
        bad = [i for i in self.skip if i >= n]
        if bad:
            raise ValueError(
                f"LayerSkipConfig.skip: layers {bad} do not exist; {type(target).__name__} has "
                f"{n} decoder layers, so valid indices are 1..{n - 1}"
            )

    def build(self, target: nn.Module) -> Any:
        from .drafts import LayerSkipDraft

        return LayerSkipDraft(target, self.skip, self.skip_every)


@register_config
@dataclasses.dataclass(frozen=True)
class DraftModelConfig(SpecConfig):
    """A separate draft model, by infopt registry name (``load_model`` names) or local path.

    ``dtype`` (e.g. ``"bfloat16"``) defaults to the target's parameter dtype. ``quant`` (a
    ``wrap_model(quant=...)`` alias such as ``"int8"`` / ``"int4"``, or a
    :class:`~infopt.quant.QuantConfig`) quantizes the *draft* after loading: a cheaper draft
    makes every speculation step cheaper, and the output stays exactly the target's (the target
    verifies every token); only the acceptance rate can change. ``stop_confidence`` (None or in
    [0, 1), default 0.4 like HF's ``assistant_confidence_threshold``) ends a row's draft after a
    token the draft gives less than that probability, so drafts can be long (default 20).
    """

    VERSION = 1
    draft_model: str = "qwen2.5-coder-0.5b"
    dtype: str | None = None
    quant: Any = None
    stop_confidence: float | None = 0.4
    # HF assisted generation's defaults (20 draft tokens, stop below 0.4 confidence): the
    # confidence stop sizes each draft, so the adaptive rule is off; long confidence-stopped
    # drafts beat the adaptive rule on the Qwen pair (sweep: docs/results.md, "Draft length
    # sweeps").
    num_draft_tokens: int = dataclasses.field(default=20, kw_only=True)
    adaptive: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.draft_model, str) or not self.draft_model:
            raise ValueError(
                "draft_model must be a non-empty string (an infopt registry name, a local "
                f"directory or an 'org/name' hub id), got {self.draft_model!r}"
            )
        if self.dtype is not None and self.dtype not in DRAFT_DTYPES:
            raise ValueError(
                f"dtype must be None or one of {sorted(DRAFT_DTYPES)}, got {self.dtype!r}"
            )
        if self.stop_confidence is not None and not (
            isinstance(self.stop_confidence, (int, float))
            and not isinstance(self.stop_confidence, bool)
            and 0.0 <= self.stop_confidence < 1.0
        ):
            raise ValueError(
                f"stop_confidence must be None or a number in [0, 1), got {self.stop_confidence!r}"
            )
        if self.quant is not None:
            from ..quant import ALIASES as QUANT_ALIASES
            from ..quant import QuantConfig

            if not isinstance(self.quant, QuantConfig) and self.quant not in QUANT_ALIASES:
                raise ValueError(
                    f"quant must be None, a QuantConfig or one of {sorted(QUANT_ALIASES)}, "
                    f"got {self.quant!r}"
                )

    def load(self, target: nn.Module) -> nn.Module:
        from ..models import load_model

        p = next(target.parameters(), None)
        dtype = DRAFT_DTYPES[self.dtype] if self.dtype else (p.dtype if p is not None else None)
        kwargs = {} if dtype is None else {"dtype": dtype}
        model, _ = load_model(self.draft_model, **kwargs)
        if p is not None:
            model = model.to(p.device)
        if self.quant is not None:
            from ..quant import quantize_model

            model = quantize_model(model, self.quant)
        return model.eval()

    def build(self, target: nn.Module) -> Any:
        from .decode import check_draft_model
        from .drafts import ModelDraft

        draft = self.load(target)
        check_draft_model(target, draft)
        return ModelDraft(draft, self.stop_confidence)


ALIASES = {"prompt-lookup": PromptLookupConfig, "layer-skip": LayerSkipConfig}
#: Spellings from before every alias used hyphens; accepted with a DeprecationWarning.
DEPRECATED_ALIASES = {"prompt_lookup": "prompt-lookup", "layer_skip": "layer-skip"}


def canonical_alias(name: str, stacklevel: int = 3) -> str:
    """``name`` with a deprecated spelling replaced by the current one (warning once per
    call site, as DeprecationWarnings do)."""
    new = DEPRECATED_ALIASES.get(name)
    if new is None:
        return name
    warnings.warn(f"draft={name!r} is deprecated; use {new!r}", DeprecationWarning,
                  stacklevel=stacklevel)
    return new


def alias_config(name: str) -> SpecConfig:
    """``"prompt-lookup"`` / ``"layer-skip"`` -> the default config of that kind."""
    factory = ALIASES.get(canonical_alias(name))
    if factory is None:
        raise ValueError(
            f"draft={name!r} is not recognised; accepted strings: {', '.join(sorted(ALIASES))} "
            "(or pass a draft model, a SpecConfig or a DraftSource)"
        )
    return factory()
