"""Per-token, per-head quantization of K/V rows for int8 / fp8 KV pools.

Each ``[D]`` row of one token and one KV head gets its own fp32 scale, ``amax(|row|) / qmax``
(``qmax`` = 127 for int8, 448 for float8_e4m3fn), so an outlier in one head or token never costs
the others precision. int8 rounds to nearest; fp8 uses torch's round-to-nearest-even cast. A row
of zeros stores scale 1 and zeros (never 0/0). Dequantization is ``stored.float() * scale``; the
paged attention kernels do exactly that as they load a row.
"""

from __future__ import annotations

import torch

__all__ = ["QMAX", "dequantize_kv", "quantize_kv"]

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` float -> (``[..., D]`` in ``dtype``, fp32 scales ``[...]``)."""
    if dtype not in QMAX:
        raise ValueError(f"dtype must be one of {list(QMAX)}, got {dtype}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    xf = x.float()
    amax = xf.abs().amax(-1)
    scale = torch.where(amax > 0, amax / QMAX[dtype], torch.ones_like(amax))
    y = xf / scale[..., None]
    if dtype == torch.int8:
        q = y.round_().clamp_(-127, 127).to(torch.int8)
    else:  # |y| <= 448 up to the division's rounding; clamp so the cast never overflows to NaN
        q = y.clamp_(-448.0, 448.0).to(dtype)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_kv` (fp32): ``q [..., D]``, ``scale [...]``."""
    return q.float() * scale[..., None]
