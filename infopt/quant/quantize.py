"""``quantize_model``: the full-featured entry point (``wrap_model(quant=...)`` calls it).

Picks the target linears (``include`` / ``skip`` patterns), gets calibration token ids when
the method needs them, runs the method of the config type's :class:`QuantHandler` and records
the config on the model for :func:`~infopt.quant.save_quantized`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..module_walk import matches_any, replace_modules
from ..options import (
    parse_registered_option,
    register_check,
    register_handler,
    set_technique_state,
    technique_state,
    wrap_inputs,
)
from .blockwise import BlockFn, run_sequential
from .calib_cache import CalibrationEntry, calib_cache_enabled
from .calib_data import (
    calibration_ids,
    calibration_ids_from,
    check_calibration_source,
    resolve_tokenizer,
)
from .config import QuantConfig
from .hugepages import hugepage_copy
from .qlinear import Int8Linear, QuantizedLinear
from .structure import find_blocks

__all__ = [
    "QuantHandler",
    "check_finite_weights",
    "check_quantizable",
    "is_quantized",
    "quant_config_of",
    "quant_handler_for",
    "quantize_model",
    "refuse_save_pretrained",
    "register_quant_handler",
    "select_targets",
    "set_quant_state",
]

#: The quantization's entry in the model's state object (:class:`infopt.options.WrapState`).
QUANT_STATE = "quant"
_GLOB_CHARS = set("*?[")


def is_quantized(model: nn.Module) -> bool:
    """True if any submodule is an infopt quantized linear."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The config ``model`` was quantized with (None if it was not quantized by infopt)."""
    config = technique_state(model, QUANT_STATE)
    return config if isinstance(config, QuantConfig) else None


def set_quant_state(model: nn.Module, config: QuantConfig) -> None:
    """Record on ``model`` (in its :class:`~infopt.options.WrapState`) that it was quantized
    with ``config``."""
    set_technique_state(model, QUANT_STATE, config)


def select_targets(model: nn.Module, config: QuantConfig) -> list[str]:
    """Dotted names of the ``nn.Linear`` modules to quantize, in module order.

    Raises:
        ValueError: a literal include pattern names no module, or nothing is selected.
        TypeError: a literal include pattern names a module that is not ``nn.Linear``.
    """
    named = dict(model.named_modules())
    for pattern in config.include:
        if _GLOB_CHARS & set(pattern):
            continue
        if pattern not in named:
            raise ValueError(f"include pattern {pattern!r} names no module of the model")
        if not isinstance(named[pattern], nn.Linear):
            raise TypeError(
                f"include pattern {pattern!r} selects a {type(named[pattern]).__name__}; only "
                "nn.Linear modules can be quantized"
            )
    targets = [
        n for n, m in named.items()
        if n and isinstance(m, nn.Linear) and matches_any(n, config.include)
        and not matches_any(n, config.skip)
    ]
    if not targets:
        raise ValueError(
            f"no nn.Linear matches include={list(config.include)} minus skip={list(config.skip)}"
        )
    return targets


