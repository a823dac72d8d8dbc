"""Quantized drop-in replacements for ``nn.Linear``.

Each module holds its quantized weight as buffers, keeps the bias in the model's dtype, and
computes ``y [..., N]`` from ``x [..., K]`` in ``x``'s dtype through :mod:`.matmul` (the one
place that picks a matmul implementation). An optional ``in_scale [K]`` buffer is an explicit
per-input-channel multiplier applied to ``x`` first: AWQ / SmoothQuant scales that could not
be folded into a previous op.

``spec()`` returns the JSON-able constructor arguments so :mod:`.serialization` can rebuild an
empty module of the right shape before loading a state dict.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import torch.nn as nn

from . import matmul
from .formats import check_group_size, num_groups, quantize_fp8, quantize_int4, quantize_int8

_log = logging.getLogger(__name__)
# format name -> QuantizedLinear subclass, filled by QuantizedLinear.__init_subclass__
_MODULE_TYPES: dict[str, type[QuantizedLinear]] = {}

__all__ = [
    "FP8Linear",
    "Int4Linear",
    "Int8Linear",
    "QuantizedLinear",
    "W8A8Linear",
    "quantized_module_types",
]


class QuantizedLinear(nn.Module):
    """Base class: shapes, bias, optional explicit input multiplier, (de)serialisable spec.

    A subclass with a ``FORMAT`` registers itself under that name (what :meth:`spec` writes
    and :meth:`from_spec` / :func:`~infopt.quant.load_quantized` look up); its extra
    constructor arguments are listed in ``SPEC_FIELDS`` and checked by :meth:`_check_spec`.
    """

    FORMAT: ClassVar[str] = ""
    #: constructor kwargs beyond the base's that :meth:`spec` records
    SPEC_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fmt = cls.__dict__.get("FORMAT")
        if fmt:
            if fmt in _MODULE_TYPES and _MODULE_TYPES[fmt] is not cls:
                raise ValueError(f"quantized format {fmt!r} is registered twice")
            _MODULE_TYPES[fmt] = cls

    @classmethod
    def _check_spec(cls, kwargs: dict[str, Any]) -> None:
        """Validate the ``SPEC_FIELDS`` of a spec read from a file (``ValueError`` naming the
        field)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        has_in_scale: bool = False,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        # Bias stays a float buffer in the model's dtype (never quantized).
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)
        self.register_buffer("in_scale", torch.ones(in_features) if has_in_scale else None)

    # -- construction helpers -------------------------------------------------------------

    def _init_from_linear(self, linear: nn.Linear, in_scale: torch.Tensor | None) -> None:
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()
        if in_scale is not None:
            self.in_scale = in_scale.detach().float().clone()

    def spec(self) -> dict[str, Any]:
        """JSON-able constructor kwargs (plus ``format``) to rebuild this module empty."""
        return {
            "format": self.FORMAT,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "has_in_scale": self.in_scale is not None,
            "bias_dtype": str(self.bias.dtype if self.bias is not None else torch.float32),
        }

    @staticmethod
    def from_spec(spec: dict[str, Any]) -> QuantizedLinear:
        """Empty module (zeros) of the class and shape described by :meth:`spec`.

        ``spec`` may come from a file, so every field is checked against an allow-list
        (``ValueError`` naming the field); dtypes come from a fixed table, never from
        ``getattr(torch, name)``.
        """
        cls, kwargs = _class_and_kwargs(spec)
        return cls(**kwargs)

    # -- forward ---------------------------------------------------------------------------

    def _prescale(self, x: torch.Tensor) -> torch.Tensor:
        in_scale = self._buffers["in_scale"]
        return x if in_scale is None else x * in_scale.to(x.dtype)

    def _linear(self, op: str, x: torch.Tensor, *weights: Any) -> torch.Tensor:
        """``infopt.ops.<op>(x, *weights)``. The arguments are fully validated once per (op, K,
        x dtype and device, weight objects) and then only compared: a decode step makes ~200
        such calls and the full Python checks cost as much as a small GEMV each."""
        args = (x, *weights)
        try:
            key = (op, x.shape[-1], x.dtype, x.device,
                   *(w if isinstance(w, int) else id(w) for w in weights))  # fmt: skip
        except (AttributeError, IndexError):  # not a tensor / 0-d: the validator says why
            key = None
        if key is None or key != self.__dict__.get("_checked_key"):
            matmul.validate(op, args)
            # Keeping the checked objects alive keeps their ids from being reused.
            self._checked_key, self._checked_refs = key, weights
        return matmul.run_validated(op, args)

    def _format_repr(self) -> str:
        return self.FORMAT

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self._format_repr()}"
        )
        if self.in_scale is not None:
            s += ", in_scale=per-channel"
        return s


