"""infopt.ops.int4_tiled: the tiled int4 layout of the CUDA tensor-core GEMV.

CPU: int4_tile / int4_untile are exact inverses; the bytes match the layout formula written in
csrc/cuda/int4_tiled.h (built here independently, byte by byte); the op's reference equals the
row-major op's reference; bad input names the argument. GPU: the cuda backend against the
reference (SQNR and one-ulp bounds of test_ops_quant.check) over every dispatch branch, and
Int4Linear routing bf16 / fp16 calls through it with a cache that follows weight updates.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from test_ops_quant import _require, check, make_args

from infopt import ops
from infopt.ops import BackendUnavailableError, backend_report, quant_ref

OP = "int4_weight_only_linear"
TILED = "int4_tiled_linear"


def _weights(n, k, gs, seed=0):
    _, q, s, z, _, b = make_args(OP, 1, k, n, torch.float32, "cpu", gs=gs, seed=seed)
    return q, s, z, b


@pytest.mark.parametrize(
    "n,k,gs", [(1, 128, 128), (7, 256, 128), (16, 384, 256), (17, 1024, 512), (129, 128, 1024)]
)
def test_tile_untile_roundtrip(n, k, gs):
    q, s, z, _ = _weights(n, k, gs)
    codes, meta = ops.int4_tile(q, s, z, gs)
    t, g = -(-n // 16), -(-k // gs)
    assert codes.shape == (t, k // 128, 1024) and codes.dtype == torch.uint8
    assert meta.shape == (t, g, 80) and meta.dtype == torch.uint8
    q2, s2, z2 = ops.int4_untile(codes, meta, n, gs)
    assert torch.equal(q2, q) and torch.equal(s2, s.float()) and torch.equal(z2, z)
    # Padding rows (n .. 16t) are zero codes, scales and zero points.
    full = ops.int4_untile(codes, meta, 16 * t, gs)
    assert all(int(v[n:].abs().sum()) == 0 for v in full)


def test_tile_bytes_follow_the_header_formula():
    """Every byte from the formula in int4_tiled.h, computed with plain loops."""
    n, k, gs = 20, 256, 128
    q, s, z, _ = _weights(n, k, gs, seed=3)
    codes, meta = ops.int4_tile(q, s, z, gs)
    qn, sn, zn = q.numpy(), s.numpy(), z.numpy()

    def code(row, kk):
        return 0 if row >= n else (int(qn[row, kk // 2]) >> (4 * (kk % 2))) & 0xF

    p = (0, 2, 4, 6, 1, 3, 5, 7)
    want = np.zeros(codes.shape, dtype=np.uint8)
    for t in range(codes.shape[0]):
        for st in range(codes.shape[1]):
            for h in range(2):
                for g in range(8):
                    for c in range(4):
                        for j in range(4):
                            for b in range(4):
                                row, k0 = 16 * t + g + 8 * h, 128 * st + 32 * c + 8 * j
                                lo, hi = code(row, k0 + p[2 * b]), code(row, k0 + p[2 * b + 1])
                                want[t, st, 512 * h + 16 * (4 * g + c) + 4 * j + b] = lo | hi << 4
    assert np.array_equal(codes.numpy(), want)
    mt = meta.numpy()
    for t in range(mt.shape[0]):
        for grp in range(mt.shape[1]):
            for g in range(8):
                for h, row in enumerate((16 * t + g, 16 * t + g + 8)):
                    sc = np.frombuffer(mt[t, grp, 8 * g + 4 * h : 8 * g + 4 * h + 4].tobytes(),
                                       dtype=np.float32)[0]  # fmt: skip
                    assert sc == (sn[row, grp] if row < n else 0.0)
                    assert mt[t, grp, 64 + 2 * g + h] == (zn[row, grp] if row < n else 0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_reference_equals_row_major_reference(dtype):
    for i, (m, k, n, gs) in enumerate(((1, 128, 5, 128), (3, 512, 33, 256), (2, 384, 16, 256))):
        x, q, s, z, _, b = make_args(OP, m, k, n, dtype, "cpu", gs=gs, seed=i)
        codes, meta = ops.int4_tile(q, s, z, gs)
        got = ops.int4_tiled_linear(x, codes, meta, n, gs, b, backend="reference")
        assert torch.equal(got, quant_ref.int4_weight_only_linear(x, q, s, z, gs, b))


def test_cpu_auto_runs_the_reference_without_a_fallback_warning(recwarn):
    x, q, s, z, _, b = make_args(OP, 2, 128, 9, torch.float32, "cpu", gs=128)
    codes, meta = ops.int4_tile(q, s, z, 128)
    ops.int4_tiled_linear(x, codes, meta, 9, 128, b)
    assert not [w for w in recwarn if "int4_tiled_linear" in str(w.message)]
    assert backend_report()[TILED]["by_device"]["cpu"]["available"] == ["reference"]


def test_errors_name_the_argument():
    x, q, s, z, _, b = make_args(OP, 2, 256, 20, torch.float32, "cpu", gs=128)
    codes, meta = ops.int4_tile(q, s, z, 128)
    cases = [
        ((x[:, :200], codes, meta, 20, 128, b), "x.shape[-1]"),
        ((x, codes, meta, 20, 64, b), "group_size"),
        ((x, codes, meta, 20, 128.0, b), "group_size"),
        ((x, codes, meta, -1, 128, b), "n must"),
        ((x, codes[:, :1], meta, 20, 128, b), "codes must"),
        ((x, codes, meta.float(), 20, 128, b), "meta must"),
        ((x, codes, meta, 20, 128, b[:3]), "bias must"),
        ((x, codes, meta, 40, 128, None), "codes must"),  # n does not match the tile count
    ]
    for args, msg in cases:
        with pytest.raises((ValueError, TypeError), match=re.escape(msg)):
            ops.int4_tiled_linear(*args)
    with pytest.raises(ValueError, match="K = 100"):
        ops.int4_tile(q[:, :50], s, z, 128)
    with pytest.raises(ValueError, match="group_size"):
        ops.int4_tile(q, s, z, 96)
    with pytest.raises(ValueError, match="scale must"):
        ops.int4_tile(q, s[:, :1], z, 128)


def test_int4_linear_tiled_copy_follows_its_buffers():
    """The module's tiled copy (device-agnostic, so checked here) is cached, rebuilt after an
    in-place write or a replaced buffer, and untiles to the current buffers."""
    from infopt.quant.qlinear import Int4Linear

    torch.manual_seed(0)
    mod = Int4Linear.from_linear(torch.nn.Linear(2048, 20), group_size=128)
    first = mod._tiled_weights()
    assert mod._tiled_weights()[0] is first[0]  # cached
    mod.zero.fill_(7)
    codes, meta = mod._tiled_weights()
    assert codes is not first[0]
    q, s, z = ops.int4_untile(codes, meta, 20, 128)
    assert torch.equal(z, mod.zero) and torch.equal(q, mod.qweight) and torch.equal(s, mod.scale)
    mod.scale = mod.scale * 2
    assert torch.equal(ops.int4_untile(*mod._tiled_weights(), 20, 128)[1], mod.scale)
    # CPU calls never route to the tiled op.
    before = backend_report()[TILED]["ran"].get("reference", 0)
    mod(torch.randn(1, 2048))
    assert backend_report()[TILED]["ran"].get("reference", 0) == before


# --- GPU ---


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bfloat16", "float16"))
def test_cuda_kernel_matches_reference(dtype):
    """Every dispatch branch (M <= 8 with 8 or 16 warps by K, M > 8, M > 16 over several block
    rows), fewer k steps than warps (K = 128, 384), N not a multiple of 16, K = 11008 (86
    steps, uneven over the warps), group 256 with a ragged last group, bias, strided and
    misaligned x."""
    _require(TILED, "cuda", "cuda")
    cases = (
        (1, 128, 1, 128), (1, 4096, 4096, 128), (2, 384, 7, 256), (5, 1152, 33, 128),
        (8, 1024, 129, 512), (9, 640, 16, 128), (16, 2048, 100, 128), (17, 256, 31, 256),
        (40, 11008, 24, 128), (3, 8960, 40, 128), (12, 2048, 4100, 128),
    )  # fmt: skip
    for i, (m, k, n, gs) in enumerate(cases):
        args = make_args(OP, m, k, n, dtype, "cuda", bias=i % 2 == 0, gs=gs, seed=i)
        x, q, s, z, _, b = args
        codes, meta = ops.int4_tile(q, s, z, gs)
        got = ops.int4_tiled_linear(x, codes, meta, n, gs, b, backend="cuda")
        check(OP, args, got, f"tiled cuda {m}x{k}x{n} g{gs} {dtype}")
    args = make_args(OP, 4, 256, 20, dtype, "cuda", gs=128)
    codes, meta = ops.int4_tile(*args[1:4], 128)
    wide = torch.zeros(4, 520, device="cuda", dtype=dtype)
    for off in (256, 257):  # row stride 520: aligned view, then a misaligned one (copied)
        wide[:, off : off + 256] = args[0]
        xs = wide[:, off : off + 256]
        got = ops.int4_tiled_linear(xs, codes, meta, 20, 128, backend="cuda")
        check(OP, [xs, *args[1:5], None], got, f"tiled cuda strided x (offset {off}) {dtype}")


def test_cuda_backend_refuses_float32_x():
    _require(TILED, "cuda", "cuda")
    x, q, s, z, _, _ = make_args(OP, 1, 128, 16, torch.float32, "cuda", gs=128)
    codes, meta = ops.int4_tile(q, s, z, 128)
    with pytest.raises(BackendUnavailableError, match="x dtype torch.float32"):
        ops.int4_tiled_linear(x, codes, meta, 16, 128, backend="cuda")


def test_int4_linear_routes_cuda_calls_through_the_tiled_kernel():
    _require(TILED, "cuda", "cuda")
    from infopt.quant.qlinear import Int4Linear

    def ran():
        return backend_report()[TILED]["ran"].get("cuda", 0)

    torch.manual_seed(0)
    lin = torch.nn.Linear(2048, 48, bias=True).cuda().to(torch.bfloat16)
    mod = Int4Linear.from_linear(lin, group_size=128)
    x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    before = ran()
    y = mod(x)
    assert ran() == before + 1
    b = mod._buffers
    want = quant_ref.int4_weight_only_linear(x, b["qweight"], b["scale"], b["zero"], 128, b["bias"])
    torch.testing.assert_close(y.float(), want.float(), rtol=2**-7, atol=1e-3)
    # An in-place weight update must reach the kernel (the tiled copy is rebuilt).
    b["zero"].fill_(15)
    want = quant_ref.int4_weight_only_linear(x, b["qweight"], b["scale"], b["zero"], 128, b["bias"])
    torch.testing.assert_close(mod(x).float(), want.float(), rtol=2**-7, atol=1e-3)
    # fp32 x, and K below MIN_ROUTED_K, keep the row-major op.
    before = ran()
    mod(x.float())
    small = Int4Linear.from_linear(torch.nn.Linear(256, 16).cuda(), group_size=128)
    small(torch.randn(2, 256, device="cuda", dtype=torch.bfloat16))
    assert ran() == before
