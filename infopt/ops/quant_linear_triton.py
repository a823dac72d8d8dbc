"""Launchers for the quantized linears' Triton kernels (``triton_kernels/quant_linear.py``).

Called by :mod:`infopt.ops.quant_linear`'s registry after validation. Which kernel runs:

* M <= 4: the decode kernels ``int4_gemv_kernel`` (group_size a multiple of the 8-code chunk,
  4 for fp32 x), ``int8_gemv_kernel``, ``int8_dyn_gemv_kernel`` (w8a8, after the row
  quantization kernel);
* int4, M > 4, group_size a multiple of 32: ``int4_dot_kernel`` (tensor cores);
* otherwise the tile kernels ``int8_wo_kernel`` / ``int4_wo_kernel`` / ``int8_dyn_kernel``,
  whose shape :func:`_tiles` picks.

Launch constants (``_GEMV_*``) are module globals so a benchmark can sweep them
(``examples/bench_quant_kernels_gpu.py --gemv-sweep``).
"""

from __future__ import annotations

import contextlib

import torch

from ._triton import is_interpreted, triton_status

__all__ = ["int4_triton", "int8_triton", "triton_probe", "w8a8_triton"]


def _kernels():
    from .triton_kernels import quant_linear

    return quant_linear


def triton_probe(device_type: str) -> str | None:
    return triton_status(device_type, lambda: _kernels().int8_wo_kernel)


def _prep(x: torch.Tensor, n: int, kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., K]`` -> (x2 ``[M, K]`` unit-stride along K, y ``[M, N]`` for the kernel).

    Under the interpreter a low-precision y would be rounded by truncation (see rmsnorm), so the
    kernel writes fp32 there and the launcher rounds with torch.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    y_dtype = torch.float32 if is_interpreted(kernel) else x.dtype
    return x2, torch.empty(x2.shape[0], n, device=x.device, dtype=y_dtype)


def _finish(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[1])


def _ieee(x: torch.Tensor, kernel) -> bool:
    """fp32 operands in tl.dot: for fp32 x (no TF32), and always under the interpreter, whose
    low-precision tl.dot gives wrong results (see the kernel module)."""
    return x.dtype == torch.float32 or is_interpreted(kernel)


def _tiles(m: int, block_k: int, interpreted: bool) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT) for the tile kernels. ``block_k`` is the largest K
    tile allowed (a power of 2).

    ``tl.dot`` tiles whenever there are more than 4 rows and a K tile of >= 16: at BLOCK_M = 16
    (M <= 16) they compile to a cp.async-pipelined HMMA / IMMA loop on sm_80 / sm_90, while the
    broadcast-multiply-reduce tile at 16 x 16 x 128 spills (255 registers, 216 B of stack) and
    shuffles ~1600 times per program (its SASS). The broadcast tile is left for M <= 4
    (the decode kernels take those calls when the group size allows) and K tiles < 16: 16 weight
    rows per program so even N = 4096 gives 256 programs, the [BM, BN, BK] product tile capped
    at 8K fp32 values. The interpreter prefers few, large programs (numpy per program).
    """
    import triton

    if m <= 4 or block_k < 16:
        bm = min(triton.next_power_of_2(max(m, 1)), 16)
        if interpreted:
            bk = min(block_k, 64)
            return bm, max(8, min(128, 8192 // (bm * bk))), bk, False
        bn = 16
        return bm, bn, max(1, min(block_k, 128, 8192 // (bm * bn))), False
    if m <= 16:
        return 16, 32, min(block_k, 128), True
    return 64, 64, min(block_k, 64), True


def _device_guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _bias_arg(bias: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (dummy, False) if bias is None else (bias.float().contiguous(), True)


# int4 / int8 weight-only Triton GEMV (decode): rows of x per call it serves (above, the tile
# kernels' tl.dot / broadcast paths), chunks per K step (CHUNKS * SUB weight bytes requested per
# program and step; see int4_gemv_kernel) and warps per program.
_GEMV_MAX_M = 4
_GEMV_MAX_CHUNKS = 128
_GEMV_WARPS = 1


def _gemv_chunks(units: int) -> int:
    """CHUNKS for a row of ``units`` SUB-wide chunks: at least one chunk per thread
    (32 * warps), at most the configured K step."""
    import triton

    return max(32 * _GEMV_WARPS, min(_GEMV_MAX_CHUNKS, triton.next_power_of_2(units)))


def _int4_sub(dtype: torch.dtype) -> int:
    """x pairs per thread and chunk in the int4 GEMV: 16 bytes of x (4 pairs of 16-bit x, 2 of
    fp32); the group size must be a multiple of the chunk's 2 * SUB codes."""
    return 2 if dtype == torch.float32 else 4