class Int8Linear(QuantizedLinear):
    """int8 weight-only. Buffers: ``qweight`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``."""

    FORMAT = "int8"
    #: the :mod:`infopt.ops` op computing ``x @ dequant(qweight).T + bias``
    OP: ClassVar[str] = "int8_weight_only_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias, **kw)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight: torch.Tensor | None = None,
        in_scale: torch.Tensor | None = None,
    ) -> Int8Linear:
        """Quantize ``weight`` (default ``linear.weight``; pass a pre-scaled one for AWQ-like
        methods together with the matching ``in_scale``)."""
        w = linear.weight if weight is None else weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  has_in_scale=in_scale is not None, bias_dtype=linear.weight.dtype)
        mod._init_from_linear(linear, in_scale)
        mod.qweight, mod.scale = quantize_int8(w.detach())
        return mod.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers
        return self._linear(self.OP, self._prescale(x), b["qweight"], b["scale"], b["bias"])

    def _format_repr(self) -> str:
        return "int8 per-channel symmetric"


class W8A8Linear(Int8Linear):
    """SmoothQuant W8A8: same buffers as :class:`Int8Linear`, but activations are quantized
    per token to int8 on the fly and multiplied in int8 x int8 -> int32."""

    FORMAT = "w8a8"
    OP = "int8_dynamic_linear"

    def _format_repr(self) -> str:
        return "w8a8 (int8 per-channel weights, int8 per-token dynamic activations)"


