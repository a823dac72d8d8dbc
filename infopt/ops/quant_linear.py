"""Quantized linears as kernel-layer ops: int8 / int4 weight-only and w8a8 (dynamic int8).

Semantics, weight layouts and the ``reference`` backend are the pure-torch functions in
:mod:`infopt.ops.quant_ref` (``x [..., K]`` -> ``[..., N]`` in ``x.dtype``, fp32 accumulation, or
exact int32 for w8a8). Backends:

* ``cpp``: ``csrc/cpu/quant_{int8,int4,w8a8}.cpp``, SIMD paths (AVX-512 / AVX-512 VNNI / AVX2)
  picked at run time, register-level dequantization for decode (M < 24), dequantize-to-fp32 +
  MKL for prefill.
* ``triton``: kernels in ``triton_kernels/quant_linear.py``, launchers in
  :mod:`infopt.ops.quant_linear_triton`; CUDA natively, CPU only under ``TRITON_INTERPRET=1``.
* ``cuda`` (int4 only): ``csrc/cuda/int4_gemv.cu``, tensor cores (mma.sync) for bf16/fp16 x
  on sm_80+ when K % 128 == 0 and group_size = 128 * 2**j, else a warp-per-row SIMT GEMV with
  128-bit weight loads; any M. The faster CUDA path reads a tiled copy of the weights:
  :mod:`infopt.ops.int4_tiled` (``int4_tile`` / ``int4_tiled_linear``).

Kernels take ``x`` in float32/bfloat16/float16 with any strides (a non-unit-stride K dim is
copied) and return a contiguous tensor. They are inference-only: when a gradient is needed,
``AUTO`` runs the (differentiable) reference and an explicit kernel backend raises.
"""

from __future__ import annotations

import torch

from . import extensions, quant_ref
from .int4_tiled import validate as _validate_int4_tiled
from .quant_linear_triton import int4_triton as _int4_triton
from .quant_linear_triton import int8_triton as _int8_triton
from .quant_linear_triton import triton_probe as _triton_probe
from .quant_linear_triton import w8a8_triton as _w8a8_triton
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
    fallback notices and run counts of the public functions (which are validate + this).

    For callers whose weights are fixed (the quantized modules check theirs once, then only
    the activation per call): the Python checks cost about as much as a small decode GEMV.
    """
    _, fn = select_backend(op, args[0].device, args, backend)
    return fn(*args)


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


# --- registration and public API ---

register_op(
    "int8_weight_only_linear",
    quant_ref.int8_weight_only_linear,
    {
        Backend.CPP: BackendImpl(_int8_op, extensions.cpp_probe),
        Backend.TRITON: BackendImpl(_int8_triton, _triton_probe),
    },
)
register_op(
    "int4_weight_only_linear",
    quant_ref.int4_weight_only_linear,
    {
        Backend.CPP: BackendImpl(_int4_op, extensions.cpp_probe),
        Backend.TRITON: BackendImpl(_int4_triton, _triton_probe),
        Backend.CUDA: BackendImpl(_int4_op, extensions.cuda_probe),
    },
)
# CPU only: the point of this op is the CPU's int8 dot product (on a GPU the weight-only op is
# the fast one), so AUTO on CUDA tensors runs (and reports) the reference.
register_op(
    "int4_dynamic_linear",
    quant_ref.int4_dynamic_linear,
    {Backend.CPP: BackendImpl(_int4_dyn_op, extensions.cpp_probe)},
)
register_op(
    "int8_dynamic_linear",
    quant_ref.int8_dynamic_linear,
    {
        Backend.CPP: BackendImpl(_w8a8_op, extensions.cpp_probe),
        Backend.TRITON: BackendImpl(_w8a8_triton, _triton_probe),
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