def _int8_gemv_triton(kern, x2, y, qweight, scale, bias):
    n, k = qweight.shape
    m = x2.shape[0]
    chunks = _gemv_chunks(-(-k // 4))
    s = scale.float().contiguous()
    b, has_bias = _bias_arg(bias, s)
    with _device_guard(x2):
        kern[(n, m)](
            x2, qweight.contiguous(), s, b, y, k, x2.stride(0), y.stride(0),
            HAS_BIAS=has_bias, CHUNKS=chunks, SUB=4, num_warps=_GEMV_WARPS,
        )  # fmt: skip


def int8_triton(x, qweight, scale, bias=None):
    import triton

    kern = _kernels().int8_wo_kernel
    n, k = qweight.shape
    x2, y = _prep(x, n, kern)
    m = x2.shape[0]
    if 0 < m <= _GEMV_MAX_M and n and k:
        _int8_gemv_triton(_kernels().int8_gemv_kernel, x2, y, qweight, scale, bias)
        return _finish(y, x)
    if m and n:
        s = scale.float().contiguous()
        b, has_bias = _bias_arg(bias, s)
        bm, bn, bk, use_dot = _tiles(m, 128, is_interpreted(kern))
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        with _device_guard(x):
            kern[grid](
                x2, qweight.contiguous(), s, b, y, m, n, k, x2.stride(0), y.stride(0),
                HAS_BIAS=has_bias, USE_DOT=use_dot, IEEE=_ieee(x, kern),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            )  # fmt: skip
    return _finish(y, x)


def _gemv_pairs(x2: torch.Tensor) -> torch.Tensor:
    """x ``[M, K]`` as the GEMV kernel reads it: rows of element pairs, so K even (a zero column
    appended when odd) and every row start aligned to a pair (4 bytes for 16-bit x, 8 for fp32);
    copied only when needed."""
    m, k = x2.shape
    pair = 2 * x2.element_size()
    aligned = x2.data_ptr() % pair == 0 and (
        m <= 1 or (x2.stride(0) * x2.element_size()) % pair == 0
    )
    if k % 2 == 0 and aligned:
        return x2
    out = torch.zeros(m, k + k % 2, device=x2.device, dtype=x2.dtype)
    out[:, :k] = x2
    return out


def _int4_gemv_triton(kern, sub, x2, y, qweight, scale, zero, group_size, bias):
    n, kb = qweight.shape
    m, k = x2.shape
    xp = _gemv_pairs(x2)
    chunks = _gemv_chunks(-(-kb // sub))
    s = scale.float().contiguous()
    b, has_bias = _bias_arg(bias, s)
    with _device_guard(x2):
        kern[(n, m)](
            xp, qweight.contiguous(), s, zero.contiguous(), b, y,
            k, kb, scale.shape[1], xp.stride(0), y.stride(0),
            GS=group_size, HAS_BIAS=has_bias, CHUNKS=chunks, SUB=sub, num_warps=_GEMV_WARPS,
        )  # fmt: skip


def _int4_dot_triton(kern, ieee, x2, y, qweight, scale, zero, group_size, bias):
    import triton

    n, kb = qweight.shape
    m = x2.shape[0]
    xp = _gemv_pairs(x2)
    # K step: 2 * BLOCK_KB codes inside one group, and >= 16 (tl.dot's minimum K).
    bkb = min(64, (group_size // 2) & -(group_size // 2))
    bm, bn, stages = (16, 32, 4) if m <= 16 else (64, 64, 3)
    s = scale.float().contiguous()
    b, has_bias = _bias_arg(bias, s)
    with _device_guard(x2):
        kern[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            xp, qweight.contiguous(), s, zero.contiguous(), b, y,
            m, n, kb, scale.shape[1], xp.stride(0), y.stride(0),
            GS=group_size, HAS_BIAS=has_bias, IEEE=ieee,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_KB=bkb, num_warps=4, num_stages=stages,
        )  # fmt: skip


def int4_triton(x, qweight, scale, zero, group_size, bias=None):
    import triton

    kern = _kernels().int4_wo_kernel
    n, kb = qweight.shape
    k = x.shape[-1]
    x2, y = _prep(x, n, kern)
    m = x2.shape[0]
    sub = _int4_sub(x.dtype)
    if 0 < m <= _GEMV_MAX_M and n and k and group_size % (2 * sub) == 0:
        gemv = _kernels().int4_gemv_kernel
        _int4_gemv_triton(gemv, sub, x2, y, qweight, scale, zero, group_size, bias)
        return _finish(y, x)
    if m > _GEMV_MAX_M and n and k and group_size % 32 == 0:
        dot = _kernels().int4_dot_kernel
        _int4_dot_triton(dot, _ieee(x, kern), x2, y, qweight, scale, zero, group_size, bias)
        return _finish(y, x)
    if m and n:
        s = scale.float().contiguous()
        b, has_bias = _bias_arg(bias, s)
        # The K tile must divide group_size: the largest power of two that does (capped later).
        bm, bn, bk, use_dot = _tiles(m, group_size & -group_size, is_interpreted(kern))
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        with _device_guard(x):
            kern[grid](
                x2, qweight.contiguous(), s, zero.contiguous(), b, y,
                m, n, k, kb, scale.shape[1], group_size, x2.stride(0), y.stride(0),
                HAS_BIAS=has_bias, USE_DOT=use_dot, IEEE=_ieee(x, kern),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            )  # fmt: skip
    return _finish(y, x)


def w8a8_triton(x, qweight, scale, bias=None):
    import triton

    mod = _kernels()
    n, k = qweight.shape
    x2, y = _prep(x, n, mod.int8_dyn_kernel)
    m = x2.shape[0]
    if m and n:
        q = torch.empty(m, k, device=x.device, dtype=torch.int8)
        xs = torch.empty(m, device=x.device, dtype=torch.float32)
        s = scale.float().contiguous()
        b, has_bias = _bias_arg(bias, s)
        bm, bn, bk, use_dot = _tiles(m, 128, is_interpreted(mod.int8_dyn_kernel))
        with _device_guard(x):
            if k:
                # Up to 8192 columns in one K tile (a row is then read once per pass instead of
                # in a chain of dependent 1024-wide loads, which dominated decode), 8 per thread.
                block_k = min(triton.next_power_of_2(k), 8192)
                mod.quantize_rows_int8_kernel[(m,)](
                    x2, q, xs, k, x2.stride(0), BLOCK_K=block_k,
                    num_warps=max(4, min(32, block_k // 256)),
                )  # fmt: skip
            else:
                xs.fill_(1.0)
            if m <= _GEMV_MAX_M and k:
                mod.int8_dyn_gemv_kernel[(n, m)](
                    q, xs, qweight.contiguous(), s, b, y, k, y.stride(0),
                    HAS_BIAS=has_bias, CHUNKS=_gemv_chunks(-(-k // 4)), SUB=4,
                    num_warps=_GEMV_WARPS,
                )  # fmt: skip
            else:
                mod.int8_dyn_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
                    q, xs, qweight.contiguous(), s, b, y, m, n, k, y.stride(0),
                    HAS_BIAS=has_bias, USE_DOT=use_dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                )  # fmt: skip
    return _finish(y, x)