class Int4Linear(QuantizedLinear):
    """int4 weights, asymmetric, group-wise along K.

    Buffers: ``qweight`` uint8 ``[N, ceil(K/2)]`` (low nibble = even k, see
    :func:`~infopt.quant.formats.pack_int4`), ``scale`` fp32 ``[N, G]``, ``zero`` uint8 ``[N, G]``
    with ``G = ceil(K / group_size)``.

    On CUDA, weight-only calls with bf16 / fp16 ``x``, ``K % 128 == 0``, ``K >= 2048`` and
    ``group_size = 128 * 2**j`` run ``ops.int4_tiled_linear`` (tensor cores) on a tiled copy of
    the weights built on first use (see :meth:`_tiled_weights`); everything else runs the ops
    below.

    ``act_dtype``: ``None`` (weight-only: ``x`` is used as is, ``ops.int4_weight_only_linear``)
    or ``"int8"`` (``x`` is rounded to int8 per block of 32 along K on the fly,
    ``ops.int4_dynamic_linear``: on CPUs with AVX-512 VNNI the decode GEMV then runs on int8
    dot products, ~1.3-1.8x faster; the weights and what is stored are the same).
    """

    FORMAT = "int4"
    SPEC_FIELDS = frozenset({"group_size", "act_dtype"})
    ACT_DTYPES: ClassVar[tuple[str | None, ...]] = (None, "int8")

    @classmethod
    def _check_spec(cls, kwargs: dict[str, Any]) -> None:
        gs = kwargs.get("group_size", 128)
        if type(gs) is not int:
            raise ValueError(f"group_size: must be an int, got {gs!r}")
        try:
            check_group_size(gs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"group_size: {e}") from None
        act = kwargs.get("act_dtype")
        if act not in cls.ACT_DTYPES:
            raise ValueError(f"act_dtype: must be one of {cls.ACT_DTYPES}, got {act!r}")

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
        act_dtype: str | None = None, **kw: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kw)
        self.group_size = check_group_size(group_size)
        self.act_dtype = act_dtype
        g = num_groups(in_features, group_size)
        self.register_buffer(
            "qweight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.ones(out_features, g))
        self.register_buffer("zero", torch.zeros(out_features, g, dtype=torch.uint8))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 128, weight: torch.Tensor | None = None,
        in_scale: torch.Tensor | None = None, clip_ratio: torch.Tensor | None = None,
    ) -> Int4Linear:
        """RTN-quantize ``weight`` (default ``linear.weight``) with optional per-group clip."""
        w = linear.weight if weight is None else weight
        qweight, scale, zero = quantize_int4(w.detach(), group_size, clip_ratio)
        return cls.from_quantized(linear, qweight, scale, zero, group_size, in_scale)

    @classmethod
    def from_quantized(
        cls, linear: nn.Linear, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
        group_size: int, in_scale: torch.Tensor | None = None,
    ) -> Int4Linear:
        """Wrap already-quantized tensors (e.g. from GPTQ) with ``linear``'s bias."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                  has_in_scale=in_scale is not None, bias_dtype=linear.weight.dtype)
        mod._init_from_linear(linear, in_scale)
        if qweight.shape != mod.qweight.shape or scale.shape != mod.scale.shape:
            raise ValueError(
                f"quantized shapes {tuple(qweight.shape)}/{tuple(scale.shape)} do not match "
                f"{tuple(mod.qweight.shape)}/{tuple(mod.scale.shape)}"
            )
        mod.qweight, mod.scale, mod.zero = qweight, scale.float(), zero.to(torch.uint8)
        return mod.to(linear.weight.device)

    @property
    def act_dtype(self) -> str | None:
        return self._act_dtype

    @act_dtype.setter
    def act_dtype(self, value: str | None) -> None:
        if value not in self.ACT_DTYPES:
            raise ValueError(f"act_dtype must be one of {self.ACT_DTYPES}, got {value!r}")
        self._act_dtype = value

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "group_size": self.group_size, "act_dtype": self.act_dtype}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers
        if self._act_dtype is None and matmul.int4_tiled_ready(
            x, self.in_features, self.group_size
        ):
            codes, meta = self._tiled_weights()
            return self._linear(
                "int4_tiled_linear", self._prescale(x), codes, meta, self.out_features,
                self.group_size, b["bias"],
            )  # fmt: skip
        op = "int4_weight_only_linear" if self._act_dtype is None else "int4_dynamic_linear"
        return self._linear(
            op, self._prescale(x), b["qweight"], b["scale"], b["zero"], self.group_size, b["bias"]
        )

    def _tiled_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CUDA kernel's tiled copy of the weights (``ops.int4_tile``), built on first use
        and rebuilt when a buffer is replaced, moved or written in place (in-place writes are
        seen through the version counter, which inference tensors lack). It is not part of the
        state dict, and it costs as much memory again as ``qweight`` + ``scale`` + ``zero``."""
        b = self._buffers
        key = tuple((t.data_ptr(), _version(t)) for t in (b["qweight"], b["scale"], b["zero"]))
        cached = self.__dict__.get("_tiled")
        if cached is None or cached[0] != key:
            codes, meta = matmul.int4_tile(b["qweight"], b["scale"], b["zero"], self.group_size)
            cached = self._tiled = (key, codes, meta)
        return cached[1], cached[2]

    def _format_repr(self) -> str:
        acts = "" if self._act_dtype is None else ", int8 activations per 32-block"
        return f"int4 asymmetric g{self.group_size} (packed uint8 [N, ceil(K/2)]){acts}"


