"""infopt.ops.rms_norm: every available backend against an fp32 oracle and HF LlamaRMSNorm.

Backends that can't run here are skipped with the registry's reason (e.g. cuda on a CPU box),
except that a cpp/cuda build failure with the toolchain present is a failure, not a skip
(test_extensions_build_when_toolchain_present). Triton on CPU runs under the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when there's no GPU) on fewer rows, to stay fast.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import pytest
import torch
from ops_utils import assert_close_dtype, assert_finite, sqnr

from infopt import ops
from infopt.ops import Backend, BackendUnavailableError, extensions, rms_norm, rms_norm_reference
from infopt.ops import rmsnorm as rmsnorm_mod

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS = (1, 7, 19, 127, 128, 129)
HIDDEN = (1, 7, 64, 576, 1000, 4096)
# The Triton interpreter costs ~3 ms per program (row): keep its row counts small. One program
# per row means row count only tests the grid, which 1/7/19/129 cover.
INTERP_ROWS = (1, 7, 19, 129)
KERNEL_CASES = (("cpu", "cpp"), ("cpu", "triton"), ("cuda", "cuda"), ("cuda", "triton"))


def _require(device: str, backend: str) -> None:
    """Skip with the registry's reason unless ``backend`` can run on ``device`` here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    by_dev = ops.backend_report()["rms_norm"]["by_device"][device]
    if backend not in by_dev["available"]:
        pytest.skip(f"{backend} unavailable on {device}: {by_dev['unavailable'][backend]}")


