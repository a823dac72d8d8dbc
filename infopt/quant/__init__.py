"""Weight-only and activation quantization of ``nn.Linear`` layers, measured for quality.

    >>> import infopt, infopt.quant
    >>> model = infopt.wrap_model(model, quant="int8")            # or int4, int4-awq, ...
    >>> infopt.quant.quantize_model(model, Int4WeightOnlyConfig(method="gptq"), tokenizer=tok)
    >>> infopt.quant.save_quantized(model, "out/"); infopt.quant.load_quantized("out/")

Formats (:mod:`.formats`): int8 per-channel symmetric, int4 group-wise asymmetric (packed two
per byte), W8A8 (SmoothQuant, int8 x int8 -> int32), fp8 e4m3 (native on sm_89+, else
emulated). Methods for int4: RTN, AWQ, GPTQ. See ``docs/quant.md``.

Importing this package registers the ``quant=`` option of :func:`infopt.wrap_model` and one
handler per config type (:mod:`.handlers`; a new format = a config + a handler + a
``QuantizedLinear`` subclass).
"""

from __future__ import annotations

from ..options import register_option
from .calib_data import calibration_ids
from .config import FP8Config, Int4WeightOnlyConfig, Int8WeightOnlyConfig, QuantConfig, W8A8Config
from .formats import (
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    sqnr_db,
    unpack_int4,
)
from .gptq import gptq_quantize
from .handlers import FP8Handler, Int4Handler, Int8Handler, W8A8Handler
from .qlinear import FP8Linear, Int4Linear, Int8Linear, QuantizedLinear, W8A8Linear
from .quantize import (
    QuantHandler,
    check_quantizable,
    is_quantized,
    quant_config_of,
    quant_handler_for,
    quantize_model,
    register_quant_handler,
    select_targets,
)
from .serialization import load_quantized, save_quantized

__all__ = [
    "ALIASES",
    "FP8Config",
    "FP8Handler",
    "FP8Linear",
    "Int4Handler",
    "Int4Linear",
    "Int4WeightOnlyConfig",
    "Int8Handler",
    "Int8Linear",
    "Int8WeightOnlyConfig",
    "QuantConfig",
    "QuantHandler",
    "QuantizedLinear",
    "W8A8Config",
    "W8A8Handler",
    "W8A8Linear",
    "calibration_ids",
    "check_quantizable",
    "dequantize_fp8",
    "dequantize_int4",
    "dequantize_int8",
    "gptq_quantize",
    "is_quantized",
    "load_quantized",
    "pack_int4",
    "quant_config_of",
    "quant_handler_for",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "quantize_weight",
    "register_quant_handler",
    "save_quantized",
    "select_targets",
    "sqnr_db",
    "unpack_int4",
]

#: ``wrap_model(quant=<alias>)`` values and the configs they build. ``int4`` is the int4 to
#: pick: RTN g128 with the output head int8 (an fp32 head halves Qwen2.5-1.5B's decode speed,
#: 10.3 vs 22.5 tok/s; ``int4-head-fp32`` keeps it fp32, as ``int4`` did before).
#: ``int4-gptq`` uses act_order (static groups): on SmolLM2-135M g128 it took GPTQ from +32 %
#: to +18 % perplexity (RTN: +28 %), see docs/quant.md. It calibrates on 128 windows, not the
#: configs' default 32: GPTQ fits a [K, K] Hessian (K = 4864 for Qwen2.5-0.5B's down_proj), and
#: 16k tokens overfit it. 65k tokens took Qwen2.5-Coder-0.5B from losing to RTN on chat to
#: beating it on every domain (docs/results.md, "GPTQ calibration size and damping").
ALIASES = {
    "int8": Int8WeightOnlyConfig,
    "int4": lambda: Int4WeightOnlyConfig(method="rtn", lm_head="int8"),
    "int4-head-fp32": lambda: Int4WeightOnlyConfig(method="rtn"),
    "int4-awq": lambda: Int4WeightOnlyConfig(method="awq"),
    "int4-gptq": lambda: Int4WeightOnlyConfig(method="gptq", act_order=True, calib_samples=128),
    # int4 RTN weights x int8 activations rounded per 32-block on the fly (CPU VNNI decode).
    "int4-a8": lambda: Int4WeightOnlyConfig(method="rtn", act_dtype="int8"),
    "w8a8": W8A8Config,
    "fp8": FP8Config,
}

register_option(
    "quant", QuantConfig, ALIASES,
    description="quantize nn.Linear weights (int8, int4 rtn/awq/gptq) or weights+activations "
    "(w8a8, fp8)",
)