def _version(t: torch.Tensor) -> int:
    """``t._version``; -1 for inference tensors, which keep no version counter (an in-place
    write to one under ``torch.inference_mode()`` is then not seen: replace the buffer)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class FP8Linear(QuantizedLinear):
    """fp8 e4m3 weights with per-output-channel scale and per-token fp8 activations.

    Buffers: ``weight_fp8`` uint8 ``[N, K]`` holding the float8_e4m3fn bit patterns (a uint8
    buffer survives ``model.to(dtype)``, which would otherwise cast a float8 buffer to the new
    float dtype), ``scale`` fp32 ``[N]``. ``emulated`` is True when the last forward ran the
    fp32 emulation rather than a native fp8 GEMM; the first emulated forward of the process
    logs a warning on the ``infopt.quant.qlinear`` logger.
    """

    FORMAT = "fp8"
    _warned: ClassVar[bool] = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias, **kw)
        self.register_buffer(
            "weight_fp8", torch.zeros(out_features, in_features, dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.ones(out_features))
        self.emulated = not matmul.fp8_native_available(self.weight_fp8.device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight: torch.Tensor | None = None,
        in_scale: torch.Tensor | None = None,
    ) -> FP8Linear:
        w = linear.weight if weight is None else weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  has_in_scale=in_scale is not None, bias_dtype=linear.weight.dtype)
        mod._init_from_linear(linear, in_scale)
        w8, mod.scale = quantize_fp8(w.detach())
        mod.weight_fp8 = w8.view(torch.uint8)
        mod = mod.to(linear.weight.device)
        mod.emulated = not matmul.fp8_native_available(linear.weight.device)
        return mod

    @property
    def weight_e4m3(self) -> torch.Tensor:
        """The weight as float8_e4m3fn ``[N, K]`` (a view, no copy)."""
        return self.weight_fp8.view(torch.float8_e4m3fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_e4m3
        self.emulated = not matmul.fp8_native_ok(x, w)
        if self.emulated and not FP8Linear._warned:
            FP8Linear._warned = True
            _log.warning(
                "infopt FP8Linear: no native fp8 GEMM on %s (needs CUDA sm_89+ and K, N "
                "multiples of 16); fp8 weights and activations are EMULATED (quantize -> "
                "dequantize in fp32): quality is fp8's, speed is not. Shown once per process.",
                x.device,
            )
        return matmul.linear_fp8(self._prescale(x), w, self.scale, self.bias)

    def _format_repr(self) -> str:
        return f"fp8 e4m3 per-channel, per-token fp8 activations, emulated={self.emulated}"


#: ``spec()["bias_dtype"]`` strings and the dtypes they stand for.
BIAS_DTYPES = {
    str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}
_SPEC_FIELDS = {"format", "in_features", "out_features", "bias", "has_in_scale", "bias_dtype"}


def _class_and_kwargs(spec: Any) -> tuple[type[QuantizedLinear], dict[str, Any]]:
    if not isinstance(spec, dict):
        raise ValueError(f"module spec must be a JSON object, got {type(spec).__name__}")
    fmt = spec.get("format")
    cls = quantized_module_types().get(fmt) if isinstance(fmt, str) else None
    if cls is None:
        known = sorted(quantized_module_types())
        raise ValueError(f"format: unknown quantized format {fmt!r}; known: {known}")
    allowed = _SPEC_FIELDS | cls.SPEC_FIELDS
    unknown, missing = set(spec) - allowed, (_SPEC_FIELDS - {"format"}) - set(spec)
    if unknown or missing:
        raise ValueError(
            f"fields: unknown {sorted(unknown)}, missing {sorted(missing)}; a {fmt} spec has "
            f"{sorted(allowed)}"
        )
    kwargs = {k: v for k, v in spec.items() if k != "format"}
    for name in ("in_features", "out_features"):
        v = kwargs[name]
        if type(v) is not int or v < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {v!r}")
    for name in ("bias", "has_in_scale"):
        if not isinstance(kwargs[name], bool):
            raise ValueError(f"{name}: must be true or false, got {kwargs[name]!r}")
    dtype = kwargs["bias_dtype"]
    if not isinstance(dtype, str) or dtype not in BIAS_DTYPES:
        raise ValueError(f"bias_dtype: must be one of {sorted(BIAS_DTYPES)}, got {dtype!r}")
    kwargs["bias_dtype"] = BIAS_DTYPES[dtype]
    cls._check_spec(kwargs)
    return cls, kwargs


def quantized_module_types() -> dict[str, type[QuantizedLinear]]:
    """``{format name: module class}`` for every quantized linear (each subclass with a
    ``FORMAT`` registers itself when it is defined)."""
    return dict(_MODULE_TYPES)