def check_quantizable(
    model: nn.Module, config: QuantConfig, *, check_finite: bool = True
) -> tuple[list[str], str | None]:
    """Everything :func:`quantize_model` checks before changing the model; returns ``(target
    linear names, output head name for lm_head="int8" or None)``. Changes nothing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_quantized(model) or quant_config_of(model) is not None:
        raise ValueError(
            "model is already quantized (it contains infopt quantized linears); quantize the "
            "original floating-point model instead"
        )
    targets = select_targets(model, config)
    head = _output_head_name(model, targets) if config.lm_head is not None else None
    if check_finite:
        check_finite_weights(model, targets + ([head] if head is not None else []))
    return targets, head


class QuantHandler:
    """How one quantization config type quantizes a model (after torchao's
    ``register_quantize_module_handler``): one instance per config type, registered with
    :func:`register_quant_handler` and found through the config's MRO. A new format is a
    config class, a handler and a :class:`~infopt.quant.qlinear.QuantizedLinear` subclass.
    The formats infopt ships are in :mod:`infopt.quant.handlers`.
    """

    def quantize_linear(self, linear: nn.Linear, config: QuantConfig) -> nn.Module:
        """The quantized replacement of one ``nn.Linear`` without calibration (RTN; also the
        target linears a calibrated method leaves outside the repeated blocks)."""
        raise NotImplementedError

    def calibration(self, config: QuantConfig) -> tuple[BlockFn, str] | None:
        """``(block method, its name for the progress bar)`` for a config that needs
        calibration activations (:func:`~infopt.quant.blockwise.run_sequential` runs it block
        by block), ``None`` for a calibration-free one."""
        return None

    def finish(self, model: nn.Module, config: QuantConfig) -> None:
        """Called once every target is replaced (e.g. int4's activation mode)."""

    # wrap_model(quant=...): the handler and check registered for this config type.
    def apply(self, model: nn.Module, config: QuantConfig) -> None:
        # wrap_model(..., tokenizer=, calib_data=) hand calibration in; without them calibrated
        # methods find a tokenizer in the model's local directory.
        inputs = wrap_inputs()
        quantize_model(model, config, tokenizer=inputs.tokenizer, calib_data=inputs.calib_data)

    def check(self, model: nn.Module, config: QuantConfig) -> None:
        check_quantizable(model, config)
        if config.calibrated:
            find_blocks(model)  # calibration runs block by block
            inputs = wrap_inputs()
            if inputs.tokenizer is None and not _is_token_ids(inputs.calib_data):
                check_calibration_source(model)


def _is_token_ids(data: Any) -> bool:
    """Calibration data that needs no tokenizer: token ids (not a text, texts or a path)."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return False
    return not (isinstance(data, (list, tuple)) and data and isinstance(data[0], str))


_QUANT_HANDLERS: dict[type[QuantConfig], QuantHandler] = {}


def register_quant_handler(
    config_type: type[QuantConfig],
) -> Callable[[type[QuantHandler]], type[QuantHandler]]:
    """Class decorator: ``config_type`` (and its subclasses) quantize through an instance of
    the decorated :class:`QuantHandler`, which is also ``wrap_model(quant=...)``'s handler and
    check for that type."""

    def deco(cls: type[QuantHandler]) -> type[QuantHandler]:
        if config_type in _QUANT_HANDLERS:
            raise ValueError(f"a quant handler for {config_type.__name__} is already registered")
        handler = cls()
        _QUANT_HANDLERS[config_type] = handler
        register_handler(config_type)(handler.apply)
        register_check(config_type)(handler.check)
        return cls

    return deco


def quant_handler_for(config: QuantConfig) -> QuantHandler:
    """The :class:`QuantHandler` of ``config``'s type (or the nearest registered base)."""
    for klass in type(config).__mro__:
        if klass in _QUANT_HANDLERS:
            return _QUANT_HANDLERS[klass]
    raise TypeError(f"unsupported quant config {type(config).__name__}: no handler registered")


def _as_config(config: Any) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    return parse_registered_option("quant", config)  # alias string or to_dict() dict


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantConfig | str | dict = "int8",
    *,
    calib_input_ids: torch.Tensor | None = None,
    tokenizer: Any = None,
    calib_data: Any = None,
    progress: bool | None = None,
    check_finite: bool = True,
    calib_cache: bool | None = None,
) -> nn.Module:
    """Quantize ``model``'s linears in place and return it.

    Args:
        model: an ``nn.Module`` (typically a HF causal LM); must not be quantized already.
        config: a :class:`QuantConfig`, an alias (``"int8"``, ``"int4"``, ``"int4-awq"``,
            ``"int4-gptq"``, ``"w8a8"``, ``"fp8"``) or a config ``to_dict()``.
        calib_input_ids: int64 ``[n, L]`` calibration token ids for AWQ / GPTQ / W8A8;
            default: ``config.calib_samples`` windows of ``config.calib_seq_len`` tokens of
            ``config.calib_text`` tokenized with ``tokenizer``.
        tokenizer: used only to build the default calibration ids; default: the tokenizer
            saved in the model's local ``config.name_or_path`` directory.
        calib_data: your own calibration data instead of ``config.calib_text``: a text, a
            list of texts, a file path (``pathlib.Path``) or token ids (1-D: windows are cut
            from it; 2-D: the windows), see :func:`infopt.quant.calib_data.calibration_ids_from`.
        progress: show a tqdm bar over blocks for calibrated methods; ``None`` (default)
            follows :func:`infopt.set_progress` (on unless switched off).
        check_finite: refuse (``ValueError`` naming the module) to quantize a linear whose
            weight holds NaN or inf. Quantization would hide them: the fp model emits NaN
            logits, the quantized one finite but meaningless ones. ``False`` skips the check.
        calib_cache: for calibrated methods, reuse (and store) the calibration result cached
            under the same model weights, config and calibration ids
            (:mod:`infopt.quant.calib_cache`); ``None`` (default) follows
            ``INFOPT_CALIB_CACHE`` (on unless ``0``).
    """
    config = _as_config(config)
    handler = quant_handler_for(config)
    targets, head = check_quantizable(model, config, check_finite=check_finite)

    rest = targets
    if config.calibrated:
        if calib_input_ids is None and calib_data is not None:
            is_ids = _is_token_ids(calib_data)
            tok = tokenizer if is_ids else resolve_tokenizer(model, tokenizer)
            calib_input_ids = calibration_ids_from(
                calib_data, tok, config.calib_samples, config.calib_seq_len, config.seed
            )
        if calib_input_ids is None:
            tok = resolve_tokenizer(model, tokenizer)
            calib_input_ids = calibration_ids(
                tok, config.calib_samples, config.calib_seq_len, config.seed, config.calib_text
            )
        calib_input_ids = torch.as_tensor(calib_input_ids, dtype=torch.long)
        if calib_input_ids.dim() != 2:
            raise ValueError(
                f"calib_input_ids must be [n_samples, seq_len], got {tuple(calib_input_ids.shape)}"
            )
        # The default windows (512 tokens) can exceed a small model's context: refuse rather
        # than calibrate on positions the model never saw (or index past learned positions).
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(max_pos, int) and calib_input_ids.shape[1] > max_pos:
            raise ValueError(
                f"calibration windows of {calib_input_ids.shape[1]} tokens exceed the model's "
                f"max_position_embeddings={max_pos}; set calib_seq_len <= {max_pos} in the "
                "config or pass shorter calib_input_ids"
            )
        rest = _calibrate(
            model, config, handler, targets, calib_input_ids, progress,
            calib_cache_enabled(calib_cache),
        )

    rest_set = set(rest)
    replace_modules(
        model, lambda m, n: n in rest_set, lambda m, n: handler.quantize_linear(m, config)
    )
    handler.finish(model, config)
    if config.lm_head == "int8":
        replace_modules(model, lambda m, n: n == head, lambda m, n: Int8Linear.from_linear(m))
    move_to_hugepages(model)
    set_quant_state(model, config)
    refuse_save_pretrained(model)
    return model


