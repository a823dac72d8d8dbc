"""The CPU paged attention kernel's two loop bodies: the AVX2 one on shapes that hit each of its
tails, the portable one forced by an ISA cap. Oracle and helpers: test_ops_paged_attention.py."""

from __future__ import annotations

import pytest
import torch
from ops_utils import run_python
from test_ops_paged_attention import check, check_quant, requires_cpp


@requires_cpp
@pytest.mark.parametrize("d", [8, 24, 40, 128])
@pytest.mark.parametrize("bs", [4, 8, 64])
def test_cpp_vector_body_tails(bs, d):
    """Shapes that hit every tail of the AVX2 body (head_dim % 8 == 0): D with no 32-float
    slice (8, 24), a slice plus a vector (40), pages shorter than one 8-key block (bs 4), an
    odd number of query heads per task (G = 7, MQA) and long pages; the portable body gets the
    same shapes on CPUs without AVX2."""
    torch.set_num_threads(1)
    for hq, hkv in ((7, 1), (4, 2)):
        check("cpp", [1, 9, 70], [1, 1, 1], hq, hkv, d, bs, torch.float32, decode=True)
        check("cpp", [1, 9, 70], [1, 9, 23], hq, hkv, d, bs, torch.float32, window=5)
        check("cpp", [3, 70], [2, 70], hq, hkv, d, bs, torch.bfloat16, softcap=1.5)
        check_quant("cpp", [9, 70], [4, 17], hq, hkv, d, bs, torch.float32, torch.int8)


@requires_cpp
def test_cpp_portable_body_when_isa_capped():
    """INFOPT_CPU_ISA=scalar runs the portable loop body (an AVX2 machine otherwise runs only the
    intrinsics one for D % 8 == 0): same oracle, windows, soft-cap and quantized caches."""
    code = """
import sys, torch
sys.path.insert(0, "tests")
from test_ops_paged_attention import check, check_quant, W_LENS, W_QLENS, QUANT_DTYPES
torch.set_num_threads(2)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    check("cpp", W_LENS, [1] * 4, 8, 2, 64, 8, dtype, decode=True)
    check("cpp", W_LENS, W_QLENS[1], 8, 2, 64, 16, dtype, window=3, softcap=1.5)
    check("cpp", [5, 33, 40], [0, 4, 9], 7, 1, 40, 16, dtype)
for cache_dtype in QUANT_DTYPES:
    check_quant("cpp", W_LENS, W_QLENS[0], 14, 2, 64, 8, torch.float32, cache_dtype)
print("ok")
"""
    out = run_python(code, env={"INFOPT_CPU_ISA": "scalar"})
    assert out.strip().endswith("ok"), out
