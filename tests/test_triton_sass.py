"""The structure the Triton quant kernels were designed for, checked on their GPU machine code.

The decode kernels' speed rests on properties of the SASS Triton emits, not visible under the
interpreter: no shared-memory layout conversion, shuffle or barrier inside the main loop
(the x and weight tiles must share one register layout), no register spills, and for the
tensor-core kernel pipelined (cp.async) weight loads feeding mma instructions.
``scripts/triton_sass.py`` compiles them offline for sm_80 / sm_90 (no GPU needed: triton ships
ptxas and cuobjdump), in a subprocess without ``TRITON_INTERPRET``. A layout change that puts a
conversion back in the loop fails here instead of silently costing GPU time.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from ops_utils import run_python

GEMV = ("int4_gemv_kernel", "int8_gemv_kernel", "int8_dyn_gemv_kernel")


def _nvidia_tools() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return "triton is not installed"
    bin_dir = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(os.path.join(bin_dir, tool)):
            return f"triton's NVIDIA backend ships no {tool} here"
    return None


@pytest.fixture(scope="module", params=(80, 90), ids=lambda a: f"sm{a}")
def sass(request):
    if (why := _nvidia_tools()) is not None:
        pytest.skip(why)
    code = (
        "import runpy, sys; sys.argv = ['triton_sass.py', '--json', '--arch', "
        f"'{request.param}']; runpy.run_path('scripts/triton_sass.py', run_name='__main__')"
    )
    out = run_python(code, env={"TRITON_INTERPRET": None}, timeout=600)
    last = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert last, f"no report from scripts/triton_sass.py:\n{out[-3000:]}"
    return json.loads(last[-1])


@pytest.mark.parametrize("kernel", GEMV)
def test_decode_loops_stay_in_registers(sass, kernel):
    r = sass[kernel]
    loop = r["loop"]
    assert loop["total"] > 0, f"{kernel}: no main loop found in the SASS"
    assert loop["LDG"] > 0, f"{kernel}: the loop loads nothing: {loop}"
    for op in ("LDS", "LDSM", "STS", "SHFL", "BAR"):
        assert loop[op] == 0, f"{kernel}: {op} in the main loop (layout conversion): {loop}"
    assert r["stack"] == 0, f"{kernel}: {r['stack']} B of stack per thread (spills)"


def test_int4_dot_kernel_pipelines_into_tensor_cores(sass):
    r = sass["int4_dot_kernel"]
    loop = r["loop"]
    assert loop["LDGSTS"] > 0, f"weight loads are not pipelined (no cp.async): {loop}"
    assert loop["HMMA"] > 0, f"no tensor-core mma in the loop: {loop}"
    assert r["stack"] == 0, f"{r['stack']} B of stack per thread (spills)"
