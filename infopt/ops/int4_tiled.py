"""int4 weight-only linear on the tiled layout the CUDA tensor-core kernel reads.

The row-major int4 format of :mod:`infopt.ops.quant_ref` (``qweight [N, ceil(K/2)]``, ``scale``
and ``zero [N, G]``) is what :mod:`infopt.quant` stores and serialises. For CUDA decode the same
numbers are repacked once by :func:`int4_tile` (pure torch, any device; :func:`int4_untile` is
its exact inverse) into

* ``codes`` uint8 ``[T, S, 1024]``, ``T = ceil(N / 16)``, ``S = K / 128``: chunk ``(t, s)`` holds
  rows ``16t .. 16t+15`` x ``k = 128s .. 128s+127``, in the order one warp's two coalesced
  512-byte loads hand each thread its mma fragments (byte ``512h + 16(4g + c) + 4j + b`` holds
  row ``16t + g + 8h``, codes ``k = 128s + 32c + 8j + p(2b)`` (low nibble) and ``p(2b+1)``
  (high), ``p = (0, 2, 4, 6, 1, 3, 5, 7)``); rows ``>= N`` are zero;
* ``meta`` uint8 ``[T, G, 80]``: per tile and group, the 16 rows' float32 scales as pairs
  (row ``g``, row ``g + 8``) in bytes ``8g .. 8g+7``, then their uint8 zero points as pairs in
  bytes ``64 + 2g``, ``65 + 2g``.

The tiled layout needs ``K % 128 == 0`` and ``group_size = 128 * 2**j`` (the default 128 is
one): :func:`tiled_layout_supported` says why not otherwise. :func:`int4_tiled_linear` has the
semantics of :func:`~infopt.ops.int4_weight_only_linear` (its reference untiles and runs that
op's reference). Backends: ``reference`` and ``cuda`` (``csrc/cuda/int4_tiled.cu``, bf16 /
fp16 ``x`` on sm_80+). Layout details: ``csrc/cuda/int4_tiled.h``; speed: ``docs/results.md``.
"""

from __future__ import annotations

import torch

from . import extensions, quant_ref
from .registry import (
    Backend,
    BackendImpl,
    get_backend,
    kernel_call_check,
    register_op,
    select_backend,
)

__all__ = [
    "int4_tile",
    "int4_tiled_linear",
    "int4_tiled_linear_reference",
    "int4_untile",
    "tiled_cuda_ready",
    "tiled_layout_supported",
]

TILE_ROWS = 16  # rows per tile: the mma's M
STEP_K = 128  # k per chunk: one warp iteration
META_BYTES = 80  # 16 float32 scales + 16 uint8 zeros per (tile, group)
# nibble n of each 32-bit word holds the code of k offset _ORDER[n] within its 8 k
_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_INVERSE = tuple(_ORDER.index(i) for i in range(8))
_CUDA_DTYPES = (torch.bfloat16, torch.float16)


def tiled_layout_supported(k: int, group_size: int) -> str | None:
    """None if ``K`` x ``group_size`` fits the tiled layout, else the reason."""
    if k <= 0 or k % STEP_K:
        return f"K = {k} must be a positive multiple of {STEP_K}"
    if group_size < STEP_K or group_size & (group_size - 1):
        return f"group_size = {group_size} must be 128 * 2**j (128, 256, 512, ...)"
    return None


def _check_group_size(group_size: object) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    return group_size


