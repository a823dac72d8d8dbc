"""``quantize_model``: the full-featured entry point (``wrap_model(quant=...)`` calls it).

Picks the target linears (``include`` / ``skip`` patterns), gets calibration token ids when
the method needs them, runs the method and records the config on the model for
:func:`~infopt.quant.save_quantized`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from ..module_walk import matches_any, replace_modules
from .awq import awq_block, smooth_block
from .blockwise import collect_stats, run_sequential
from .calib_data import calibration_ids, resolve_tokenizer
from .config import (
    FP8Config,
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
    W8A8Config,
)
from .gptq import gptq_quantize
from .hugepages import hugepage_copy
from .qlinear import FP8Linear, Int4Linear, Int8Linear, QuantizedLinear, W8A8Linear
from .structure import BlockInputs

__all__ = [
    "QUANT_ATTR",
    "check_finite_weights",
    "check_quantizable",
    "is_quantized",
    "quant_config_of",
    "quantize_model",
    "refuse_save_pretrained",
    "select_targets",
]

# Attribute holding the applied QuantConfig's to_dict() on a quantized model.
QUANT_ATTR = "_infopt_quant_config"
_GLOB_CHARS = set("*?[")


def is_quantized(model: nn.Module) -> bool:
    """True if any submodule is an infopt quantized linear."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The config ``model`` was quantized with (None if it was not quantized by infopt)."""
    d = getattr(model, QUANT_ATTR, None)
    return None if d is None else QuantConfig.from_dict(d)


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
    if is_quantized(model) or getattr(model, QUANT_ATTR, None) is not None:
        raise ValueError(
            "model is already quantized (it contains infopt quantized linears); quantize the "
            "original floating-point model instead"
        )
    targets = select_targets(model, config)
    head = _output_head_name(model, targets) if config.lm_head is not None else None
    if check_finite:
        check_finite_weights(model, targets + ([head] if head is not None else []))
    return targets, head


def _rtn_module(config: QuantConfig, linear: nn.Linear) -> nn.Module:
    """Calibration-free quantization of one linear in ``config``'s format."""
    if isinstance(config, Int8WeightOnlyConfig):
        return Int8Linear.from_linear(linear)
    if isinstance(config, Int4WeightOnlyConfig):
        return Int4Linear.from_linear(linear, config.group_size)
    if isinstance(config, FP8Config):
        return FP8Linear.from_linear(linear)
    if isinstance(config, W8A8Config):
        return W8A8Linear.from_linear(linear)  # outside blocks: no smoothing
    raise TypeError(f"unsupported quant config {type(config).__name__}")


def _gptq_block(
    block: nn.Module, groups: list[list[str]], chunks: BlockInputs, *, config: Int4WeightOnlyConfig
) -> dict[str, nn.Module]:
    mods = dict(block.named_modules())
    new: dict[str, nn.Module] = {}
    for group, st in zip(groups, collect_stats(block, groups, chunks, with_cov=True)):
        hessian = 2.0 * st.cov
        for name in group:
            lin = mods[name]
            qweight, scale, zero = gptq_quantize(
                lin.weight, hessian, config.group_size, damp=config.damp,
                block_size=config.block_size, act_order=config.act_order,
            )
            new[name] = Int4Linear.from_quantized(lin, qweight, scale, zero, config.group_size)
    return new


def _as_config(config: Any) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    from ..api import parse_option

    return parse_option("quant", config)  # alias string or to_dict() dict


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantConfig | str | dict = "int8",
    *,
    calib_input_ids: torch.Tensor | None = None,
    tokenizer: Any = None,
    progress: bool | None = None,
    check_finite: bool = True,
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
        progress: show a tqdm bar over blocks for calibrated methods; ``None`` (default)
            follows :func:`infopt.set_progress` (on unless switched off).
        check_finite: refuse (``ValueError`` naming the module) to quantize a linear whose
            weight holds NaN or inf. Quantization would hide them: the fp model emits NaN
            logits, the quantized one finite but meaningless ones. ``False`` skips the check.
    """
    config = _as_config(config)
    targets, head = check_quantizable(model, config, check_finite=check_finite)

    rest = targets
    if config.calibrated:
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
        if isinstance(config, W8A8Config):
            fn, desc = functools.partial(smooth_block, alpha=config.alpha), "SmoothQuant"
        elif config.method == "gptq":
            fn, desc = functools.partial(_gptq_block, config=config), "GPTQ"
        else:
            fn = functools.partial(
                awq_block, group_size=config.group_size, grid=config.awq_grid,
                clip=config.awq_clip, damp=config.awq_damp,
            )
            desc = "AWQ"
        was_training = model.training
        model.eval()
        try:
            rest = run_sequential(
                model, targets, calib_input_ids, fn, desc=desc, progress=progress
            )
        finally:
            model.train(was_training)

    rest_set = set(rest)
    replace_modules(model, lambda m, n: n in rest_set, lambda m, n: _rtn_module(config, m))
    if isinstance(config, Int4WeightOnlyConfig) and config.act_dtype is not None:
        # After calibration: AWQ / GPTQ searched their weights on unrounded activations.
        for m in model.modules():
            if isinstance(m, Int4Linear):
                m.act_dtype = config.act_dtype
    if config.lm_head == "int8":
        replace_modules(model, lambda m, n: n == head, lambda m, n: Int8Linear.from_linear(m))
    move_to_hugepages(model)
    setattr(model, QUANT_ATTR, config.to_dict())
    refuse_save_pretrained(model)
    return model


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
