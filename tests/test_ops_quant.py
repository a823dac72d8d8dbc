"""infopt.ops quantized linears: every available backend against the quant_ref reference.

Outputs are compared by SQNR against the reference evaluated on fp32 copies of the same inputs
(the weights are exact, so the only differences are fp32 summation order and the final rounding
to x's dtype): > 100 dB for fp32 outputs (order-only noise measures ~130 dB; a wrong scale or
group index gives < 40 dB). A bf16/fp16 output is within one ulp of the exact value (rounding,
possibly flipped by fp32 order noise): |err| <= 2**-7 (bf16) / 2**-10 (fp16) relative, i.e.
> 42.1 / 60.2 dB, checked as such, and elementwise against the reference in x's dtype with a
one-ulp relative tolerance. int4_dynamic_linear's reference rounds the activations itself
(int8 per 32-block): the kernels reproduce those codes exactly, so the same bounds hold.
W8A8 accumulates exactly in int32 and the CPU kernels follow the
reference's operation order, so they must be bit-identical to it. Triton on CPU runs under the
interpreter (tests/conftest.py) on small shapes.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from ops_utils import assert_finite, run_python, sqnr

from infopt import ops
from infopt.ops import Backend, BackendUnavailableError, quant_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_SQNR = {torch.float32: 100.0, torch.bfloat16: 42.0, torch.float16: 60.0}
ULP_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
OPS = (
    "int8_weight_only_linear",
    "int4_weight_only_linear",
    "int8_dynamic_linear",
    "int4_dynamic_linear",
)
# Broad grid for the fast (cpp / cuda) backends, looped inside one test per (op, dtype).
MS, KS, NS = (1, 3, 16, 33), (1, 7, 64, 576, 577, 1000), (1, 7, 129, 256)
GROUPS = (32, 64, 128)
# The Triton interpreter runs each program in numpy: fewer, smaller cases.
INTERP_CASES = ((1, 7, 7), (3, 577, 129), (16, 64, 1), (33, 1000, 33), (2, 1, 5))


def _require(op: str, device: str, backend: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    by_dev = ops.backend_report()[op]["by_device"][device]
    if backend not in by_dev["available"]:
        why = by_dev["unavailable"].get(backend, f"{op} has no {backend} backend")
        pytest.skip(f"{backend} unavailable on {device}: {why}")


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> [N, ceil(K/2)], low nibble = even k (quant_ref layout)."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def make_args(op, m, k, n, dtype, device, bias=True, gs=32, seed=0):
    """Inputs for ``op``: (x, qweight, scale, [zero, group_size,] bias)."""
    g = torch.Generator().manual_seed(seed)
    # Rows of different magnitude, so a per-row (w8a8) scale error can't hide.
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    if op.startswith("int4"):
        ng = -(-k // gs)
        q = pack(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
        s = torch.rand(n, ng, generator=g) * 0.02 + 1e-3
        z = torch.randint(0, 16, (n, ng), generator=g, dtype=torch.uint8)
        args = [x, q, s, z, gs, b]
    else:
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        args = [x, q, torch.rand(n, generator=g) * 0.02 + 1e-3, b]
    args[0] = x.to(dtype)
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def reference(op, args):
    return getattr(quant_ref, op)(*args)


def check(op, args, got, what=""):
    """SQNR vs the fp32 reference; bit-exact vs the reference for w8a8 on CPU."""
    x = args[0]
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], args[1].shape[0]), what
    assert_finite(got, what)
    if op == "int8_dynamic_linear" and got.device.type == "cpu":
        ref = reference(op, args)
        assert torch.equal(got, ref), f"{what}: max diff {(got.float() - ref.float()).abs().max()}"
        return
    ref32 = reference(op, [args[0].float(), *args[1:]])
    if ref32.abs().max() == 0:
        assert (got == 0).all(), what
        return
    db = sqnr(ref32, got.float())
    assert db > MIN_SQNR[x.dtype], f"{what}: SQNR {db:.1f} dB"
    if x.dtype in ULP_RTOL:
        # atol: fp32 order noise relative to the output scale, for outputs that cancel to ~0.
        atol = 1e-5 * float(ref32.abs().max())
        torch.testing.assert_close(
            got.float(), reference(op, args).float(), rtol=ULP_RTOL[x.dtype], atol=atol,
            msg=lambda m: f"{what}: {m}",
        )  # fmt: skip


def call(op, args, backend):
    return getattr(ops, op)(*args, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", (("cpu", "cpp"), ("cuda", "cuda")))
def test_fast_backend_grid(device, backend, op, dtype):
    _require(op, device, backend)
    for m in MS:
        for k in KS:
            for n in NS:
                # Group size cycles over the grid (every K meets every size across M and N);
                # bias alternates the same way.
                gs = GROUPS[(m + k + n) % len(GROUPS)]
                bias = (m + k + 2 * n) % 2 == 0
                args = make_args(op, m, k, n, dtype, device, bias, gs=gs)
                check(op, args, call(op, args, backend), f"{backend} {op} {m}x{k}x{n} g{gs}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", OPS)
def test_triton(op, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _require(op, device, "triton")
    cases = INTERP_CASES if device == "cpu" else [(m, k, n) for m in MS for k in KS for n in NS]
    for i, (m, k, n) in enumerate(cases):
        gs = GROUPS[i % len(GROUPS)]
        args = make_args(op, m, k, n, dtype, device, bias=i % 2 == 0, gs=gs)
        check(op, args, call(op, args, "triton"), f"triton {op} {m}x{k}x{n} g{gs}")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bfloat16", "float16"))
def test_cuda_int4_tensor_core_path(dtype):
    """Shapes the CUDA int4 tensor-core (mma) path takes, which the grid above never reaches
    (16-bit x, K % 128 == 0, group_size = 128 * 2^j): M = 1..16 in one or two n8 tiles and
    M > 16 over several block rows, N not a multiple of the 16-row block, each (warps, unroll)
    choice of the dispatch (K < 2048; K >= 2048 with M <= 8, with M > 8 and N < 4096 or >= 4096),
    K steps split unevenly over the warps (K = 11008 -> 86 steps), group 256, strided x rows."""
    op = "int4_weight_only_linear"
    _require(op, "cuda", "cuda")
    cases = (
        (1, 128, 1, 128), (1, 4096, 4096, 128), (2, 384, 7, 128), (5, 1152, 33, 128),
        (8, 1024, 129, 256), (9, 640, 16, 128), (16, 2048, 100, 128), (17, 256, 31, 256),
        (40, 11008, 24, 128), (3, 8960, 40, 128), (12, 2048, 4100, 128),
    )  # fmt: skip
    for i, (m, k, n, gs) in enumerate(cases):
        args = make_args(op, m, k, n, dtype, "cuda", bias=i % 2 == 0, gs=gs, seed=i)
        check(op, args, call(op, args, "cuda"), f"cuda {op} {m}x{k}x{n} g{gs} {dtype}")
    args = make_args(op, 4, 256, 20, dtype, "cuda", gs=128)
    wide = torch.zeros(4, 512, device="cuda", dtype=dtype)
    wide[:, 256:] = args[0]
    args[0] = wide[:, 256:]  # row stride 512 elements, 16-byte aligned
    check(op, args, call(op, args, "cuda"), f"cuda {op} strided x {dtype}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_cpp_prefill_path(dtype):
    """M past the GEMV/prefill crossover (64 rows for int8, 32 for int4): the dequantize-to-fp32
    + MKL path, including ragged N blocks, odd K and groups the SIMD tiles don't take."""
    for op in OPS:
        _require(op, "cpu", "cpp")
        for m, k, n, gs in ((70, 577, 1100, 32), (130, 1000, 33, 64), (64, 64, 7, 6)):
            args = make_args(op, m, k, n, dtype, "cpu", bias=m % 2 == 0, gs=gs)
            check(op, args, call(op, args, "cpp"), f"cpp {op} {m}x{k}x{n} g{gs}")


