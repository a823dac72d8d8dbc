"""Quantized weight formats: quantize / dequantize / pack over plain tensors.

Weights are ``[N, K]`` (``nn.Linear`` layout: N = out features, K = in features).

* **int8** weight-only: symmetric per output channel, ``scale[n] = max|w[n]| / 127``, codes
  -127..127 (``-128`` is never produced so the grid is symmetric).
* **int4** weight-only: asymmetric, one ``(scale, zero)`` per ``(row, group)`` where a group is
  ``group_size`` consecutive columns along K (the last group is shorter when K is not a
  multiple of ``group_size``: K=576 with g128 = 4 groups of 128 + 1 of 64). The range is
  ``[min(w_g, 0), max(w_g, 0)]`` so 0.0 is exactly representable; ``scale = range / 15``,
  integer ``zero = round(-min / scale)`` in 0..15, ``code = clamp(round(w / scale) + zero,
  0, 15)``, ``w ~= (code - zero) * scale``. Max abs error is ``scale / 2`` (no clipping).
  Codes are packed two per byte, see :func:`pack_int4`.
* **fp8** (e4m3): per-output-channel ``scale[n] = max|w[n]| / 448``, weight stored as
  ``torch.float8_e4m3fn``.

Validation errors name the argument and the accepted values.
"""

from __future__ import annotations

import torch

from ..ops.quant_ref import (
    FP8_E4M3_MAX,
    dequantize_int4_packed,
    quantize_per_token_int8,
    true_div,
    unpack_int4,
)

__all__ = [
    "GROUP_SIZES",
    "SUPPORTED_BITS",
    "check_group_size",
    "check_weight",
    "dequantize_fp8",
    "dequantize_int4",
    "dequantize_int8",
    "fake_quantize_int4",
    "int4_codes",
    "int4_params",
    "num_groups",
    "pack_int4",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "quantize_weight",
    "sqnr_db",
    "unpack_int4",
]