def int4_tile(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack row-major int4 weights into the tiled layout (exact; same device).

    Args:
        qweight: uint8 ``[N, K/2]`` (low nibble = even k); scale: float ``[N, G]`` (stored as
            float32); zero: uint8 ``[N, G]``; ``G = ceil(K / group_size)``.
    Returns:
        ``(codes uint8 [T, K/128, 1024], meta uint8 [T, G, 80])``, ``T = ceil(N / 16)``.
    """
    group_size = _check_group_size(group_size)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError("qweight must be a uint8 [N, K/2] tensor")
    n, kb = qweight.shape
    k = 2 * kb
    reason = tiled_layout_supported(k, group_size)
    if reason is not None:
        raise ValueError(f"int4_tile: {reason}")
    g = -(-k // group_size)
    if (
        not isinstance(scale, torch.Tensor)
        or not scale.is_floating_point()
        or (tuple(scale.shape) != (n, g))
    ):
        raise ValueError(f"scale must be a floating [N, G] = [{n}, {g}] tensor")
    if (
        not isinstance(zero, torch.Tensor)
        or zero.dtype != torch.uint8
        or (tuple(zero.shape) != (n, g))
    ):
        raise ValueError(f"zero must be a uint8 [N, G] = [{n}, {g}] tensor")
    t, s, dev = -(-n // TILE_ROWS), k // STEP_K, qweight.device
    codes = torch.zeros(t * TILE_ROWS, k, dtype=torch.uint8, device=dev)
    codes[:n] = torch.stack((qweight & 0xF, qweight >> 4), -1).reshape(n, k)
    # [t, h, g, s, c, j, 8 k]: row 16t + 8h + g, k = 128s + 32c + 8j + kk
    c = codes.view(t, 2, 8, s, 4, 4, 8)[..., list(_ORDER)]
    packed = c[..., 0::2] | (c[..., 1::2] << 4)  # byte b: nibbles 2b, 2b + 1
    codes = packed.permute(0, 3, 1, 2, 4, 5, 6).reshape(t, s, 1024).contiguous()
    sc = torch.zeros(t * TILE_ROWS, g, dtype=torch.float32, device=dev)
    sc[:n] = scale.float()
    zp = torch.zeros(t * TILE_ROWS, g, dtype=torch.uint8, device=dev)
    zp[:n] = zero
    # [t, h, g, G] -> [t, G, g, h]: (row g, row g + 8) pairs
    sc = sc.view(t, 2, 8, g).permute(0, 3, 2, 1).contiguous()
    zp = zp.view(t, 2, 8, g).permute(0, 3, 2, 1).contiguous()
    meta = torch.cat((sc.view(torch.uint8).reshape(t, g, 64), zp.reshape(t, g, 16)), -1)
    return codes, meta.contiguous()


def int4_untile(
    codes: torch.Tensor, meta: torch.Tensor, n: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`int4_tile`: ``(qweight [N, K/2], scale float32 [N, G], zero [N, G])``."""
    t, s, _ = codes.shape
    k, g = s * STEP_K, meta.shape[1]
    b = codes.reshape(t, s, 2, 8, 4, 4, 4)  # [t, s, h, g, c, j, byte]
    nib = torch.stack((b & 0xF, b >> 4), -1).reshape(t, s, 2, 8, 4, 4, 8)[..., list(_INVERSE)]
    rows = nib.permute(0, 2, 3, 1, 4, 5, 6).reshape(t * TILE_ROWS, k)[:n]
    qweight = (rows[:, 0::2] | (rows[:, 1::2] << 4)).contiguous()
    m = meta.reshape(t, g, META_BYTES)
    sc = m[..., :64].contiguous().view(torch.float32).reshape(t, g, 8, 2)
    zp = m[..., 64:].reshape(t, g, 8, 2)
    scale = sc.permute(0, 3, 2, 1).reshape(t * TILE_ROWS, g)[:n].contiguous()
    zero = zp.permute(0, 3, 2, 1).reshape(t * TILE_ROWS, g)[:n].contiguous()
    return qweight, scale, zero


def int4_tiled_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    meta: torch.Tensor,
    n: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch oracle: untile, then ``quant_ref.int4_weight_only_linear``."""
    qweight, scale, zero = int4_untile(codes, meta, n, group_size)
    return quant_ref.int4_weight_only_linear(x, qweight, scale, zero, group_size, bias)


def validate(x, codes, meta, n, group_size, bias=None) -> None:
    """Check the arguments of :func:`int4_tiled_linear` (errors name the argument)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating tensor [..., K]")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int (output features), got {n!r}")
    group_size = _check_group_size(group_size)
    k = x.shape[-1]
    reason = tiled_layout_supported(k, group_size)
    if reason is not None:
        raise ValueError(f"x.shape[-1] / group_size do not fit the tiled layout: {reason}")
    t, g = -(-n // TILE_ROWS), -(-k // group_size)
    for name, v, shape in (("codes", codes, (t, k // STEP_K, 1024)),
                           ("meta", meta, (t, g, META_BYTES))):  # fmt: skip
        if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8 or tuple(v.shape) != shape:
            got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a uint8 {list(shape)} tensor (int4_tile), got {got}")
        if v.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {v.device}")
    if bias is not None:
        if (
            not isinstance(bias, torch.Tensor)
            or not bias.is_floating_point()
            or (tuple(bias.shape) != (n,))
        ):
            raise ValueError(f"bias must be a floating [N] = [{n}] tensor")
        if bias.device != x.device:
            raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")


_capability: dict[int, tuple[int, int]] = {}


def _sm80(device: torch.device) -> bool:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _capability:
        _capability[idx] = torch.cuda.get_device_capability(idx)
    return _capability[idx] >= (8, 0)


def _cuda_supports(x: torch.Tensor, *rest: object) -> str | None:
    # (the dtype and autograd checks run in the registry first: kernel_call_check)
    if not _sm80(x.device):
        return "the tiled kernel needs tensor cores of sm_80+ (mma.sync bf16/fp16)"
    return None


def _cuda_op(x, codes, meta, n, group_size, bias=None):
    return torch.ops.infopt.int4_tiled_linear.default(x, codes, meta, n, group_size, bias)


_CUDA_IMPL = BackendImpl(_cuda_op, extensions.cuda_probe, _cuda_supports, dtypes=_CUDA_DTYPES)


register_op(
    "int4_tiled_linear",
    int4_tiled_linear_reference,
    {Backend.CUDA: _CUDA_IMPL},
)


def int4_tiled_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    meta: torch.Tensor,
    n: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(W).T + bias`` with ``W`` given in the tiled layout (:func:`int4_tile`).

    Args:
        x: ``[..., K]`` floating, ``K % 128 == 0``.
        codes, meta: from :func:`int4_tile` (``[ceil(N/16), K/128, 1024]``,
            ``[ceil(N/16), ceil(K/group_size), 80]`` uint8).
        n: output features ``N``; group_size: ``128 * 2**j``; bias: float ``[N]`` or None.
        backend: as for :func:`~infopt.ops.int4_weight_only_linear` (``cuda`` or ``reference``).
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    args = (x, codes, meta, n, group_size, bias)
    validate(*args)
    _, fn = select_backend("int4_tiled_linear", x.device, args, backend)
    return fn(*args)


# Below this K the row-major kernel (int4_gemv.cu, 4 warps x 4 steps) is as fast or faster
# (H100, K = 1536: 5.9 vs 6.0 us at M = 1, 6.0 vs 6.6-6.9 us at M = 4; docs/results.md).
MIN_ROUTED_K = 2048


def tiled_cuda_ready(x: torch.Tensor, k: int, group_size: int) -> bool:
    """True if :class:`~infopt.quant.Int4Linear` should route a weight-only call with activation
    ``x`` to the tiled CUDA kernel: it would run under the current backend setting (``auto`` or
    ``cuda``) and ``K >= MIN_ROUTED_K``, where it beats the row-major kernel."""
    if not x.is_cuda or k < MIN_ROUTED_K or get_backend() not in (Backend.AUTO, Backend.CUDA):
        return False
    if tiled_layout_supported(k, group_size) is not None or kernel_call_check(_CUDA_IMPL, (x,)):
        return False
    return extensions.cuda_probe("cuda") is None
