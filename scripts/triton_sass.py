"""Compile infopt's Triton quant kernels for an NVIDIA GPU *offline* and summarise their SASS.

No GPU is needed: ``triton.compile`` takes an explicit ``GPUTarget`` and the triton wheel ships
``ptxas`` and ``cuobjdump``. Arguments get the divisibility-by-16 hints the JIT would pass at
launch for aligned tensors (without them every load compiles scalar). Used to design the decode
kernels without a GPU (docs/ops.md, "Triton decode kernels") and by
``tests/test_triton_sass.py`` to guard their structure:

    python scripts/triton_sass.py                  # table: loop instruction counts per kernel
    python scripts/triton_sass.py --json --arch 90 # machine-readable (the test reads this)

Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Opcode families worth reporting (loads, shared memory, shuffles, barriers, tensor cores).
KEYS = ("LDG", "LDGSTS", "LDS", "LDSM", "STS", "SHFL", "BAR", "HMMA", "HGMMA", "IMMA", "FFMA")


def compile_kernel(fn, signature: dict, constexprs: dict, divisible=(), *, arch=90, warps=1,
                   stages=1):  # fmt: skip
    """Compiled kernel (``.asm["cubin"]``) of the ``@triton.jit`` ``fn`` for sm_``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True)
    return proc.stdout


def sass_lines(cubin: bytes) -> list[str]:
    out = _cuobjdump(cubin, "-sass")
    return [ln.strip() for ln in out.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread: > 0 means spills or local arrays)."""
    out = _cuobjdump(cubin, "-res-usage")
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def _addr(line: str) -> int:
    return int(re.match(r"/\*([0-9a-f]+)\*/", line).group(1), 16)


def loop_body(lines: list[str]) -> list[str]:
    """Instructions between the last backward branch and its target (the main K loop)."""
    span = None
    for ln in lines:
        m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < _addr(ln):
            span = (int(m.group(1), 16), _addr(ln))
    return [] if span is None else [ln for ln in lines if span[0] <= _addr(ln) <= span[1]]


def opcode_counts(lines: list[str]) -> dict[str, int]:
    """Instruction count per opcode family in ``KEYS`` (``LDG.E.128`` counts as ``LDG``)."""
    counts = collections.Counter()
    for ln in lines:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln)
        if m:
            counts[m.group(1)] += 1
    return {k: sum(c for op, c in counts.items() if op == k) for k in KEYS} | {"total": len(lines)}


def _configs():
    """(name, kernel, signature, constexprs, divisible, warps, stages): the launchers' shapes."""
    from infopt.ops.triton_kernels import quant_linear as ql

    x16 = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*u8", "b_ptr": "*fp32",
           "y_ptr": "*bf16"}  # fmt: skip
    gemv4 = x16 | dict.fromkeys(("K", "KB", "G", "stride_xm", "stride_ym"), "i32")
    gemv4 |= dict.fromkeys(("GS", "HAS_BIAS", "CHUNKS", "SUB"), "constexpr")
    dot4 = x16 | dict.fromkeys(("M", "N", "KB", "G", "stride_xm", "stride_ym"), "i32")
    dot4 |= dict.fromkeys(("GS", "HAS_BIAS", "IEEE", "BLOCK_M", "BLOCK_N", "BLOCK_KB"), "constexpr")
    gemv8 = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "b_ptr": "*fp32",
             "y_ptr": "*bf16", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
             "HAS_BIAS": "constexpr", "CHUNKS": "constexpr", "SUB": "constexpr"}  # fmt: skip
    dyn8 = {"q_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*i8", "s_ptr": "*fp32", "b_ptr": "*fp32",
            "y_ptr": "*bf16", "K": "i32", "stride_ym": "i32", "HAS_BIAS": "constexpr",
            "CHUNKS": "constexpr", "SUB": "constexpr"}  # fmt: skip
    ptrs = [n for n in x16] + ["q_ptr", "xs_ptr"]

    def div(sig):
        return [n for n in sig if n in ptrs or n in ("K", "KB", "stride_xm", "stride_ym")]

    return [
        ("int4_gemv_kernel", ql.int4_gemv_kernel, gemv4,
         {"GS": 128, "HAS_BIAS": True, "CHUNKS": 128, "SUB": 4}, div(gemv4), 1, 1),
        ("int8_gemv_kernel", ql.int8_gemv_kernel, gemv8,
         {"HAS_BIAS": True, "CHUNKS": 128, "SUB": 4}, div(gemv8), 1, 1),
        ("int8_dyn_gemv_kernel", ql.int8_dyn_gemv_kernel, dyn8,
         {"HAS_BIAS": True, "CHUNKS": 128, "SUB": 4}, div(dyn8), 1, 1),
        ("int4_dot_kernel", ql.int4_dot_kernel, dot4,
         {"GS": 128, "HAS_BIAS": True, "IEEE": False, "BLOCK_M": 16, "BLOCK_N": 32,
          "BLOCK_KB": 64}, div(dot4), 4, 4),
    ]  # fmt: skip


def report(arch: int) -> dict[str, dict]:
    out = {}
    for name, fn, sig, cx, divisible, warps, stages in _configs():
        k = compile_kernel(fn, sig, cx, divisible, arch=arch, warps=warps, stages=stages)
        regs, stack = resources(k.asm["cubin"])
        out[name] = {"regs": regs, "stack": stack,
                     "loop": opcode_counts(loop_body(sass_lines(k.asm["cubin"])))}  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 or 90")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rep = report(args.arch)
    if args.json:
        print(json.dumps(rep))
        return
    import triton

    print(f"triton {triton.__version__}, sm_{args.arch}: main-loop SASS per kernel")
    for name, r in rep.items():
        ops = " ".join(f"{k}:{v}" for k, v in r["loop"].items() if v)
        print(f"{name:22s} regs {r['regs']:3d} stack {r['stack']} | {ops}")


if __name__ == "__main__":
    main()
