"""Lazy Triton availability checks shared by the ops' Triton launchers.

Nothing here imports triton at module import time: ``import infopt.ops`` stays cheap and the
caller can still set ``TRITON_INTERPRET=1`` before the first kernel module is imported.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["is_interpreted", "triton_status"]


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def is_interpreted(kernel: Any) -> bool:
    """True if ``kernel`` (a ``@triton.jit`` object) was created in interpreter mode.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so this is the ground truth for
    whether the kernel will run on CPU tensors, whatever the environment says now.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout change in a future triton
        return type(kernel).__name__ == "InterpretedFunction"
    return isinstance(kernel, InterpretedFunction)


def triton_status(device_type: str, kernel_getter=None) -> str | None:
    """None if Triton can run kernels on ``device_type`` tensors, else the reason.

    ``kernel_getter`` returns one of the op's kernels (importing its module); on CPU it must be an
    interpreter kernel, because natively Triton only targets GPUs.
    """
    if (err := _import_error()) is not None:
        return err
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device visible (torch.cuda.is_available() is False)"
        return None
    if device_type == "cpu":
        if kernel_getter is None or not is_interpreted(kernel_getter()):
            return (
                "Triton runs on CPU tensors only through its interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported (correctness tool, slow)"
            )
        return None
    return f"Triton does not target {device_type!r} tensors"
