"""Quantized linears as kernel-layer ops: int8 / int4 weight-only and w8a8 (dynamic int8).

Semantics, weight layouts and the ``reference`` backend are the pure-torch functions in
:mod:`infopt.ops.quant_ref` (``x [..., K]`` -> ``[..., N]`` in ``x.dtype``, fp32 accumulation, or
exact int32 for w8a8). Backends:

* ``cpp``: ``csrc/cpu/quant_{int8,int4,w8a8}.cpp``, SIMD paths (AVX-512 / AVX-512 VNNI / AVX2)
  picked at run time, register-level dequantization for decode (M < 24), dequantize-to-fp32 +
  MKL for prefill.
* ``triton``: kernels in ``triton_kernels/quant_linear.py`` (launchers here); CUDA natively, CPU
  only under ``TRITON_INTERPRET=1``.
* ``cuda`` (int4 only): ``csrc/cuda/int4_gemv.cu``, tensor cores (mma.sync) for bf16/fp16 x
  on sm_80+ when K % 128 == 0 and group_size = 128 * 2**j, else a warp-per-row SIMT GEMV with
  128-bit weight loads; any M. The faster CUDA path reads a tiled copy of the weights:
  :mod:`infopt.ops.int4_tiled` (``int4_tile`` / ``int4_tiled_linear``).

Kernels take ``x`` in float32/bfloat16/float16 with any strides (a non-unit-stride K dim is
copied) and return a contiguous tensor. They are inference-only: when a gradient is needed,
``AUTO`` runs the (differentiable) reference and an explicit kernel backend raises.
"""

from __future__ import annotations

import contextlib

import torch

from . import extensions, quant_ref
from ._triton import is_interpreted, triton_status
from .int4_tiled import validate as _validate_int4_tiled
from .registry import Backend, BackendImpl, register_op, select_backend

__all__ = [
    "QUANT_OPS",
    "int4_dynamic_linear",
    "int4_weight_only_linear",
    "int8_dynamic_linear",
    "int8_weight_only_linear",
    "run_validated",
    "smoke_check",
    "validate",
]

QUANT_OPS = (
    "int8_weight_only_linear",
    "int4_weight_only_linear",
    "int8_dynamic_linear",
    "int4_dynamic_linear",
)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest K whose w8a8 int32 accumulation cannot overflow (127 * 127 * K < 2**31).
_W8A8_MAX_K = 2**17


# --- validation (shared by every backend; messages name the argument) ---


def _tensor(name: str, v: object) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    return v


def _check_x(x: object) -> torch.Tensor:
    x = _tensor("x", x)
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension ([..., K]), got a 0-d tensor")
    return x