SUPPORTED_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_weight(w: object, name: str = "weight") -> torch.Tensor:
    """Raise unless ``w`` is a 2-D floating-point tensor ``[N, K]``; returns it."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got {w.dtype}"
        )
    if w.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [out_features, in_features], got shape {tuple(w.shape)}"
        )
    if w.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(w.shape)}")
    return w


def check_group_size(group_size: object) -> int:
    """Raise unless ``group_size`` is one of :data:`GROUP_SIZES`; returns it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int in {GROUP_SIZES}, got {group_size!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    return group_size


def num_groups(k: int, group_size: int) -> int:
    """``ceil(k / group_size)``: groups along K including a ragged last one."""
    return (k + group_size - 1) // group_size


# ----------------------------------------------------------------------------------- int8


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``w [N, K]`` -> (int8 ``[N, K]``, fp32 scale ``[N]``).

    An all-zero row gets scale 1 (its codes are 0), so dequantization never divides by 0.
    """
    # The same rule as the per-token activation quantization of W8A8 (quant_ref).
    return quantize_per_token_int8(check_weight(w))


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` x scale ``[N]`` -> fp32 ``[N, K]``."""
    return qweight.float() * scale.float()[:, None]


# ----------------------------------------------------------------------------------- int4


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes uint8 ``[N, K]`` (values 0..15) into uint8 ``[N, ceil(K/2)]``.

    Byte ``j`` of row ``n`` = ``codes[n, 2j] | codes[n, 2j+1] << 4``: low nibble = even k. For
    odd K the final high nibble is 0. Why this layout: each output row is one contiguous run
    of bytes in K order, which is exactly what a row-wise GEMV (decode, M=1) streams; a byte
    yields two adjacent k's that multiply two adjacent activations, and because every group
    size is even a group is a whole number of bytes, so a kernel loads one (scale, zero) per
    ``group_size / 2`` bytes and dequantizes in registers with a mask and a shift.
    """
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D tensor [N, K], got {getattr(codes, 'shape', codes)}")
    if codes.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("codes must be in 0..15 to pack as int4")
    c = codes.to(torch.uint8)
    if c.shape[1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))  # pad nibble = 0
    return c[:, 0::2] | (c[:, 1::2] << 4)


def _grouped(wf: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 ``[N, K]`` -> ``[N, G, group_size]``, the ragged tail zero-padded.

    Zero padding is exact for this format: the range always includes 0, so padded zeros
    never change a group's min/max.
    """
    n, k = wf.shape
    g = num_groups(k, group_size)
    if g * group_size != k:
        wf = torch.nn.functional.pad(wf, (0, g * group_size - k))
    return wf.reshape(n, g, group_size)


def int4_params(
    w: torch.Tensor, group_size: int = 128, clip_ratio: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 ``(scale fp32 [N, G], zero uint8 [N, G])`` for ``w [N, K]``.

    Args:
        clip_ratio: optional scalar or ``[N, G]`` factor in (0, 1] that shrinks each group's
            range before computing the grid (AWQ's clipping search); values outside the
            shrunk range then clamp to the end codes.
    """
    wf = check_weight(w).float()
    gw = _grouped(wf, check_group_size(group_size))
    wmin, wmax = torch.aminmax(gw, dim=-1)  # one pass over the weight
    wmin, wmax = wmin.clamp(max=0.0), wmax.clamp(min=0.0)
    if clip_ratio is not None:
        wmin = wmin * clip_ratio
        wmax = wmax * clip_ratio
    rng = wmax - wmin
    scale = torch.where(rng > 0, true_div(rng, 15.0), torch.ones_like(rng))
    zero = torch.round(-wmin / scale).clamp_(0, 15).to(torch.uint8)
    return scale, zero


def int4_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Codes uint8 ``[N, K]`` of ``w`` on the given per-group grid."""
    wf = check_weight(w).float()
    k = wf.shape[1]
    gw = _grouped(wf, group_size)
    q = torch.round(gw / scale[..., None]) + zero[..., None].float()
    return q.clamp_(0, 15).to(torch.uint8).reshape(wf.shape[0], -1)[:, :k]


def quantize_int4(
    w: torch.Tensor, group_size: int = 128, clip_ratio: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 (RTN).

    Args:
        w: float ``[N, K]``.
        group_size: 32, 64 or 128 columns per group along K.
        clip_ratio: see :func:`int4_params`.
    Returns:
        ``(qweight uint8 [N, ceil(K/2)], scale fp32 [N, G], zero uint8 [N, G])``.
    """
    scale, zero = int4_params(w, group_size, clip_ratio)
    return pack_int4(int4_codes(w, scale, zero, group_size)), scale, zero


def dequantize_int4(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, k: int
) -> torch.Tensor:
    """Packed int4 -> fp32 ``[N, K]`` (``k`` is needed because an odd K is padded)."""
    return dequantize_int4_packed(qweight, scale, zero, group_size, k)


def fake_quantize_int4(
    w: torch.Tensor, group_size: int = 128, clip_ratio: torch.Tensor | float | None = None
) -> torch.Tensor:
    """``dequantize(quantize(w))`` as fp32 ``[N, K]`` without packing (for searches)."""
    scale, zero = int4_params(w, group_size, clip_ratio)
    s, z = scale[..., None], zero[..., None].float()
    # One new [N, G, gs] tensor, then in-place steps: the same operations in the same order
    # as the out-of-place form, without a fresh weight-sized allocation per step (distillation
    # with fake quantization rounds every trained weight on every forward).
    q = _grouped(w.float(), group_size) / s
    q.round_().add_(z).clamp_(0, 15).sub_(z).mul_(s)
    return q.reshape(w.shape[0], -1)[:, : w.shape[1]]


# ------------------------------------------------------------------------------------ fp8


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3: ``w [N, K]`` -> (float8_e4m3fn ``[N, K]``, fp32 scale ``[N]``)."""
    wf = check_weight(w).float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, true_div(amax, FP8_E4M3_MAX), torch.ones_like(amax))
    q = (wf / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn ``[N, K]`` x scale ``[N]`` -> fp32 ``[N, K]``."""
    return weight.float() * scale.float()[:, None]


# -------------------------------------------------------------------------------- generic


def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> tuple:
    """Validated entry point: ``bits=8`` -> :func:`quantize_int8`, ``bits=4`` ->
    :func:`quantize_int4` (``group_size`` only applies to 4 bits)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    check_weight(w)
    if bits == 8:
        return quantize_int8(w)
    return quantize_int4(w, check_group_size(group_size))


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    r = reference.detach().double()
    noise = (r - approx.detach().double()).pow(2).sum()
    return float(10 * torch.log10(r.pow(2).sum() / noise.clamp_min(1e-300)))
