"""Versioned ``wrap_model(spec=...)`` configs.

A draft model object cannot live in a JSON config, so :class:`DraftModelConfig` names a model
from the infopt registry (or a local path) and is loaded by :meth:`DraftModelConfig.build`;
to use a model object directly see :func:`infopt.speculative.attach_draft`.
"""

from __future__ import annotations

import dataclasses
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

    def build(self, target: nn.Module) -> Any:
        """A fresh :class:`~infopt.speculative.drafts.DraftSource` for ``target``."""
        raise TypeError(f"{type(self).__name__} is abstract; use a concrete spec config")


def check_draft_length(n: Any, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be an int >= 0, got {n!r}")


@register_config
@dataclasses.dataclass(frozen=True)
class PromptLookupConfig(SpecConfig):
    """Prompt-lookup (n-gram) drafting: no extra model. ``max_ngram``..``min_ngram`` is the
    suffix length searched for in the context (``min_ngram=None``: ``min(2, max_ngram)``)."""

    VERSION = 1
    max_ngram: int = 4
    min_ngram: int | None = None
    # Lookup drafts are free to produce and long copies are the point, so drafts are long and
    # the adaptive rule is off. Measured on qwen2.5-coder-1.5b, the 3 GROUNDED_PROMPTS x 64
    # tokens, 2 threads (tok/s incl. prefill): n-gram 3..1, k 8..16 adaptive 7.00; k 24 fixed
    # 8.65; k 32 fixed 8.14; n-gram 4..2, k 24 fixed 9.85 (single-token matches were mostly
    # wrong guesses that cost verification width). kw_only like the base's fields.
    num_draft_tokens: int = dataclasses.field(default=24, kw_only=True)
    max_draft_tokens: int | None = dataclasses.field(default=None, kw_only=True)
    adaptive: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_ngram is None and isinstance(self.max_ngram, int):
            object.__setattr__(self, "min_ngram", min(2, self.max_ngram))

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
        if not isinstance(self.skip_every, int) or self.skip_every == 1 or self.skip_every < 0:
            raise ValueError(
                f"skip_every must be 0 (middle block) or >= 2, got {self.skip_every!r}"
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
    # confidence stop sizes each draft, so the adaptive rule is off. Measured on
    # qwen2.5-coder-1.5b + int4 0.5b, 3 code prompts x 64 tokens, 2 threads: k=4 adaptive 7.88
    # tok/s, k=8..20 adaptive + 0.4 8.98, k=20 fixed + 0.4 11.36, k=32 fixed + 0.4 12.44.
    num_draft_tokens: int = dataclasses.field(default=20, kw_only=True)
    adaptive: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
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
        dtype = getattr(torch, self.dtype) if self.dtype else (p.dtype if p is not None else None)
        kwargs = {} if dtype is None else {"dtype": dtype}
        model, _ = load_model(self.draft_model, **kwargs)
        if p is not None:
            model = model.to(p.device)
        if self.quant is not None:
            from ..api import wrap_model

            model = wrap_model(model, quant=self.quant)
        return model.eval()

    def build(self, target: nn.Module) -> Any:
        from .decode import check_draft_model
        from .drafts import ModelDraft

        draft = self.load(target)
        check_draft_model(target, draft)
        return ModelDraft(draft, self.stop_confidence)


ALIASES = {"prompt_lookup": PromptLookupConfig, "layer_skip": LayerSkipConfig}


def alias_config(name: str) -> SpecConfig:
    """``"prompt_lookup"`` / ``"layer_skip"`` -> the default config of that kind."""
    factory = ALIASES.get(name)
    if factory is None:
        raise ValueError(
            f"draft={name!r} is not recognised; accepted strings: {', '.join(sorted(ALIASES))} "
            "(or pass a draft model, a SpecConfig or a DraftSource)"
        )
    return factory()