def _check_same_device(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _check_vec(name: str, v: object, n: int, optional: bool = False) -> None:
    if v is None and optional:
        return
    v = _tensor(name, v)
    if not v.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {v.dtype}")
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{name} must have shape [N] = [{n}], got {tuple(v.shape)}")


def _validate_int8(x: object, qweight: object, scale: object, bias: object) -> None:
    x = _check_x(x)
    qweight = _tensor("qweight", qweight)
    if qweight.dtype != torch.int8:
        raise ValueError(f"qweight must be int8, got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"qweight must have shape [N, K] with K = x.shape[-1] = {x.shape[-1]}, "
            f"got {tuple(qweight.shape)}"
        )
    _check_vec("scale", scale, qweight.shape[0])
    _check_vec("bias", bias, qweight.shape[0], optional=True)
    _check_same_device(x, qweight=qweight, scale=scale, bias=bias)


def _validate_int4(x, qweight, scale, zero, group_size, bias) -> None:
    x = _check_x(x)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even integer, got {group_size}")
    k = x.shape[-1]
    qweight, scale, zero = (_tensor(n, v) for n, v in (("qweight", qweight), ("scale", scale),
                                                       ("zero", zero)))  # fmt: skip
    if qweight.dtype != torch.uint8:
        raise ValueError(f"qweight must be uint8 (packed int4), got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[1] != (k + 1) // 2:
        raise ValueError(
            f"qweight must have shape [N, ceil(K/2)] = [N, {(k + 1) // 2}] for K = x.shape[-1] = "
            f"{k}, got {tuple(qweight.shape)}"
        )
    n, g = qweight.shape[0], -(-k // group_size)
    if not scale.is_floating_point() or tuple(scale.shape) != (n, g):
        raise ValueError(
            f"scale must be a floating [N, ceil(K/group_size)] = [{n}, {g}] tensor, "
            f"got {scale.dtype} {tuple(scale.shape)}"
        )
    if zero.dtype != torch.uint8 or tuple(zero.shape) != (n, g):
        raise ValueError(
            f"zero must be a uint8 [N, ceil(K/group_size)] = [{n}, {g}] tensor, "
            f"got {zero.dtype} {tuple(zero.shape)}"
        )
    _check_vec("bias", bias, n, optional=True)
    _check_same_device(x, qweight=qweight, scale=scale, zero=zero, bias=bias)


def _validate_w8a8(x: object, qweight: object, scale: object, bias: object) -> None:
    _validate_int8(x, qweight, scale, bias)
    if x.shape[-1] >= _W8A8_MAX_K:
        raise ValueError(f"x.shape[-1] = K = {x.shape[-1]} could overflow int32 (limit 2**17)")


_VALIDATORS = {
    "int8_weight_only_linear": _validate_int8,
    "int4_weight_only_linear": _validate_int4,
    "int4_dynamic_linear": _validate_int4,
    "int8_dynamic_linear": _validate_w8a8,
    # the tiled-layout op (int4_tiled.py): Int4Linear runs it through validate / run_validated
    "int4_tiled_linear": _validate_int4_tiled,
}


def validate(op: str, args: tuple) -> None:
    """Check ``args`` (the op's positional arguments) as the public function ``op`` does."""
    _VALIDATORS[op](*args)


def run_validated(op: str, args: tuple, backend: Backend | str | None = None) -> torch.Tensor:
    """Run ``op`` on ``args`` that already passed :func:`validate`: backend selection,
    fallback warnings and run counts of the public functions (which are validate + this).

    For callers whose weights are fixed (the quantized modules check theirs once, then only
    the activation per call): the Python checks cost about as much as a small decode GEMV.
    """
    _, fn = select_backend(op, args[0].device, args, backend)
    return fn(*args)


def _kernel_supports(x: torch.Tensor, *rest: object) -> str | None:
    """Per-call check shared by the kernel backends (cheap: runs on every call)."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"x dtype {x.dtype} unsupported (kernels take float32, bfloat16, float16)"
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, *rest)
    ):
        return "autograd needed (inputs require grad) and the kernels are inference-only"
    return None


# --- cpp / cuda: dispatcher ops torch.ops.infopt.* ---


def _int8_op(x, qweight, scale, bias=None):
    return torch.ops.infopt.int8_weight_only_linear.default(x, qweight, scale, bias)


def _int4_op(x, qweight, scale, zero, group_size, bias=None):
    return torch.ops.infopt.int4_weight_only_linear.default(
        x, qweight, scale, zero, group_size, bias
    )


def _int4_dyn_op(x, qweight, scale, zero, group_size, bias=None):
    return torch.ops.infopt.int4_dynamic_linear.default(x, qweight, scale, zero, group_size, bias)


def _w8a8_op(x, qweight, scale, bias=None):
    return torch.ops.infopt.int8_dynamic_linear.default(x, qweight, scale, bias)


# --- triton launchers (kernels in triton_kernels/quant_linear.py) ---


def _kernels():
    from .triton_kernels import quant_linear

    return quant_linear


def _triton_probe(device_type: str) -> str | None:
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
    """(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT): broadcast-reduce GEMV tiles for decode (M <= 16),
    tl.dot tiles (K tile >= 16) beyond. ``block_k`` is the largest K tile allowed (a power of 2).

    GEMV on a GPU: 16 weight rows per program, so even N = 4096 gives 256 programs to stream the
    weights (a few per SM), and the [BM, BN, BK] product tile is capped at 8K fp32 values (64 per
    thread at 4 warps). The interpreter prefers few, large programs (numpy per program).
    """
    import triton

    if m <= 16 or block_k < 16:
        bm = min(triton.next_power_of_2(max(m, 1)), 16)
        if interpreted:
            bk = min(block_k, 64)
            return bm, max(8, min(128, 8192 // (bm * bk))), bk, False
        bn = 16
        return bm, bn, max(1, min(block_k, 128, 8192 // (bm * bn))), False
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


def _int8_gemv_triton(kern, x2, y, qweight, scale, bias):
    import triton

    n, k = qweight.shape
    m = x2.shape[0]
    chunks = max(32 * _GEMV_WARPS, min(_GEMV_MAX_CHUNKS, triton.next_power_of_2(triton.cdiv(k, 4))))
    s = scale.float().contiguous()
    b, has_bias = _bias_arg(bias, s)
    with _device_guard(x2):
        kern[(n, m)](
            x2, qweight.contiguous(), s, b, y, k, x2.stride(0), y.stride(0),
            HAS_BIAS=has_bias, CHUNKS=chunks, SUB=4, num_warps=_GEMV_WARPS,
        )  # fmt: skip


def _int8_triton(x, qweight, scale, bias=None):
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


def _int4_gemv_triton(kern, x2, y, qweight, scale, zero, group_size, bias):
    import triton

    n, kb = qweight.shape
    m, k = x2.shape
    xp = _gemv_pairs(x2)
    sub = 4 if x2.dtype != torch.float32 else 2  # SUB x pairs = 16 bytes of x per thread
    # At least one chunk per thread (32 * warps), at most the configured K step.
    chunks = max(
        32 * _GEMV_WARPS, min(_GEMV_MAX_CHUNKS, triton.next_power_of_2(triton.cdiv(kb, sub)))
    )
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


def _int4_triton(x, qweight, scale, zero, group_size, bias=None):
    import triton

    kern = _kernels().int4_wo_kernel
    n, kb = qweight.shape
    k = x.shape[-1]
    x2, y = _prep(x, n, kern)
    m = x2.shape[0]
    sub = 4 if x.dtype != torch.float32 else 2
    if 0 < m <= _GEMV_MAX_M and n and k and group_size % (2 * sub) == 0:
        _int4_gemv_triton(
            _kernels().int4_gemv_kernel, x2, y, qweight, scale, zero, group_size, bias
        )
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


def _w8a8_triton(x, qweight, scale, bias=None):
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
                chunks = max(
                    32 * _GEMV_WARPS,
                    min(_GEMV_MAX_CHUNKS, triton.next_power_of_2(triton.cdiv(k, 4))),
                )
                mod.int8_dyn_gemv_kernel[(n, m)](
                    q, xs, qweight.contiguous(), s, b, y, k, y.stride(0),
                    HAS_BIAS=has_bias, CHUNKS=chunks, SUB=4, num_warps=_GEMV_WARPS,
                )  # fmt: skip
            else:
                mod.int8_dyn_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
                    q, xs, qweight.contiguous(), s, b, y, m, n, k, y.stride(0),
                    HAS_BIAS=has_bias, USE_DOT=use_dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                )  # fmt: skip
    return _finish(y, x)


# --- registration and public API ---

register_op(
    "int8_weight_only_linear",
    quant_ref.int8_weight_only_linear,
    {
        Backend.CPP: BackendImpl(_int8_op, extensions.cpp_probe, _kernel_supports),
        Backend.TRITON: BackendImpl(_int8_triton, _triton_probe, _kernel_supports),
    },
)
register_op(
    "int4_weight_only_linear",
    quant_ref.int4_weight_only_linear,
    {
        Backend.CPP: BackendImpl(_int4_op, extensions.cpp_probe, _kernel_supports),
        Backend.TRITON: BackendImpl(_int4_triton, _triton_probe, _kernel_supports),
        Backend.CUDA: BackendImpl(_int4_op, extensions.cuda_probe, _kernel_supports),
    },
)
# CPU only: the point of this op is the CPU's int8 dot product (on a GPU the weight-only op is
# the fast one), so AUTO on CUDA tensors runs (and reports) the reference.
register_op(
    "int4_dynamic_linear",
    quant_ref.int4_dynamic_linear,
    {Backend.CPP: BackendImpl(_int4_dyn_op, extensions.cpp_probe, _kernel_supports)},
)
register_op(
    "int8_dynamic_linear",
    quant_ref.int8_dynamic_linear,
    {
        Backend.CPP: BackendImpl(_w8a8_op, extensions.cpp_probe, _kernel_supports),
        Backend.TRITON: BackendImpl(_w8a8_triton, _triton_probe, _kernel_supports),
    },
)


def int8_weight_only_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """``y = x @ (qweight * scale[:, None]).T + bias`` (int8 weight-only, fp32 accumulation).

    Args:
        x: ``[..., K]`` float32/bfloat16/float16 (float64 runs on the reference only).
        qweight: int8 ``[N, K]``; scale: float ``[N]``; bias: float ``[N]`` or None.
        backend: ``None`` = process default (see :func:`infopt.ops.set_backend`), else a
            :class:`~infopt.ops.Backend` or its string value.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    args = (x, qweight, scale, bias)
    validate("int8_weight_only_linear", args)
    return run_validated("int8_weight_only_linear", args, backend)


def int4_weight_only_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(qweight).T + bias`` for group-wise asymmetric packed int4 weights.

    Args:
        x: ``[..., K]`` float32/bfloat16/float16.
        qweight: uint8 ``[N, ceil(K/2)]`` (low nibble = even k; see ``quant_ref``).
        scale: float ``[N, G]``; zero: uint8 ``[N, G]`` in 0..15; ``G = ceil(K / group_size)``.
        group_size: positive even int; the last group may be shorter.
        bias: float ``[N]`` or None.
        backend: as for :func:`int8_weight_only_linear`.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    args = (x, qweight, scale, zero, group_size, bias)
    validate("int4_weight_only_linear", args)
    return run_validated("int4_weight_only_linear", args, backend)


def int4_dynamic_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """int4 weights (as :func:`int4_weight_only_linear`) x int8 activations quantized on the fly
    per block of 32 along K: ``y = xhat @ dequant(qweight).T + bias`` (see
    ``quant_ref.int4_dynamic_linear``).

    The C++ kernel reproduces the reference's activation codes exactly (fp32 sums differ only
    in order) and, with AVX-512 VNNI, runs the decode GEMV on int8 dot products: memory-bound
    instead of shuffle-bound. Without VNNI, or for M >= 32, it dequantizes ``xhat`` and runs the
    weight-only kernel on it (the same math).

    Args, returns: as :func:`int4_weight_only_linear`.
    """
    args = (x, qweight, scale, zero, group_size, bias)
    validate("int4_dynamic_linear", args)
    return run_validated("int4_dynamic_linear", args, backend)


def int8_dynamic_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """W8A8: per-token dynamic symmetric int8 ``x`` times int8 ``qweight``, exact int32 sums.

    ``y[m, n] = (sum_k xq[m, k] * qweight[n, k]) * x_scale[m] * scale[n] + bias[n]`` with
    ``xq, x_scale = quant_ref.quantize_per_token_int8(x)``; the kernels reproduce the reference
    bit for bit on float32 outputs.

    Args:
        x: ``[..., K]`` float32/bfloat16/float16, ``K < 2**17``.
        qweight: int8 ``[N, K]``; scale: float ``[N]``; bias: float ``[N]`` or None.
        backend: as for :func:`int8_weight_only_linear`.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    args = (x, qweight, scale, bias)
    validate("int8_dynamic_linear", args)
    return run_validated("int8_dynamic_linear", args, backend)


def smoke_check(op: str, device: str, backend: str) -> str:
    """'' if ``backend`` matches the reference for ``op`` on small fp32 and bf16 inputs, else what
    went wrong (for ``python -m infopt.ops.build``). SQNR bounds as in tests/test_ops_quant.py."""
    problems = []
    g = torch.Generator().manual_seed(0)
    m, k, n, gs = 5, 576, 96, 64
    for dtype, min_db in ((torch.float32, 100.0), (torch.bfloat16, 42.0)):
        x = torch.randn(m, k, generator=g)
        b = torch.randn(n, generator=g)
        if op in ("int4_weight_only_linear", "int4_dynamic_linear"):
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            q = codes[:, 0::2] | (codes[:, 1::2] << 4)
            z = torch.randint(0, 16, (n, k // gs), generator=g, dtype=torch.uint8)
            rest = [q, torch.rand(n, k // gs, generator=g) + 0.1, z, gs, b]
        else:
            q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            rest = [q, torch.rand(n, generator=g) + 0.1, b]
        args = [x.to(dtype)] + rest
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        try:
            got = globals()[op](*args, backend=backend).double().cpu()
        except Exception as e:  # a crash is a failed check, reported with the others
            problems.append(f"{dtype}: {type(e).__name__}: {e}")
            continue
        ref = getattr(quant_ref, op)(args[0].float(), *args[1:]).double().cpu()
        noise = torch.linalg.vector_norm(ref - got)
        db = float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))
        if not db > min_db:
            problems.append(f"{dtype}: SQNR {db:.1f} dB <= {min_db}")
    return "; ".join(problems)
