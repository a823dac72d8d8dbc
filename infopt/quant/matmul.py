"""The single indirection point between quantized modules and matmul kernels.

The int8 / int4 / w8a8 modules run the registered ops (``infopt.ops.<op>``: backend chosen by
``infopt.ops.use_backend`` / AUTO, i.e. the C++ kernels on CPU; ``infopt.ops.quant_ref`` is
their reference backend) through :func:`validate` once and :func:`run_validated` per call.
On CUDA, weight-only int4 calls that fit run ``int4_tiled_linear`` on a tiled copy of the
weights (:func:`int4_tiled_ready`, :func:`int4_tile`). fp8 has no registered op yet:
:func:`linear_fp8` uses ``torch._scaled_mm`` natively or the fp32 emulation.
Shapes: ``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; see ``quant_ref`` for the
weight layouts.
"""

from __future__ import annotations

import torch

from ..ops import int4_tiled as _tiled
from ..ops import quant_linear as _quant_ops
from ..ops import quant_ref as _ref

__all__ = [
    "fp8_native_available",
    "fp8_native_ok",
    "int4_tile",
    "int4_tiled_ready",
    "linear_fp8",
    "run_validated",
    "validate",
]


def validate(op: str, args: tuple) -> None:
    """Check ``args`` for ``infopt.ops.<op>`` exactly as the public op does (raises)."""
    _quant_ops.validate(op, args)


def run_validated(op: str, args: tuple) -> torch.Tensor:
    """``infopt.ops.<op>(*args)`` for arguments that passed :func:`validate` (same backend
    selection, fallback notices and run counts; no second check)."""
    return _quant_ops.run_validated(op, args)


def int4_tiled_ready(x: torch.Tensor, k: int, group_size: int) -> bool:
    """Whether a weight-only int4 call with activation ``x`` should run the tiled CUDA kernel
    (``infopt.ops.int4_tiled_linear``): CUDA bf16/fp16 ``x`` on sm_80+, ``K % 128 == 0`` and
    ``K >= 2048`` (below, the row-major kernel is as fast), ``group_size = 128 * 2**j``,
    backend ``auto`` / ``cuda`` and the CUDA extension built."""
    return _tiled.tiled_cuda_ready(x, k, group_size)


def int4_tile(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled copy (``codes``, ``meta``) of row-major int4 weights (``ops.int4_tile``)."""
    return _tiled.int4_tile(qweight, scale, zero, group_size)


def fp8_native_available(device: torch.device | str) -> bool:
    """True where fp8 GEMMs run natively: CUDA devices of compute capability 8.9+ (Ada,
    Hopper, Blackwell) with ``torch._scaled_mm``. Everywhere else fp8 is emulated."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_native_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True if this call would take the native fp8 path (device + K, N multiples of 16)."""
    n, k = weight.shape
    return fp8_native_available(x.device) and k % 16 == 0 and n % 16 == 0


def linear_fp8(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """fp8 e4m3 weights ``[N, K]``, ``scale [N]``, per-token dynamic fp8 activations.

    Native ``torch._scaled_mm`` (row-wise scales, bf16 output) on sm_89+ CUDA devices;
    otherwise the fp32 emulation in ``quant_ref.fp8_linear``. The two agree up to the bf16
    rounding of the native output.
    """
    if not fp8_native_ok(x, weight):
        return _ref.fp8_linear(x, weight, scale, bias)
    k = weight.shape[1]
    xq, xs = _ref.quantize_per_token_fp8(x.reshape(-1, k))
    # weight [N, K] row-major is exactly the column-major [K, N] operand _scaled_mm expects.
    y = torch._scaled_mm(
        xq, weight.t(), scale_a=xs[:, None], scale_b=scale.float()[None, :],
        out_dtype=torch.bfloat16,
    ).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
