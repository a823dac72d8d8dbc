"""The kernel layer: inference ops with a pure-torch reference and selectable backends.

    >>> from infopt import ops
    >>> y = ops.rms_norm(x, weight, 1e-6)                  # backend chosen per call (AUTO)
    >>> y = ops.rms_norm(x, weight, backend="reference")   # per-call override
    >>> with ops.use_backend("triton"): ...                # process-wide default, restored on exit
    >>> print(ops.format_backend_report())                 # what can run, what ran, fallbacks

Quantized linears: ``int8_weight_only_linear``, ``int4_weight_only_linear``,
``int8_dynamic_linear`` (W8A8), ``int4_dynamic_linear`` (int4 weights x per-block int8
activations; semantics: :mod:`infopt.ops.quant_ref`), and ``int4_tiled_linear`` (int4 weights
repacked by ``int4_tile`` into the layout of the CUDA tensor-core kernel).

Backends: ``reference`` (pure torch), ``cpp`` (CPU extension, built lazily on first use),
``triton`` (CUDA natively; CPU only under ``TRITON_INTERPRET=1``), ``cuda`` (CUDA extension).
Importing this package builds nothing and imports no triton. See ``docs/ops.md``.
"""

from __future__ import annotations

from .dense import dense_gemv, dense_gemv_reference
from .int4_tiled import int4_tile, int4_tiled_linear, int4_untile
from .paged_attention import (
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_prefill,
    paged_attention_prefill_reference,
)
from .quant_linear import (
    int4_dynamic_linear,
    int4_weight_only_linear,
    int8_dynamic_linear,
    int8_weight_only_linear,
)
from .registry import (
    Backend,
    BackendUnavailableError,
    backend_report,
    format_backend_report,
    get_backend,
    parse_backend,
    reset_backend_stats,
    set_backend,
    use_backend,
)
from .rmsnorm import rms_norm, rms_norm_reference

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "backend_report",
    "dense_gemv",
    "dense_gemv_reference",
    "format_backend_report",
    "get_backend",
    "int4_dynamic_linear",
    "int4_tile",
    "int4_tiled_linear",
    "int4_untile",
    "int4_weight_only_linear",
    "int8_dynamic_linear",
    "int8_weight_only_linear",
    "paged_attention_decode",
    "paged_attention_decode_reference",
    "paged_attention_prefill",
    "paged_attention_prefill_reference",
    "parse_backend",
    "reset_backend_stats",
    "rms_norm",
    "rms_norm_reference",
    "set_backend",
    "use_backend",
]
