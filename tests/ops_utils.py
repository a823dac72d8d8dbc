"""Shared helpers for the kernel-layer tests (tests/test_ops_*.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Per-dtype tolerances for kernel-vs-reference comparisons, derived (not tuned):
#  * fp32: only the summation order and the last ulp of 1/sqrt differ, a relative error of
#    ~1e-6 at H=4096; 1e-5 leaves headroom without hiding a wrong formula (those are O(1e-2)).
#  * bf16/fp16: the fp32 row scale may differ in its last bits, which can flip the rounding of
#    the normalized value by one ulp, and the weight multiply rounds once more: at most 2 ulps,
#    i.e. 2 * 2**-7 (bf16) / 2 * 2**-10 (fp16) relative. atol only covers fp16 subnormals.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2 * 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2 * 2**-10, "atol": 1e-5},
}


def sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 * log10(||ref|| / ||ref - actual||).

    Computed in float64; ``inf`` when the tensors are identical.
    """
    ref64, act64 = ref.detach().double(), actual.detach().double()
    noise = torch.linalg.vector_norm(ref64 - act64)
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(ref64) / noise))


def assert_finite(t: torch.Tensor, what: str = "output") -> None:
    """Fail with a count of NaN/Inf elements (assert_close on NaNs gives a confusing message)."""
    bad = ~torch.isfinite(t)
    if bad.any():
        raise AssertionError(f"{what} has {int(bad.sum())} non-finite of {t.numel()} elements")


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """assert_close with the derived per-dtype tolerances above, after a NaN/Inf check."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert_finite(actual, what or "actual")
    torch.testing.assert_close(
        actual.float(), expected.float(), **TOLERANCES[expected.dtype], msg=lambda m: f"{what}{m}"
    )


def run_python(code: str, env: dict[str, str | None] | None = None, timeout: float = 240) -> str:
    """Run ``code`` in a fresh interpreter at the repo root; returns stdout + stderr.

    ``env`` entries override the current environment; a ``None`` value removes the variable.
    """
    full_env = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr
