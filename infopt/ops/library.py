"""Fake (meta) implementations of the ``infopt::*`` ops defined in ``csrc/cpu/schema.cpp``.

The schemas live in C++ (defined exactly once); their shape/dtype propagation for FakeTensor,
``torch.compile`` and ``torch.export`` lives here, all in one place. :func:`register_fakes` runs
right after the CPU library is loaded (the op must exist before a fake can be attached).
"""

from __future__ import annotations

import threading

import torch

__all__ = ["register_fakes"]

_registered = False
_lock = threading.Lock()


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The kernels always write a fresh contiguous tensor of x's shape and dtype.
    torch._check(weight.dim() == 1, lambda: f"weight must be 1-D, got {weight.dim()}-D")
    torch._check(
        x.dim() >= 1 and x.shape[-1] == weight.shape[0],
        lambda: f"x.shape[-1] must equal weight.shape[0], got {tuple(x.shape)} / {weight.shape[0]}",
    )
    return x.new_empty(x.shape)


def register_fakes() -> None:
    """Attach fake impls to the loaded ``infopt::*`` ops (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        torch.library.register_fake("infopt::rms_norm")(_rms_norm_fake)
        _registered = True
