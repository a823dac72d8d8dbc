"""RMSNorm: ``y = weight * to(x.dtype)(x * rsqrt(mean(x**2, -1) + eps))`` with fp32 math.

Backends: ``reference`` (pure torch, bit-identical to HF ``LlamaRMSNorm`` when ``weight.dtype ==
x.dtype``), ``cpp`` (``csrc/cpu/rmsnorm.cpp``), ``triton`` (kernel in
``triton_kernels/rmsnorm.py``, launcher here), ``cuda`` (``csrc/cuda/rmsnorm.cu``).

Layouts: ``x`` is ``[..., H]`` with any leading dims and any strides. Kernel launchers view it as
``[rows, H]``; rows may be strided (a slice of a wider buffer costs no copy) but the hidden dim
must be unit-stride, else the launcher copies with ``.contiguous()``. Kernels return a fresh
contiguous tensor with ``x``'s shape and dtype; the reference follows torch's elementwise layout
rules (like HF).

Dtypes: the kernels take ``x`` in float32/bfloat16/float16 and ``weight`` in ``x.dtype`` or
float32; anything else (e.g. float64) runs on the reference. With a float32 weight and
low-precision ``x`` the output still has ``x``'s dtype (HF would promote to float32 there).

Autograd: the kernels are inference-only. When a gradient is needed, ``AUTO`` runs the
(differentiable) reference and an explicitly requested kernel backend raises.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from . import extensions
from ._triton import is_interpreted, triton_status
from .registry import Backend, BackendImpl, register_op, select_backend

__all__ = ["rms_norm", "rms_norm_reference"]

# Triton: rows up to this many elements are held in registers in one pass; longer rows loop over
# chunks of _TRITON_CHUNK (two passes over x). Module-level so tests can force the looped variant.
_TRITON_MAX_SINGLE_PASS = 8192
_TRITON_CHUNK = 4096


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pure-torch RMSNorm; the CPU fallback and the test oracle.

    Same op order as ``transformers`` ``LlamaRMSNorm.forward`` (fp32 variance via ``pow(2).mean``,
    ``rsqrt``, cast back to the input dtype, then ``weight *``), so it is bit-identical to HF when
    ``weight.dtype == x.dtype``. The trailing ``.to(x.dtype)`` only matters for mixed dtypes.

    x: ``[..., H]`` floating; weight: ``[H]`` floating. Returns ``[..., H]`` in ``x.dtype``.
    """
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return (weight * h.to(input_dtype)).to(input_dtype)


def _validate(x: object, weight: object, eps: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must have a floating dtype, got {weight.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension ([..., H]), got a 0-d tensor")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape [H] = [{x.shape[-1]}] to match x.shape[-1], "
            f"got weight.shape={tuple(weight.shape)} for x.shape={tuple(x.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def _kernel_supports(x: torch.Tensor, weight: torch.Tensor, eps: float) -> str | None:
    """Per-call check of the three kernel backends beyond the registry's dtype / autograd one."""
    if weight.dtype != x.dtype and weight.dtype != torch.float32:
        return f"weight dtype {weight.dtype} unsupported (must be x.dtype={x.dtype} or float32)"
    return None


# --- cpp / cuda: the dispatcher op torch.ops.infopt.rms_norm (CPU and CUDA impls) ---


def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.infopt.rms_norm.default(x, weight, float(eps))


# --- triton: launcher (the kernel itself lives in triton_kernels/rmsnorm.py) ---


def _triton_kernel():
    from .triton_kernels.rmsnorm import rms_norm_kernel

    return rms_norm_kernel


def _triton_probe(device_type: str) -> str | None:
    return triton_status(device_type, _triton_kernel)


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Launch one program per row. x ``[..., H]``, weight ``[H]`` -> ``[..., H]`` contiguous."""
    import triton

    kernel = _triton_kernel()
    hidden = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2 = x.reshape(-1, hidden)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    w = weight.contiguous()
    rows = x2.shape[0]
    block = triton.next_power_of_2(hidden)
    single = block <= _TRITON_MAX_SINGLE_PASS
    if not single:
        block = _TRITON_CHUNK
    # ~256 elements per warp keeps register pressure sane for the single-pass variant.
    num_warps = min(max(block // 256, 1), 16)
    x_stride = x2.stride(0) if rows > 1 else hidden
    # The interpreter truncates fp32 -> bf16; the kernel then rounds in software (see kernel).
    soft_bf16 = x.dtype == torch.bfloat16 and is_interpreted(kernel)
    # Triton launches on the current device; make that x's device (multi-GPU).
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        kernel[(rows,)](
            x2, w, y, x_stride, hidden, hidden, float(eps),
            BLOCK=block, SINGLE_PASS=single, SOFT_BF16=soft_bf16, num_warps=num_warps,
        )  # fmt: skip
    return y


register_op(
    "rms_norm",
    rms_norm_reference,
    {
        Backend.CPP: BackendImpl(_rms_norm_op, extensions.cpp_probe, _kernel_supports),
        Backend.TRITON: BackendImpl(_rms_norm_triton, _triton_probe, _kernel_supports),
        Backend.CUDA: BackendImpl(_rms_norm_op, extensions.cuda_probe, _kernel_supports),
    },
)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim with HF ``LlamaRMSNorm`` semantics (fp32 math).

    Args:
        x: ``[..., H]`` floating tensor, any leading dims, any strides.
        weight: ``[H]`` floating tensor on ``x``'s device.
        eps: added to the mean square before the reciprocal square root (finite, ``>= 0``).
        backend: ``None`` uses the process default (see :func:`infopt.ops.set_backend`); else a
            :class:`~infopt.ops.Backend` or its string value. An explicit backend that can't run
            this input raises :class:`~infopt.ops.BackendUnavailableError`.

    Returns:
        ``[..., H]`` tensor in ``x.dtype`` (contiguous from the kernel backends).
    """
    _validate(x, weight, eps)
    _, fn = select_backend("rms_norm", x.device, (x, weight, eps), backend)
    return fn(x, weight, eps)
