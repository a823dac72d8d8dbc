"""dense_gemv (few-row float32 linear) vs F.linear, and the nn.Linear switch the compiled
decode step uses."""

from __future__ import annotations

import pytest
import torch
from ops_utils import run_python

from infopt import ops
from infopt.ops import BackendUnavailableError
from infopt.ops.dense import MAX_ROWS, DenseGemvLinear, use_dense_gemv
from infopt.ops.extensions import cpp_probe

requires_cpp = pytest.mark.skipif(cpp_probe("cpu") is not None, reason="cpp backend unavailable")

# Outputs are sums of K products of N(0, 1) values (|y| ~ sqrt(K)); kernel and F.linear differ
# only in summation order: a few fp32 ulps of sqrt(K) * max|x w|.
SHAPES = [(1, 577, 129), (2, 5, 4), (3, 64, 7), (4, 576, 1536), (5, 8, 3), (8, 1000, 33),
          (9, 130, 65), (1, 1, 1), (0, 16, 8)]


def close(out, ref, k):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(k, 1) ** 0.5)


@requires_cpp
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpp_matches_reference(m, k, n, with_bias):
    torch.manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k), torch.randn(n, k)
    b = torch.randn(n) if with_bias else None
    out = ops.dense_gemv(x, w, b, backend="cpp")
    assert out.shape == (m, n) and out.dtype == torch.float32
    close(out, ops.dense_gemv_reference(x, w, b), k)


@requires_cpp
def test_cpp_strided_inputs():
    x = torch.randn(3, 200)[:, ::2]  # [3, 100], row stride 200
    w = torch.randn(100, 17).t()  # [17, 100], not contiguous
    close(ops.dense_gemv(x, w, backend="cpp"), x @ w.t(), 100)


@requires_cpp
def test_cpp_refuses_other_dtypes_and_auto_falls_back():
    x, w = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="dense_gemv"):
        ops.dense_gemv(x, w, backend="cpp")
    torch.testing.assert_close(ops.dense_gemv(x, w), torch.nn.functional.linear(x, w))


def test_validation_errors():
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        ops.dense_gemv(torch.randn(2, 3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="same K"):
        ops.dense_gemv(torch.randn(2, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[5\]"):
        ops.dense_gemv(torch.randn(2, 4), torch.randn(5, 4), torch.randn(4))


@requires_cpp
def test_opcheck_and_compile():
    x, w, b = torch.randn(3, 40), torch.randn(12, 40), torch.randn(12)
    torch.library.opcheck(torch.ops.infopt.dense_gemv.default, (x, w, b),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    fn = torch.compile(lambda *a: ops.dense_gemv(*a, backend="cpp"), fullgraph=True,
                       backend="eager")
    close(fn(x, w, b), x @ w.t() + b, 40)


@requires_cpp
def test_portable_body_when_isa_capped():
    """INFOPT_CPU_ISA=scalar runs the portable loop (an AVX2 machine otherwise never does)."""
    code = """
import torch
from infopt import ops
for m, k, n in ((1, 577, 129), (3, 64, 7), (8, 1000, 33), (2, 5, 4)):
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    torch.testing.assert_close(ops.dense_gemv(x, w, b, backend="cpp"), x @ w.t() + b,
                               rtol=1e-5, atol=1e-5 * k ** 0.5)
print("ok")
"""
    out = run_python(code, env={"INFOPT_CPU_ISA": "scalar"})
    assert out.strip().endswith("ok"), out


@requires_cpp
def test_use_dense_gemv_switches_only_float32_linears():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 7, bias=False),
                                torch.nn.Linear(7, 5).to(torch.bfloat16))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    x_small, x_large = torch.randn(2, 3, 24), torch.randn(MAX_ROWS + 1, 24)
    expect_small = model[2](model[1](model[0](x_small)))
    expect_large = model[2](model[1](model[0](x_large)))
    assert use_dense_gemv(model) == 2
    assert [type(m) for m in model] == [DenseGemvLinear, torch.nn.ReLU, DenseGemvLinear,
                                        torch.nn.Linear]
    assert isinstance(model[0], torch.nn.Linear)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    ops.reset_backend_stats()
    with torch.no_grad():
        got_small = model[2](model[1](model[0](x_small)))
    assert got_small.shape == (2, 3, 7)
    close(got_small, expect_small, 40)
    assert ops.backend_report()["dense_gemv"]["ran"].get("cpp") == 2
    # more than MAX_ROWS rows, or a gradient needed: F.linear, bit-identical to the plain layer
    assert torch.equal(model[2](model[1](model[0](x_large))), expect_large)
    train_out = model[2](model[1](model[0](x_small)))
    assert torch.equal(train_out, expect_small) and train_out.requires_grad
    assert ops.backend_report()["dense_gemv"]["ran"].get("cpp") == 2
    assert use_dense_gemv(model) == 0  # already switched