def _oracle(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Independent fp32 statement of the semantics (sum/H and 1/sqrt, not mean/rsqrt)."""
    xf = x.float()
    inv = 1.0 / torch.sqrt((xf * xf).sum(-1, keepdim=True) / x.shape[-1] + eps)
    normed = (xf * inv).to(x.dtype).float()  # HF rounds the normalized value to x.dtype...
    return (w.float() * normed).to(x.dtype)  # ...before the weight multiply.


def _inputs(shape, dtype, device, w_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows of very different scale, so a wrong per-row statistic can't hide.
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))
    w = torch.randn(shape[-1], generator=g)
    return x.to(device, dtype), w.to(device, w_dtype or dtype)


def _grid():
    for device, backend in KERNEL_CASES:
        interp = device == "cpu" and backend == "triton"
        for rows in INTERP_ROWS if interp else ROWS:
            for hidden in HIDDEN:
                yield pytest.param(
                    device, backend, rows, hidden, id=f"{device}-{backend}-{rows}x{hidden}"
                )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend,rows,hidden", list(_grid()))
def test_backend_matches_oracle(device, backend, rows, hidden, dtype):
    _require(device, backend)
    x, w = _inputs((rows, hidden), dtype, device)
    got = rms_norm(x, w, 1e-6, backend=backend)
    assert got.is_contiguous()
    assert_close_dtype(got, _oracle(x, w, 1e-6), f"{backend}/{device}: ")
    assert_close_dtype(got, rms_norm_reference(x, w, 1e-6), f"{backend}/{device} vs ref: ")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_rounding_order_matches_reference(device, backend, dtype):
    """Same rounding steps as HF: almost every element is bit-identical to the reference.

    A kernel that skipped the intermediate rounding to x.dtype would differ on ~25% of bf16/fp16
    elements while staying inside assert_close tolerances; a correct one differs only where the
    fp32 row scale's last bit flips a rounding (measured < 0.3%).
    """
    _require(device, backend)
    x, w = _inputs((64 if device == "cuda" or backend != "triton" else 16, 4096), dtype, device)
    got = rms_norm(x, w, 1e-6, backend=backend)
    ref = rms_norm_reference(x, w, 1e-6)
    assert_finite(got)
    mismatch = (got != ref).float().mean().item()
    if dtype == torch.float32:
        # fp32 outputs differ in the last bits by summation order: check the noise level instead.
        assert sqnr(ref, got) > 120, sqnr(ref, got)
    else:
        assert mismatch < 0.01, f"{mismatch:.2%} of elements differ from the reference"


@pytest.mark.parametrize("device,backend", KERNEL_CASES + (("cpu", "reference"),))
def test_layouts(device, backend):
    """Non-contiguous x/weight, leading dims, mixed fp32 weight, empty inputs."""
    _require(device, backend)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(1)
    eps = 1e-5

    def check(x, w, what):
        got = rms_norm(x, w, eps, backend=backend)
        assert got.shape == x.shape and got.dtype == x.dtype, what
        # Kernels write a fresh contiguous output; the reference keeps torch's elementwise layout.
        assert got.is_contiguous() or backend == "reference", what
        if x.numel():
            assert_close_dtype(got, _oracle(x, w, eps), f"{backend}/{what}: ")

    for dtype in DTYPES:
        wide = torch.randn(19, 2 * 576 + 3, generator=g).to(dev, dtype)
        w = torch.randn(576, generator=g).to(dev, dtype)
        check(wide[:, :576], w, "row-strided slice")  # hidden unit-stride, rows 1155 apart
        check(wide[:, 1 : 2 * 576 + 1 : 2], w, "hidden-strided")  # forces the .contiguous() copy
        x3 = torch.randn(5, 3, 576, generator=g).to(dev, dtype)
        check(x3.transpose(0, 1), w, "transposed leading dims")
        check(torch.randn(2, 3, 4, 576, generator=g).to(dev, dtype), w, "4-D")
        check(torch.randn(576, generator=g).to(dev, dtype), w, "1-D")
        w_strided = torch.randn(2 * 576, generator=g).to(dev, dtype)[::2]
        check(x3, w_strided, "strided weight")
        check(torch.randn(7, 576, generator=g).to(dev, dtype), w.float(), "fp32 weight")
        check(torch.empty(0, 576, device=dev, dtype=dtype), w, "no rows")
        check(torch.empty(3, 0, device=dev, dtype=dtype), w[:0], "hidden 0")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_large_hidden(device, backend):
    """Hidden sizes that select every kernel variant: for CUDA 1/2/4/8 register-cached packs per
    thread and the two-read kernel past 32K bf16 (16K fp32); for Triton the looped kernel."""
    _require(device, backend)
    rows = 2 if device == "cpu" and backend == "triton" else 3
    for hidden in (2048, 8192, 16384, 32768, 40000, 40001):
        for dtype in DTYPES:
            x, w = _inputs((rows, hidden), dtype, device)
            got = rms_norm(x, w, 1e-6, backend=backend)
            assert_close_dtype(got, _oracle(x, w, 1e-6), f"{backend} H={hidden} {dtype}: ")


def test_triton_looped_variant(monkeypatch):
    """Rows longer than the single-pass limit take the two-pass loop (SINGLE_PASS=False)."""
    _require("cuda" if torch.cuda.is_available() else "cpu", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(rmsnorm_mod, "_TRITON_MAX_SINGLE_PASS", 64)
    monkeypatch.setattr(rmsnorm_mod, "_TRITON_CHUNK", 64)
    for dtype in DTYPES:
        for hidden in (7, 576, 1000):  # 7 stays single-pass; 1000 ends on a partial chunk
            x, w = _inputs((5, hidden), dtype, device)
            got = rms_norm(x, w, 1e-6, backend="triton")
            assert_close_dtype(got, _oracle(x, w, 1e-6), f"looped {hidden} {dtype}: ")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_reference_is_bit_identical_to_hf(dtype):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    for shape, eps in (((3, 7, 576), 1e-6), ((19, 1000), 1e-5), ((1, 4096), 1e-6)):
        hf = modeling_llama.LlamaRMSNorm(shape[-1], eps=eps).to(dtype)
        x, w = _inputs(shape, dtype, "cpu")
        with torch.no_grad():
            hf.weight.copy_(w)
            expected = hf(x)
        assert expected.dtype == dtype
        assert torch.equal(rms_norm_reference(x, w, eps), expected)
        assert torch.equal(rms_norm(x, w, eps, backend="reference"), expected)
        # and the independent oracle agrees within the dtype's tolerance
        assert_close_dtype(_oracle(x, w, eps), expected, "oracle vs HF: ")


def test_extensions_build_when_toolchain_present():
    """A broken C++/CUDA build must fail here, not turn every kernel test into a skip."""
    if os.environ.get("INFOPT_DISABLE_CPP", "") not in ("", "0"):
        pytest.skip("INFOPT_DISABLE_CPP is set")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on PATH")
    assert extensions.load_cpu() is None, extensions.load_cpu()
    if torch.cuda.is_available() and torch.version.cuda and shutil.which("nvcc"):
        assert extensions.load_cuda() is None, extensions.load_cuda()


def test_validation_errors_name_the_argument():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"weight must have shape \[H\] = \[8\]"):
        rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.randn(1, 8))
    with pytest.raises(ValueError, match="x must have a floating dtype"):
        rms_norm(torch.ones(4, 8, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="weight must have a floating dtype"):
        rms_norm(x, torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        rms_norm(x, w, -1e-6)
    with pytest.raises(ValueError, match="eps must be finite"):
        rms_norm(x, w, float("nan"))
    with pytest.raises(TypeError, match="eps must be a real number"):
        rms_norm(x, w, "1e-6")
    with pytest.raises(ValueError, match="at least 1 dimension"):
        rms_norm(torch.tensor(1.0), torch.randn(1))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rms_norm([1.0, 2.0], w)
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x.to("meta"), w)


def test_float64_runs_on_reference_only():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        rms_norm(x, w, backend=Backend.CPP)
    torch.testing.assert_close(rms_norm(x, w, backend="reference"), rms_norm_reference(x, w))


def test_autograd_uses_reference(caplog):
    """Kernels are inference-only: AUTO differentiates through the reference, explicit raises."""
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    ops.reset_backend_stats()  # the fallback notice is logged once per process: re-arm it
    with caplog.at_level(logging.WARNING, logger="infopt.ops.registry"):
        y = rms_norm(x, w)  # AUTO
    assert re.search("rms_norm.*fell back to 'reference'.*autograd", caplog.text), caplog.text
    assert y.grad_fn is not None
    y.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    rms_norm_reference(ref_x, w.detach()).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    _require("cpu", "cpp")
    with pytest.raises(BackendUnavailableError, match="autograd"):
        rms_norm(x, w, backend="cpp")
    with torch.no_grad():
        assert rms_norm(x, w, backend="cpp").grad_fn is None


OP_CASES = (("cpu", "cpp"), ("cuda", "cuda"))  # the backends behind torch.ops.infopt.rms_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", OP_CASES)
def test_opcheck_dispatcher_op(device, backend, dtype):
    """Schema, FakeTensor and dispatch checks for the C++/CUDA op (no autograd formula: the
    inputs don't require grad, which is the only way the public API calls it)."""
    _require(device, backend)
    op = torch.ops.infopt.rms_norm.default
    for shape in ((5, 64), (2, 3, 576), (1, 7)):
        x, w = _inputs(shape, dtype, device)
        torch.library.opcheck(
            op,
            (x, w, 1e-6),
            test_utils=(
                "test_schema",
                "test_autograd_registration",
                "test_faketensor",
                "test_aot_dispatch_dynamic",
            ),
        )


@pytest.mark.parametrize("device,backend", OP_CASES)
def test_torch_compile_fullgraph(device, backend):
    """The fake impl makes the op traceable: no graph break through the public API."""
    _require(device, backend)

    def f(x, w):
        return rms_norm(x, w, 1e-6, backend=backend) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, w = _inputs((7, 576), torch.bfloat16, device)
    assert torch.equal(compiled(x, w), f(x, w))
    x2, w2 = _inputs((3, 64), torch.float32, device, seed=3)
    assert torch.equal(compiled(x2, w2), f(x2, w2))