def _calibrate(
    model: nn.Module, config: QuantConfig, handler: QuantHandler, targets: list[str],
    calib_input_ids: torch.Tensor, progress: bool | None, use_cache: bool,
) -> list[str]:
    """Run the handler's calibration over the blocks (or load its cached result); returns the
    targets left for round-to-nearest (outside the blocks)."""
    entry = CalibrationEntry.for_model(model, config, calib_input_ids) if use_cache else None
    rest = entry.apply(model, targets) if entry is not None else None
    if rest is not None:
        return rest
    fn, desc = handler.calibration(config)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        rest = run_sequential(model, targets, calib_input_ids, fn, desc=desc, progress=progress)
    finally:
        model.train(was_training)
    if entry is not None:
        entry.store(model, targets, rest, time.perf_counter() - start)
    return rest


class _RefuseSavePretrained:
    """Stands in for ``save_pretrained`` on an infopt-quantized HF model (an instance
    attribute, like the wrapped ``generate``; the class is untouched). transformers would
    write the quantized buffers under names ``from_pretrained`` does not know, and loading
    that directory re-initialises every quantized linear at random (fluent-looking garbage):
    refusing is better than writing a checkpoint that loads wrong."""

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"{self.model_type}.save_pretrained cannot save an infopt-quantized model (it "
            "would reload with random weights in place of every quantized linear); use "
            "infopt.save_quantized(model, directory) and load it back with "
            "infopt.load_quantized(directory)"
        )


def refuse_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (and ``push_to_hub``, which calls it) raise a clear
    error pointing at :func:`infopt.save_quantized` (HF models only)."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = _RefuseSavePretrained(type(model).__name__)


def check_finite_weights(model: nn.Module, names: list[str]) -> None:
    """Raise ``ValueError`` naming the first of the linears ``names`` whose weight (or bias)
    holds NaN or inf (checked before anything is quantized, so a refusal changes nothing)."""
    named = dict(model.named_modules())
    for name in names:
        for attr in ("weight", "bias"):
            t = getattr(named[name], attr, None)
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(
                    f"{name}.{attr} has {bad} non-finite value(s) (NaN or inf) of {t.numel()}; "
                    "quantizing would hide them (the quantized model's outputs look finite). "
                    "Fix the checkpoint, or pass check_finite=False to "
                    "infopt.quant.quantize_model to quantize anyway"
                )


def move_to_hugepages(model: nn.Module) -> None:
    """Copy the big quantized weight buffers of ``model`` into huge-page memory (see
    :mod:`.hugepages`; a no-op where that is unavailable or disabled)."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            for name in ("qweight", "weight_fp8"):
                t = m._buffers.get(name)
                if t is not None:
                    m._buffers[name] = hugepage_copy(t)


def _output_head_name(model: nn.Module, targets: list[str]) -> str:
    """Dotted name of ``model``'s output head for ``lm_head="int8"`` (checked before any change)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            "lm_head='int8' needs a model whose get_output_embeddings() is an nn.Linear, got "
            f"{type(head).__name__}"
        )
    name = next(n for n, m in model.named_modules() if m is head)
    if name in targets:
        raise ValueError(
            f"lm_head='int8' but the output head {name!r} is also selected by include/skip; "
            "keep it in skip (the default) to quantize it int8"
        )
    return name
