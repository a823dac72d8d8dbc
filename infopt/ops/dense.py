"""``dense_gemv``: ``y = x @ weight.T + bias`` in float32 for the few rows of a decode step.

At 1-8 rows a linear layer is a weight read: MKL's sgemm reaches 6-15 GB/s there on the
2-core AVX2 EPYC the project measures on, against ~30 GB/s of memory bandwidth, and a small
fp32 model's decode step is almost entirely these reads. The ``cpp`` kernel
(``csrc/cpu/dense_gemv.cpp``) streams each weight row once per step (2-3.5x MKL at M = 1-4:
`docs/results.md`).

Backends: ``reference`` (``torch.nn.functional.linear``, the oracle and the path for every
other case) and ``cpp`` (float32 on CPU). Results equal the reference up to fp32 summation
order.

:func:`use_dense_gemv` switches a model's float32 ``nn.Linear`` modules to call it for inputs of
at most :data:`MAX_ROWS` rows (larger inputs keep ``F.linear``); the compiled decode step of the
engine turns it on (``CompileConfig.dense_gemv``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from . import extensions
from .registry import Backend, BackendImpl, register_op, select_backend

__all__ = ["MAX_ROWS", "DenseGemvLinear", "dense_gemv", "dense_gemv_reference", "use_dense_gemv"]

_log = logging.getLogger(__name__)

#: rows (product of the leading dims) up to which :class:`DenseGemvLinear` calls the kernel; at
#: 16 rows and more MKL's blocked GEMM reuses each weight enough to win.
MAX_ROWS = 8


def dense_gemv_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear``: x ``[M, K]``, weight ``[N, K]``, bias ``[N]`` or None -> ``[M, N]``."""
    return F.linear(x, weight, bias)


def _supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        return "weight and bias must be float32"
    return None


def _dense_gemv_op(x, weight, bias):
    return torch.ops.infopt.dense_gemv.default(x, weight, bias)


register_op(
    "dense_gemv",
    dense_gemv_reference,
    {
        Backend.CPP: BackendImpl(_dense_gemv_op, extensions.cpp_probe, _supports,
                                 dtypes=(torch.float32,)),
    },
)


def dense_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a few rows.

    Args:
        x: ``[M, K]`` (any M; the kernel is meant for M <= :data:`MAX_ROWS`).
        weight: ``[N, K]`` on ``x``'s device.
        bias: ``[N]`` or None.
        backend: per-call backend override (see :mod:`infopt.ops`).

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be torch.Tensors")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K] with the same K, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [N] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise ValueError("x, weight and bias must be on one device")
    _, fn = select_backend("dense_gemv", x.device, (x, weight, bias), backend)
    return fn(x, weight, bias)


class DenseGemvLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose float32 inputs of at most :data:`MAX_ROWS` rows go through
    :func:`dense_gemv` when no gradient is needed (same parameters, same state dict); other
    inputs use ``F.linear``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
        rows = input.numel() // max(input.shape[-1], 1)
        training = torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad)
        if rows > MAX_ROWS or input.dtype != torch.float32 or training:
            return F.linear(input, self.weight, self.bias)  # the kernel is inference-only
        y = dense_gemv(input.reshape(rows, input.shape[-1]), self.weight, self.bias)
        return y.reshape(*input.shape[:-1], self.out_features)


def use_dense_gemv(model: torch.nn.Module) -> int:
    """Switch every float32 CPU ``nn.Linear`` of ``model`` (exact type) to :class:`DenseGemvLinear`
    in place; returns how many. Nothing changes when the ``cpp`` backend cannot run here (the
    reason is logged) or the model has no such layer."""
    why = extensions.cpp_probe("cpu")
    if why is not None:
        _log.info("dense_gemv: C++ kernel unavailable (%s); linears keep F.linear", why)
        return 0
    n = 0
    for mod in model.modules():
        w: Any = getattr(mod, "weight", None)
        if (type(mod) is torch.nn.Linear and isinstance(w, torch.Tensor)
                and w.dtype == torch.float32 and w.device.type == "cpu"):
            mod.__class__ = DenseGemvLinear
            n += 1
    return n