def test_cpp_prefill_path_under_inference_mode():
    """Regression: the prefill path calls ATen (mm_out) from at::parallel_for worker threads,
    which do not inherit the caller's InferenceMode; writing into an inference tensor there was
    refused ("Inplace update to inference tensor outside InferenceMode") as soon as more than
    one thread got a block. infopt.eval runs models under torch.inference_mode()."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for op in OPS:
            _require(op, "cpu", "cpp")
            # K = 2048 -> 256-row weight blocks, N = 1100 -> 5 blocks: work for both threads.
            args = make_args(op, 96, 2048, 1100, torch.float32, "cpu", gs=64)
            with torch.inference_mode():
                got = call(op, args, "cpp")
            check(op, args, got, f"cpp {op} under inference_mode")
    finally:
        torch.set_num_threads(old_threads)


class _CountingKernel:
    """Wraps a ``@triton.jit`` kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _count_launches(monkeypatch, kernel: str) -> _CountingKernel:
    from infopt.ops.triton_kernels import quant_linear as tk

    counter = _CountingKernel(getattr(tk, kernel))
    monkeypatch.setattr(tk, kernel, counter)
    return counter


def _check_x_layouts(op, args, counter, launches, what):
    """``op`` on ``args`` with x contiguous, misaligned by one element and with row stride
    K + 3 (same values): checked against the reference, and ``counter`` must have counted
    ``launches`` launches per call."""
    x0 = args[0]
    m, k = x0.shape
    wide = torch.randn(m, k + 3, device=x0.device).to(x0.dtype)
    xs = {"contiguous": x0, "misaligned": wide[:, 1 : k + 1], "stride k+3": wide[:, :k]}
    for name, x in xs.items():
        x.copy_(x0)
        before = counter.launches
        got = call(op, [x, *args[1:]], "triton")
        check(op, [x, *args[1:]], got, f"{what} {name}")
        assert counter.launches - before == launches, (what, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_triton_int4_gemv_path(dtype, monkeypatch):
    """The int4 Triton decode kernel (M <= 4, x read as element pairs): odd K (x padded),
    misaligned x and odd row strides (x copied), K spanning unmasked main-loop steps plus a
    masked tail, group sizes down to one chunk; the kernel must be the one that ran, and group
    sizes it can't take (g6: not a multiple of the 8-code chunk) must use the tile kernel."""
    op = "int4_weight_only_linear"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _require(op, device, "triton")
    counter = _count_launches(monkeypatch, "int4_gemv_kernel")
    cases = ((1, 7, 5, 32), (2, 577, 3, 64), (4, 2048 + 130, 3, 128), (3, 1030, 2, 8),
             (1, 1024, 4, 1024), (2, 100, 3, 6))  # fmt: skip
    for i, (m, k, n, gs) in enumerate(cases):
        args = make_args(op, m, k, n, dtype, device, bias=i % 2 == 0, gs=gs, seed=i)
        _check_x_layouts(op, args, counter, 0 if gs == 6 else 1, f"{m}x{k}x{n} g{gs}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    "op,kernel",
    (("int8_weight_only_linear", "int8_gemv_kernel"),
     ("int8_dynamic_linear", "int8_dyn_gemv_kernel")),
)  # fmt: skip
def test_triton_int8_gemv_path(op, kernel, dtype, monkeypatch):
    """The int8 / w8a8 Triton decode kernels (M <= 4): odd K, misaligned x and odd row strides
    (read in place: Triton drops the vector width), K spanning unmasked main-loop steps plus a
    masked tail; the kernel must be the one that ran, and M = 5 must not use it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _require(op, device, "triton")
    counter = _count_launches(monkeypatch, kernel)
    for i, (m, k, n) in enumerate(((1, 7, 5), (2, 577, 3), (4, 1024 + 130, 3), (5, 64, 2))):
        args = make_args(op, m, k, n, dtype, device, bias=i % 2 == 0, seed=i)
        _check_x_layouts(op, args, counter, 1 if m <= 4 else 0, f"{m}x{k}x{n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_triton_int4_dot_path(dtype, monkeypatch):
    """The int4 Triton tensor-core kernel (M > 4, nibble planes against x's even / odd
    columns): ragged M, N and K, misaligned and strided x; it must be the kernel that ran, and
    a group size that is not a multiple of 32 (g48) must use the tile kernel."""
    op = "int4_weight_only_linear"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _require(op, device, "triton")
    counter = _count_launches(monkeypatch, "int4_dot_kernel")
    cases = ((5, 577, 33, 32), (16, 1000, 40, 64), (20, 131, 7, 128), (7, 256, 5, 48))
    for i, (m, k, n, gs) in enumerate(cases):
        args = make_args(op, m, k, n, dtype, device, bias=i % 2 == 0, gs=gs, seed=i)
        _check_x_layouts(op, args, counter, 0 if gs == 48 else 1, f"{m}x{k}x{n} g{gs}")


@pytest.mark.parametrize("op", ("int4_weight_only_linear", "int4_dynamic_linear"))
@pytest.mark.parametrize("gs", (2, 6, 16, 48, 256, 384))
def test_int4_other_group_sizes(gs, op):
    """Group sizes the SIMD kernels don't tile (they fall back to the generic path) and ones
    larger than K or than the 128-k decode chunk; for every backend available here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for backend in ops.backend_report()[op]["by_device"][device]["available"]:
        for m, k, n in ((1, 100, 9), (5, 577, 3)):
            args = make_args(op, m, k, n, torch.float32, device, gs=gs)
            check(op, args, call(op, args, backend), f"{backend} g{gs} {m}x{k}x{n}")


@pytest.mark.parametrize("op", OPS)
def test_layouts(op):
    """Non-contiguous x (strided K, transposed leading dims), 3-D and 1-D x, M = 0."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = ops.backend_report()[op]["by_device"][device]["available"]
    k, n = 64, 9
    base = make_args(op, 6, k, n, torch.float32, device)
    wide = torch.randn(6, 2 * k, device=device)
    x3 = torch.randn(5, 3, k, device=device)
    for x in (wide[:, ::2], wide[:, k:], x3.transpose(0, 1), x3, x3[0, 0], x3[:, :0]):
        args = [x, *base[1:]]
        for backend in backends:
            got = call(op, args, backend)
            assert got.shape == (*x.shape[:-1], n)
            if x.numel():
                check(op, args, got, f"{backend} {op} x{tuple(x.shape)} {x.stride()}")


@pytest.mark.parametrize("isa", ("avx512vnni", "avx512", "avx2", "scalar"))
def test_cpp_lower_isa_paths(isa):
    """The AVX-512 (no VNNI), AVX2 and scalar kernels (a VNNI box otherwise runs only the
    best ones)."""
    _require("int8_weight_only_linear", "cpu", "cpp")
    code = """
import torch, sys
sys.path.insert(0, "tests")
from test_ops_quant import OPS, make_args, check, call
for op in OPS:
    for m, k, n in ((1, 577, 129), (4, 1000, 7), (7, 130, 33), (8, 300, 40), (16, 64, 256),
                    (3, 7, 5)):
        for dt in (torch.float32, torch.bfloat16):
            args = make_args(op, m, k, n, dt, "cpu", gs=32 if m % 2 else 64)
            check(op, args, call(op, args, "cpp"), f"{op} {m}x{k}x{n} {dt}")
print("ok")
"""
    out = run_python(code, env={"INFOPT_CPU_ISA": isa})
    assert "ok" in out


@pytest.mark.parametrize("isa", ("avx2", "scalar"))
def test_cpp_int4_dynamic_avx2_path(isa):
    """int4_dynamic_linear's AVX2 int8-dot tiles (vpmaddubsw; INFOPT_CPU_ISA=avx2 selects them
    on an AVX-512 box too) and, capped at scalar, its fallback: K with partial 128-k chunks and
    odd K, N not a multiple of the 4-row tile, M from 1 to past the AVX2 tiles' limit (M <= 32)
    with 4 / 2 / 1-row remainders, group sizes that tile 128 (32, 64, 128, 256) and one that
    does not (96), with and without bias. Row 0 of x is all half-step ties (block maximum
    127 / 16, so scale = 1 / 16 exactly and x / scale = j + 0.5: only round half to even gives
    the reference's codes, and one code off costs ~60 dB), row 1 starts with an all-zero
    block (scale 1, codes 0)."""
    _require("int4_dynamic_linear", "cpu", "cpp")
    code = """
import sys, torch
sys.path.insert(0, "tests")
from test_ops_quant import make_args, check, call
op = "int4_dynamic_linear"
cases = ((1, 577, 9), (2, 300, 7), (3, 1000, 5), (5, 128, 4), (7, 64, 1), (31, 130, 6),
         (32, 576, 5), (37, 7, 3), (6, 1536, 13))
for gs in (32, 64, 128, 256, 96):
    for m, k, n in cases:
        for bias in (True, False):
            args = make_args(op, m, k, n, torch.float32, "cpu", bias=bias, gs=gs, seed=m + k)
            x = args[0]
            g = torch.Generator().manual_seed(k)
            x[0] = (torch.randint(-126, 126, (k,), generator=g) + 0.5) / 16
            x[0, ::32] = 127 / 16
            if m > 1:
                x[1, :32] = 0
            check(op, args, call(op, args, "cpp"), f"g{gs} {m}x{k}x{n} bias={bias}")
            if gs == 128 and k > 100:
                a16 = [x.to(torch.bfloat16), *args[1:]]
                check(op, a16, call(op, a16, "cpp"), f"bf16 g{gs} {m}x{k}x{n}")
print("ok")
"""
    out = run_python(code, env={"INFOPT_CPU_ISA": isa})
    assert "ok" in out, out


def test_cpp_isa_cap_rejects_unknown_values():
    """A misspelt INFOPT_CPU_ISA is an error naming the accepted values, not silently no cap."""
    _require("int8_weight_only_linear", "cpu", "cpp")
    code = """
import sys, torch
sys.path.insert(0, "tests")
from test_ops_quant import make_args, call
try:
    call("int8_weight_only_linear", make_args("int8_weight_only_linear", 1, 64, 8, torch.float32,
         "cpu"), "cpp")
except RuntimeError as e:
    print("raised:", e)
"""
    out = run_python(code, env={"INFOPT_CPU_ISA": "avx-512"})
    assert "INFOPT_CPU_ISA=avx-512 is not an ISA cap" in out, out
    assert "scalar, avx2, avx512, avx512vnni" in out, out


@pytest.mark.parametrize("op", OPS)
def test_opcheck_cpp(op):
    _require(op, "cpu", "cpp")
    opdef = getattr(torch.ops.infopt, op).default
    for m, k, n, dtype in ((1, 64, 7, torch.float32), (5, 577, 33, torch.bfloat16)):
        for bias in (True, False):
            args = make_args(op, m, k, n, dtype, "cpu", bias)
            torch.library.opcheck(
                opdef,
                tuple(args),
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                            "test_aot_dispatch_dynamic"),
            )  # fmt: skip


def test_torch_compile_fullgraph():
    op = "int4_weight_only_linear"
    _require(op, "cpu", "cpp")
    args = make_args(op, 3, 576, 64, torch.bfloat16, "cpu")

    def f(x):
        return ops.int4_weight_only_linear(x, *args[1:], backend="cpp") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(args[0]), f(args[0]))


def test_auto_picks_cpp_on_cpu():
    for op in OPS:
        _require(op, "cpu", "cpp")
        ops.reset_backend_stats()
        args = make_args(op, 2, 64, 8, torch.float32, "cpu")
        with ops.use_backend("auto"):
            getattr(ops, op)(*args)
        assert ops.backend_report(probe=False)[op]["ran"] == {"cpp": 1}


def test_unsupported_inputs_use_reference(caplog):
    op = "int8_weight_only_linear"
    _require(op, "cpu", "cpp")
    args = make_args(op, 2, 64, 8, torch.float64, "cpu")
    with pytest.raises(BackendUnavailableError, match="float64"):
        call(op, args, Backend.CPP)
    torch.testing.assert_close(call(op, args, "reference"), reference(op, args))
    x = args[0].float().requires_grad_()
    ops.reset_backend_stats()
    with caplog.at_level(logging.WARNING, logger="infopt.ops.registry"):
        y = ops.int8_weight_only_linear(x, *args[1:])
    assert re.search(f"{op}.*fell back to 'reference'.*autograd", caplog.text), caplog.text
    y.sum().backward()
    assert x.grad is not None
    with pytest.raises(BackendUnavailableError, match="autograd"):
        call(op, [x, *args[1:]], "cpp")


def _bad(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_validation_names_the_argument():
    x = torch.randn(2, 64)
    q8, s = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    for f in (ops.int8_weight_only_linear, ops.int8_dynamic_linear):
        _bad(lambda f=f: f(x, q8[:, :63], s), ValueError, r"qweight must have shape \[N, K\]")
        _bad(lambda f=f: f(x, q8.float(), s), ValueError, "qweight must be int8")
        _bad(lambda f=f: f(x, q8, s[:7]), ValueError, r"scale must have shape \[N\] = \[8\]")
        _bad(lambda f=f: f(x, q8, s, torch.ones(9)), ValueError, r"bias must have shape \[N\]")
        _bad(lambda f=f: f(x.int(), q8, s), ValueError, "x must have a floating dtype")
        _bad(lambda f=f: f(x, q8, s.int()), ValueError, "scale must have a floating dtype")
        _bad(lambda f=f: f(x, q8, s.to("meta")), ValueError, "scale must be on x's device")
        _bad(lambda f=f: f([1.0], q8, s), TypeError, "x must be a torch.Tensor")
    q4 = torch.zeros(8, 32, dtype=torch.uint8)
    s4, z4 = torch.ones(8, 2), torch.zeros(8, 2, dtype=torch.uint8)
    for f4 in (ops.int4_weight_only_linear, ops.int4_dynamic_linear):
        f4(x, q4, s4, z4, 32)  # the valid call
        _bad(lambda f4=f4: f4(x, q4, s4, z4, 0), ValueError, "group_size must be a positive even")
        _bad(lambda f4=f4: f4(x, q4, s4, z4, 31), ValueError, "group_size must be a positive even")
        _bad(lambda f4=f4: f4(x, q4, s4, z4, 32.0), TypeError, "group_size must be an int")
        _bad(lambda f4=f4: f4(x, q4, s4, z4, True), TypeError, "group_size must be an int")
        _bad(
            lambda f4=f4: f4(x, q4[:, :31], s4, z4, 32), ValueError,
            r"qweight must have shape \[N, ceil",
        )  # fmt: skip
        q4i = q4.to(torch.int8)
        _bad(lambda f4=f4, q4i=q4i: f4(x, q4i, s4, z4, 32), ValueError, "qweight must be uint8")
        _bad(lambda f4=f4: f4(x, q4, s4[:, :1], z4, 32), ValueError, "scale must be a floating")
        _bad(lambda f4=f4: f4(x, q4, s4, z4.float(), 32), ValueError, "zero must be a uint8")
        _bad(lambda f4=f4: f4(x, q4, s4, z4, 16), ValueError, r"scale must be .*\[8, 4\]")
    _bad(
        lambda: ops.int8_dynamic_linear(
            torch.randn(1, 2**17), torch.zeros(1, 2**17, dtype=torch.int8), torch.ones(1)
        ),
        ValueError,
        "overflow int32",
    )


def test_cpp_op_errors_name_the_argument():
    """The dispatcher ops check their arguments too (they are public as torch.ops.infopt.*)."""
    _require("int8_weight_only_linear", "cpu", "cpp")
    x = torch.randn(2, 64)
    q8, s = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="qweight must have shape"):
        torch.ops.infopt.int8_weight_only_linear(x, q8[:, :3], s, None)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        torch.ops.infopt.int8_dynamic_linear(x, q8, s[:3], None)
    q4, s4, z4 = torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2), torch.zeros(8, 2)
    with pytest.raises(RuntimeError, match="zero must be a uint8"):
        torch.ops.infopt.int4_weight_only_linear(x, q4, s4, z4, 32, None)
    with pytest.raises(RuntimeError, match="group_size must be a positive even"):
        torch.ops.infopt.int4_weight_only_linear(x, q4, s4, z4.byte(), 3, None)
    with pytest.raises(RuntimeError, match="int4_dynamic_linear: zero must be a uint8"):
        torch.ops.infopt.int4_dynamic_linear(x, q4, s4, z4, 32, None)


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf")))
def test_cpp_int4_propagates_non_finite_activations(bad):
    """The VNNI decode path splits x into int8 limbs, which cannot carry NaN / inf: such rows
    must still come out non-finite exactly where the reference's do (the fp32 tiles take them),
    and the finite rows of the same call stay right."""
    op = "int4_weight_only_linear"
    _require(op, "cpu", "cpp")
    for m, k, n, gs in ((2, 300, 9, 32), (3, 1536, 64, 128)):
        args = make_args(op, m, k, n, torch.float32, "cpu", gs=gs)
        args[0][-1, k // 3] = bad
        got, ref = call(op, args, "cpp"), reference(op, args)
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
        assert not got[-1].isfinite().any()
        check(op, [args[0][:-1], *args[1:]], got[:-1], f"finite rows {m}x{k}x{n}")


def test_cpp_int4_limb_kernel_integer_extremes():
    """The weight-only decode GEMV merges three int8 limbs of x in int32 lanes, D = (d1 * 128 +
    d2) * 128 + d3: drive every term to its bound (codes 15 with zero 0, |q1| = 127 or a tie
    that makes q1 = 126 and q2 = 64, one sign per block) and require the fp32-grade result, so an
    overflowing lane or a wrong limb shift fails. Also blocks whose elements span 12 orders of
    magnitude (the limbs are relative to the block maximum)."""
    op = "int4_weight_only_linear"
    _require(op, "cpu", "cpp")
    k, n, gs = 1536, 48, 128
    ng = k // gs
    q = pack(torch.full((n, k), 15, dtype=torch.uint8))
    s = torch.full((n, ng), 0.01)
    z = torch.zeros(n, ng, dtype=torch.uint8)
    blocks = k // 32
    sign = torch.where(torch.arange(blocks) % 3 == 0, -1.0, 1.0).repeat_interleave(32)
    flat = torch.full((k,), 3.0) * sign  # every code 127 in limb 1
    tie = flat.clone()  # x / s1 = 126.5 exactly: q1 = 126 (half to even), q2 = 64
    tie.view(blocks, 32)[:, 1:] *= 126.5 / 127.0
    spread = torch.randn(k) * torch.logspace(-6, 6, k)[torch.randperm(k)]
    x = torch.stack([flat, tie, spread, -flat])
    args = [x, q, s, z, gs, None]
    got = call(op, args, "cpp").double()
    exact = quant_ref.int4_weight_only_linear(x.double(), q, s.double(), z, gs, None)
    err = (got - exact).pow(2).sum(-1) / exact.pow(2).sum(-1)
    assert (10 * torch.log10(1 / err) > 100).all(), 10 * torch.log10(1 / err)


def test_cpp_int4_limb_kernel_avx2_tiles():
    """The two limb-kernel tests above and M = 1..11 (the AVX2 three-limb GEMV runs up to
    M = 10, dequantize + MKL from 11) under INFOPT_CPU_ISA=avx2: the vpmaddubsw limb tiles,
    which an AVX-512 VNNI machine otherwise never runs."""
    _require("int4_weight_only_linear", "cpu", "cpp")
    code = """
import sys, torch, pytest
sys.path.insert(0, "tests")
from test_ops_quant import make_args, check, call
op = "int4_weight_only_linear"
for m in range(1, 12):
    for k, n, gs in ((577, 9, 32), (1000, 7, 64), (1536, 13, 128), (640, 6, 256)):
        args = make_args(op, m, k, n, torch.float32, "cpu", gs=gs, seed=m * k)
        check(op, args, call(op, args, "cpp"), f"avx2 {m}x{k}x{n} g{gs}")
rc = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_ops_quant.py",
                  "-k", "limb_kernel_integer_extremes or propagates_non_finite"])
print("ok" if rc == 0 else f"pytest rc {rc}")
"""
    out = run_python(code, env={"INFOPT_CPU_ISA": "avx2"})
    assert "ok" in out.splitlines()[-1], out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_activation_codes_match_across_devices():
    """The references quantize activations identically on CPU and CUDA (IEEE ``amax / 127``,
    not PyTorch's CUDA multiply-by-reciprocal for scalar divisors), so the GPU kernels, which
    divide exactly, can be held to the CPU's bit-exact standard."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 96, generator=g) * torch.exp(torch.randn(4096, 1, generator=g))
    for fn in (quant_ref.quantize_per_token_int8, quant_ref.quantize_blockwise_int8):
        for dt in (torch.float32, torch.bfloat16):
            q_cpu, s_cpu = fn(x.to(dt))
            q_gpu, s_gpu = fn(x.to(dt).cuda())
            assert torch.equal(s_gpu.cpu(), s_cpu), fn.__name__
            assert torch.equal(q_gpu.cpu(), q_cpu), fn.__name__
