"""Quantization configs: frozen, versioned, JSON round-trippable (see :mod:`infopt.config`).

``QuantConfig`` is the base that the ``quant=`` option of :func:`infopt.wrap_model` accepts;
use one of its subclasses. Fields common to all:

* ``include``: glob patterns over dotted module names selecting what to quantize (default
  every ``nn.Linear``). A pattern without glob characters names one module, which must be an
  ``nn.Linear`` (else ``TypeError``); glob patterns silently pass over non-Linear modules.
* ``skip``: patterns never quantized (default ``("lm_head",)``; embeddings are never
  ``nn.Linear`` so they are untouched anyway).
* ``lm_head``: ``None`` (default: the output head follows ``include``/``skip``, i.e. stays in
  the model dtype) or ``"int8"``: the output head (``model.get_output_embeddings()``) is
  quantized int8 weight-only per channel, whatever the main format, like llama.cpp keeping a
  higher-precision output tensor in its 4-bit formats. On large-vocabulary models the head is
  a big share of the bytes read per token (Qwen2.5-1.5B: 0.93 GB of 7.1 GB in fp32).
* ``calib_samples`` x ``calib_seq_len`` tokens of ``calib_text`` sampled with ``seed``; only
  used by calibrated methods (AWQ, GPTQ, W8A8). ``"mix"`` (default) is chat (ShareGPT through
  the chat template), code and prose in equal parts, disjoint from every evaluation text
  (:mod:`infopt.quant.calib_data`); ``"chat"``, ``"code"``, ``"news"`` / ``"lee"`` (the
  second half of the Lee news corpus), ``"docs"`` / ``"pydoc"`` (CPython documentation
  prose, offline) are single sources.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import InfoptConfig, register_config
from .awq import AWQ_DAMP
from .calib_data import CALIB_SOURCES
from .formats import GROUP_SIZES

__all__ = [
    "CALIB_TEXTS",
    "INT4_METHODS",
    "FP8Config",
    "Int4WeightOnlyConfig",
    "Int8WeightOnlyConfig",
    "QuantConfig",
    "W8A8Config",
]

INT4_METHODS = ("rtn", "awq", "gptq")
#: ``Int4WeightOnlyConfig.act_dtype`` values: weight-only, or int8 activations per 32-block.
INT4_ACT_DTYPES = (None, "int8")
CALIB_TEXTS = CALIB_SOURCES
LM_HEAD_FORMATS = (None, "int8")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float, *, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in [{low}, {high}{bracket}, got {value!r}")


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)  # a bare string is one pattern, not a sequence of characters
    if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a tuple of glob pattern strings, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class QuantConfig(InfoptConfig):
    """Base class of every quantization config (not usable on its own)."""

    include: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ("lm_head",)
    # 32 windows of 512 rather than 64 of 256 (same 16384 tokens, same cost): windows as long
    # as the evaluation's are what makes AWQ beat RTN's perplexity on Qwen2.5-1.5B
    # (docs/results.md, "AWQ calibration window length"); a 256-token window also doubles the
    # weight of the attention-sink token.
    calib_samples: int = 32
    calib_seq_len: int = 512
    calib_text: str = "mix"
    seed: int = 0
    lm_head: str | None = None

    #: short format name shown in reprs and used by save/load
    FORMAT = "none"
    #: True if the method needs calibration activations
    CALIBRATED = False

    def __post_init__(self) -> None:
        if type(self) is QuantConfig:
            raise TypeError(
                "QuantConfig is the base class; use Int8WeightOnlyConfig, Int4WeightOnlyConfig, "
                "W8A8Config or FP8Config"
            )
        # Frozen dataclass: normalise lists (from JSON) / strings to tuples in place.
        object.__setattr__(self, "include", _patterns("include", self.include))
        object.__setattr__(self, "skip", _patterns("skip", self.skip))
        _check_int("calib_samples", self.calib_samples, 1)
        _check_int("calib_seq_len", self.calib_seq_len, 2)
        _check_int("seed", self.seed, 0)
        if self.calib_text not in CALIB_TEXTS:
            raise ValueError(f"calib_text must be one of {CALIB_TEXTS}, got {self.calib_text!r}")
        if self.lm_head not in LM_HEAD_FORMATS:
            raise ValueError(f"lm_head must be one of {LM_HEAD_FORMATS}, got {self.lm_head!r}")

    @property
    def calibrated(self) -> bool:
        return self.CALIBRATED


@register_config
@dataclasses.dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    """int8 weights, symmetric per output channel; activations stay in the model dtype."""

    VERSION = 1
    FORMAT = "int8"


@register_config
@dataclasses.dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantConfig):
    """int4 weights, asymmetric, group-wise along K; activations stay in the model dtype.

    Attributes:
        group_size: 32, 64 or 128 input columns per (scale, zero) pair.
        method: ``"rtn"`` (round to nearest), ``"awq"`` (activation-aware scaling + clip
            search) or ``"gptq"`` (Hessian-based error compensation).
        act_order: GPTQ only: quantize columns in order of decreasing Hessian diagonal. Group
            parameters are then computed up front on the original column order ("static
            groups") so the packed layout stays the standard one.
        damp: GPTQ only: damping added to the Hessian diagonal, as a fraction of its mean.
        block_size: GPTQ only: columns per lazy-batch update block (a multiple of group_size).
        gptq_sink_weight: GPTQ only: how many times the Hessian counts the first token of
            each calibration sequence (>= 1). That token is the attention sink: every later
            query attends to it, so an error in its keys and values reaches every position,
            yet the plain Hessian weighs it as one token in hundreds. 16 (default) measured
            best of 1, 4, 16 and 64 on SmolLM2-135M (docs/results.md); 1 is textbook GPTQ.
        awq_grid: AWQ only: number of alpha values searched in [0, 1).
        awq_clip: AWQ only: also search a per-group range-shrink ratio (and score each alpha
            by its error after that search).
        awq_damp: AWQ only: ridge added to the calibration covariance's diagonal for both
            searches, as a fraction of its mean (like ``damp`` for GPTQ; see docs/results.md).
        awq_sink_weight: AWQ only: how many times the covariance of both searches counts the
            first token of each calibration sequence (>= 1), as ``gptq_sink_weight`` does for
            GPTQ's Hessian. 1 (default) is textbook AWQ. Unlike GPTQ's, no one value helped
            every model measured: 16 lowered Qwen2.5-Coder-0.5B's KL and perplexity increase
            on every domain but raised SmolLM2-135M's (docs/results.md).
        act_dtype: ``None`` (default: weight-only, activations stay in the model dtype) or
            ``"int8"``: each quantized linear rounds its input to int8 per block of 32 along K
            on the fly (``ops.int4_dynamic_linear``; llama.cpp's Q4 x Q8 and IPEX's
            ``lowp_mode=INT8`` make the same trade), so that CPUs with AVX-512 VNNI run the
            decode GEMV on int8 dot products. Same weights and file; see docs/results.md for its
            measured quality and speed.
    """

    # 2: ``max_tokens`` removed (it never had an effect: the AWQ searches use every
    # calibration token through the input covariance), ``awq_damp`` added.
    # 3: ``gptq_sink_weight`` added (older configs quantized with the plain Hessian, i.e. 1).
    VERSION = 3
    FORMAT = "int4"

    group_size: int = 128
    method: str = "rtn"
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    gptq_sink_weight: float = 16.0
    awq_grid: int = 20
    awq_clip: bool = True
    awq_damp: float = AWQ_DAMP
    awq_sink_weight: float = 1.0
    act_dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_dtype not in INT4_ACT_DTYPES:
            raise ValueError(f"act_dtype must be one of {INT4_ACT_DTYPES}, got {self.act_dtype!r}")
        gs = self.group_size
        # type() rather than ``in``: 128.0 == 128 (and True == 1) would pass a membership test.
        if type(gs) is not int or gs not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} (an int), got {gs!r}")
        if self.method not in INT4_METHODS:
            raise ValueError(f"method must be one of {INT4_METHODS}, got {self.method!r}")
        if not isinstance(self.act_order, bool):
            raise TypeError(f"act_order must be a bool, got {self.act_order!r}")
        if self.act_order and self.method != "gptq":
            raise ValueError(f"act_order=True only applies to method='gptq', got {self.method!r}")
        _check_float("damp", self.damp, 0.0, 1.0, high_open=False)
        _check_int("block_size", self.block_size, 1)
        if self.block_size % self.group_size:
            raise ValueError(
                f"block_size ({self.block_size}) must be a multiple of group_size "
                f"({self.group_size}) so groups never straddle GPTQ blocks"
            )
        _check_float("gptq_sink_weight", self.gptq_sink_weight, 1.0, 1e6, high_open=False)
        _check_int("awq_grid", self.awq_grid, 1)
        if not isinstance(self.awq_clip, bool):
            raise TypeError(f"awq_clip must be a bool, got {self.awq_clip!r}")
        _check_float("awq_damp", self.awq_damp, 0.0, 1.0, high_open=False)
        _check_float("awq_sink_weight", self.awq_sink_weight, 1.0, 1e6, high_open=False)

    @classmethod
    def _upgrade_fields(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        if version < 2:
            fields.pop("max_tokens", None)  # version 1 stored it but never used it
        if version < 3:
            fields["gptq_sink_weight"] = 1.0
        return fields

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn"


@register_config
@dataclasses.dataclass(frozen=True)
class W8A8Config(QuantConfig):
    """SmoothQuant W8A8: int8 per-channel weights, dynamic per-token int8 activations.

    Attributes:
        alpha: migration strength in [0, 1]; smoothing ``s_j = max|X_j|^alpha /
            max|W_j|^(1 - alpha)`` is folded into the previous norm / linear when the block
            structure allows, else kept as an explicit per-input-channel multiplier.
    """

    VERSION = 1
    FORMAT = "w8a8"
    CALIBRATED = True

    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_float("alpha", self.alpha, 0.0, 1.0, high_open=False)


@register_config
@dataclasses.dataclass(frozen=True)
class FP8Config(QuantConfig):
    """fp8 e4m3 weights (per-output-channel scale) and per-token dynamic fp8 activations.

    Native on CUDA sm_89+; elsewhere emulated in fp32 (the modules report ``emulated=True``
    and log a warning once).
    """

    VERSION = 1
    FORMAT = "fp8"
