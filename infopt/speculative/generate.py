"""Entry points: :func:`generate`, ``wrap_model(spec=...)`` and :func:`attach_draft`.

Wrapping replaces the *instance's* ``generate`` (never the class) with one that speculates and
accepts the common ``model.generate`` keywords; anything else raises instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..options import (
    clear_technique_state,
    register_check,
    register_handler,
    register_option,
    set_technique_state,
    technique_state,
)
from .config import ALIASES, DEPRECATED_ALIASES, SpecConfig, canonical_alias, check_draft_length
from .decode import SpecOutput, SpecStats, as_draft_source, check_draft_model, speculative_decode
from .drafts import DraftSource, ModelDraft
from .sampling import Sampling

#: Speculative decoding's entry in the model's state object (:class:`infopt.options.WrapState`).
SPEC_STATE = "spec"


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _check_inputs(input_ids: Any, attention_mask: Any) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            "input_ids must be a 2-D [batch, prompt_len] LongTensor, got "
            f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one prompt token per row")
    if attention_mask is None:
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    m = attention_mask.bool()
    # Left padding only: once a row's real tokens start, they must run to the end.
    if bool((m[:, :-1] & ~m[:, 1:]).any()):
        raise ValueError("attention_mask must be left-padded (zeros only before the prompt)")
    if not bool(m[:, -1].all()):
        raise ValueError("attention_mask: every row needs at least its last token unmasked")


def generate(
    target: nn.Module,
    input_ids: torch.Tensor,
    draft: Any,
    max_new_tokens: int = 32,
    *,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_draft_tokens: int | None = None,
    max_draft_tokens: int | None = None,
    adaptive: bool | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    streamer: Any = None,
) -> SpecOutput:
    """Speculative decoding of ``target``; greedy output equals the target's own greedy decode,
    sampled output is distributed exactly as the target's processed distribution.

    Args:
        target: HF causal LM.
        input_ids: ``[B, P]`` long prompts (left-padded with ``attention_mask`` for B > 1).
        draft: a draft model sharing the tokenizer, ``"prompt-lookup"``, ``"layer-skip"``, a
            :class:`SpecConfig`, or any :class:`DraftSource`.
        max_new_tokens / min_new_tokens: HF semantics; EOS is suppressed (in target and draft
            distributions alike) until ``min_new_tokens`` tokens exist.
        do_sample, temperature, top_k, top_p: HF semantics, applied in that order.
        num_draft_tokens: initial draft length (default: the config's, else 4). 0 = no drafts.
        max_draft_tokens, adaptive: adaptive draft length bounds (default: config's / 2k, True).
        eos_token_id: stop ids; None = ``target.generation_config.eos_token_id``, ``[]`` = none.
        pad_token_id: fills finished rows; None = generation config's, else first EOS, else 0.
        generator: RNG for sampling (and sampled drafts).
        streamer: HF-style streamer (batch 1): ``put(prompt)``, ``put(chunk)`` per step, ``end()``.

    Returns :class:`SpecOutput` with ``sequences [B, P + new]`` and ``stats``.
    """
    _check_inputs(input_ids, attention_mask)
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    gen_cfg = getattr(target, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
    eos = _eos_ids(eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    sampling = Sampling(do_sample, temperature, top_k, top_p, eos, min_new_tokens)
    cfg = draft if isinstance(draft, SpecConfig) else None
    if isinstance(draft, str):
        draft = canonical_alias(draft)
        if draft in ALIASES:
            cfg = ALIASES[draft]()
    if num_draft_tokens is None:
        num_draft_tokens = cfg.num_draft_tokens if cfg else 4
    if max_draft_tokens is None and cfg is not None:
        max_draft_tokens = cfg.max_draft_tokens
    if adaptive is None:
        adaptive = cfg.adaptive if cfg else True
    check_draft_length(num_draft_tokens, "num_draft_tokens")
    if max_draft_tokens is not None:
        check_draft_length(max_draft_tokens, "max_draft_tokens")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("streamer is only supported for batch size 1 (like HF streamers)")
    source = as_draft_source(target, cfg if cfg is not None else draft)
    return speculative_decode(
        target,
        input_ids,
        source,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        attention_mask=attention_mask,
        num_draft_tokens=num_draft_tokens,
        max_draft_tokens=max_draft_tokens,
        adaptive=adaptive,
        pad_token_id=int(pad_token_id),
        streamer=streamer,
        generator=generator,
    )


# --- model.generate integration ---------------------------------------------------------------


@dataclasses.dataclass
class SpecState:
    """What a speculating model carries (a plain object, so the draft is no submodule)."""

    source: DraftSource
    num_draft_tokens: int
    max_draft_tokens: int | None
    adaptive: bool
    original_generate: Callable[..., Any] | None
    last_stats: SpecStats | None = None


# Keywords accepted only at their neutral value (anything else changes what generate does).
_NEUTRAL = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "use_cache": True,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "synced_gpus": False,
}
_EMPTY_OK = ("logits_processor", "stopping_criteria", "assistant_model", "generation_config")
_SUPPORTED = (
    "input_ids",
    "attention_mask",
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "streamer",
    "generator",
)
# generation_config fields whose non-neutral values would change HF's output: refuse them.
_GEN_CFG_NEUTRAL = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_length": (None, 0),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "num_beams": (None, 1),
}


def _check_generation_config(gen_cfg: Any) -> None:
    for name, ok in _GEN_CFG_NEUTRAL.items():
        v = getattr(gen_cfg, name, None)
        if v not in ok and v != []:
            raise NotImplementedError(
                f"speculative generate does not implement generation_config.{name}={v!r}; "
                "reset it or call the unwrapped model (infopt.speculative.detach)"
            )


def _make_generate(model: nn.Module, state: SpecState) -> Callable[..., torch.Tensor]:
    def spec_generate(inputs: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Speculative ``generate`` (infopt). Returns ``[B, P + new]`` like HF's default."""
        for name in list(kwargs):
            if name in _NEUTRAL:
                if kwargs[name] is not None and kwargs[name] != _NEUTRAL[name]:
                    raise NotImplementedError(
                        f"speculative generate does not support {name}={kwargs[name]!r}"
                    )
                kwargs.pop(name)
            elif name in _EMPTY_OK:
                if kwargs[name]:
                    raise NotImplementedError(f"speculative generate does not support {name}=")
                kwargs.pop(name)
            elif name not in _SUPPORTED:
                raise TypeError(
                    f"speculative generate got an unsupported keyword {name!r}; supported: "
                    f"{', '.join(_SUPPORTED)}"
                )
        input_ids = kwargs.pop("input_ids", None)
        if inputs is not None:
            if input_ids is not None:
                raise ValueError("pass the prompt once: positionally or as input_ids=")
            input_ids = inputs
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        gen_cfg = model.generation_config
        _check_generation_config(gen_cfg)
        max_new = kwargs.pop("max_new_tokens", None)
        max_length = kwargs.pop("max_length", None)
        if max_new is None:
            max_new = getattr(gen_cfg, "max_new_tokens", None)
        if max_new is None:
            max_length = max_length or getattr(gen_cfg, "max_length", None) or 20
            max_new = max(0, max_length - input_ids.shape[1])
        do_sample = kwargs.pop("do_sample", None)
        do_sample = bool(gen_cfg.do_sample) if do_sample is None else do_sample

        def pick(name: str, default: Any) -> Any:
            v = kwargs.pop(name, None)
            return v if v is not None else getattr(gen_cfg, name, default)

        temperature, top_k = pick("temperature", 1.0), pick("top_k", None)
        top_p = pick("top_p", None)
        min_new = pick("min_new_tokens", 0) or 0
        out = generate(
            model,
            input_ids,
            state.source,
            max_new,
            min_new_tokens=min_new,
            do_sample=do_sample,
            # HF ignores the warpers when greedy; so do we (and do not validate them then).
            temperature=temperature if do_sample else 1.0,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            num_draft_tokens=state.num_draft_tokens,
            max_draft_tokens=state.max_draft_tokens,
            adaptive=state.adaptive,
            eos_token_id=kwargs.pop("eos_token_id", None),
            pad_token_id=kwargs.pop("pad_token_id", None),
            attention_mask=kwargs.pop("attention_mask", None),
            generator=kwargs.pop("generator", None),
            streamer=kwargs.pop("streamer", None),
        )
        state.last_stats = out.stats
        return out.sequences

    # Marks a generate whose min_new_tokens is a cheap masked fill and which takes no
    # logits_processor (infopt.bench.timing picks its EOS suppression by this).
    spec_generate.infopt_native_min_new_tokens = True  # type: ignore[attr-defined]
    return spec_generate


def _install(model: nn.Module, source: DraftSource, cfg: SpecConfig) -> None:
    own = model.__dict__.get("generate")
    state = technique_state(model, SPEC_STATE)
    if own is not None and state is None:
        raise RuntimeError(
            "model.generate is already replaced on this instance by something else; "
            "speculative decoding cannot wrap it (apply spec= alone or last)"
        )
    original = state.original_generate if state is not None else None
    state = SpecState(source, cfg.num_draft_tokens, cfg.max_draft_tokens, cfg.adaptive, original)
    set_technique_state(model, SPEC_STATE, state)
    model.generate = _make_generate(model, state)


def attach_draft(
    model: nn.Module,
    draft_model: nn.Module,
    *,
    num_draft_tokens: int = 4,
    max_draft_tokens: int | None = None,
    adaptive: bool = True,
) -> nn.Module:
    """Make ``model.generate`` speculate with ``draft_model`` (same tokenizer). In place.

    The draft is held in a plain attribute, not as a submodule: ``model.state_dict()`` and
    ``model.parameters()`` are unchanged. Not recorded in ``applied_configs`` (a model object
    is not a config); use ``wrap_model(model, spec=DraftModelConfig(name))`` for that.
    """
    check_draft_model(model, draft_model)
    cfg = SpecConfig(
        num_draft_tokens=num_draft_tokens, max_draft_tokens=max_draft_tokens, adaptive=adaptive
    )
    _install(model, ModelDraft(draft_model), cfg)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo ``wrap_model(spec=...)`` / :func:`attach_draft`: ``model.generate`` is HF's again."""
    if clear_technique_state(model, SPEC_STATE) is not None:
        model.__dict__.pop("generate", None)
    return model


def last_stats(model: nn.Module) -> SpecStats | None:
    """Statistics of the last speculative ``model.generate`` call (None before the first)."""
    state = technique_state(model, SPEC_STATE)
    return None if state is None else state.last_stats


register_option(
    "spec",
    SpecConfig,
    ALIASES,
    description="speculative decoding in model.generate (prompt lookup, layer skip, draft model)",
    deprecated=DEPRECATED_ALIASES,
)


@register_handler(SpecConfig)
def _apply_spec(model: nn.Module, config: SpecConfig) -> None:
    # A model whose generate already runs on the batching engine (wrap_model(kv=...)) takes
    # the drafts inside that engine: one generation loop, not a second generate wrapper.
    attach = getattr(technique_state(model, "kv"), "attach_spec", None)
    if attach is not None:
        attach(config)
        return
    _install(model, config.build(model), config)


@register_check(SpecConfig)
def _check_spec(model: nn.Module, config: SpecConfig) -> None:
    missing = [a for a in ("generate", "generation_config", "config") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"spec=... needs a transformers causal LM (generate, generation_config, config); "
            f"{type(model).__name__} has no {', '.join(missing)}"
        )
    check = getattr(config, "check", None)
    if callable(check):
        check(model)
