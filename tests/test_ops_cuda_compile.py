"""Compile-check csrc/cuda/*.cu with plain nvcc (runs on CPU-only CI when nvcc is installed).

The .cu files are plain CUDA C++ (no torch headers), so they build without a CUDA torch. They are
compiled with the macros torch's cpp_extension passes to nvcc (no implicit half/bf16 operators),
since that's how the extension build sees them. The torch binding itself needs torch's CUDA
headers and is only built on a CUDA box (test_ops_rmsnorm.py covers it there).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from ops_utils import REPO

CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
TORCH_NVCC_MACROS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def test_cuda_sources_exist_and_are_torch_free():
    assert CUDA_SOURCES, "no csrc/cuda/*.cu sources"
    for src in CUDA_SOURCES:
        includes = re.findall(r"#include\s*[<\"]([^>\"]+)", src.read_text())
        torchy = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")]
        assert not torchy, f"{src.name} includes torch headers {torchy}; keep .cu files plain CUDA"


def test_schemas_defined_exactly_once():
    """Only one TORCH_LIBRARY(infopt, ...) block; every backend library adds impls only."""
    defs = [
        f.relative_to(REPO)
        for f in sorted((REPO / "csrc").rglob("*"))
        if f.suffix in (".cpp", ".cu", ".h", ".cuh") and "TORCH_LIBRARY(infopt" in f.read_text()
    ]
    assert [str(d) for d in defs] == ["csrc/cpu/schema.cpp"], defs


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("src", CUDA_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(src, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    cmd = [
        nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Werror", "all-warnings",
        *TORCH_NVCC_MACROS, "-c", str(src), "-o", str(tmp_path / f"{src.stem}_{arch}.o"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / f"{src.stem}_{arch}.o").stat().st_size > 0
