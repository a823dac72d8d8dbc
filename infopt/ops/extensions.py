"""Lazy JIT build and load of the C++ (CPU) and CUDA extensions in ``csrc/``.

Both extensions are plain shared libraries that register ops with the PyTorch dispatcher
(``TORCH_LIBRARY`` / ``TORCH_LIBRARY_IMPL``), built with ``torch.utils.cpp_extension.load(...,
is_python_module=False)``; they are reached through ``torch.ops.infopt.*``, never as pybind
modules. The schemas are defined exactly once, in ``csrc/cpu/schema.cpp`` inside the CPU library,
so the CUDA library (which only adds ``CUDA`` impls) needs the CPU library loaded first.

Builds land in ``$INFOPT_CACHE`` (default ``~/.cache/infopt``) under ``extensions/<name>-torch<ver>-
<hash>``, the hash covering the sources, flags and CUDA version, so editing a source or changing
torch rebuilds instead of loading a stale library. An ``fcntl`` lock serializes concurrent builds
(pytest workers). Any failure is captured as a short reason string instead of raised, so importing
``infopt.ops`` never depends on a compiler; ``INFOPT_DISABLE_CPP=1`` forces that path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["cache_dir", "csrc_dir", "load_cpu", "load_cuda"]

# No -std: cpp_extension picks the standard this torch's headers need (C++17 or newer); the
# sources are plain C++17. -fopenmp makes at::parallel_for (inline `omp parallel`) and the
# `omp simd` reductions in csrc/cpu real.
CPU_CFLAGS = ["-O3", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]
# cpp_extension passes torch's -D__CUDA_NO_HALF_OPERATORS__ (and friends) to nvcc; the .cu sources
# use explicit conversion intrinsics only, so they build with or without them.
NVCC_CFLAGS = ["-O3"]

_lock = threading.RLock()  # re-entrant: load_cuda calls load_cpu
_results: dict[str, str | None] = {}  # library name -> None (loaded) or the failure reason


def cache_dir() -> Path:
    """``$INFOPT_CACHE`` if set, else ``~/.cache/infopt``."""
    return Path(os.environ.get("INFOPT_CACHE") or Path.home() / ".cache" / "infopt")


def csrc_dir() -> Path | None:
    """The ``csrc/`` tree: ``infopt/csrc`` in an installed wheel (setup.py copies it there),
    else the repository root's in a source checkout."""
    package = Path(__file__).resolve().parents[1]  # .../infopt
    for cand in (package / "csrc", package.parent / "csrc"):
        if (cand / "cpu" / "schema.cpp").is_file():
            return cand
    return None


def _short_error(exc: BaseException, max_lines: int = 6) -> str:
    """First compiler error lines of a failed build (the full log is long and mostly noise)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # Compiler diagnostics look like "file:line:col: error: ..."; ninja's own lines ("[1/2] c++
    # ...", "FAILED: ...") and cpp_extension's "Error building extension" header are noise.
    diag = [ln for ln in lines if re.search(r"\berror\b\s*:", ln, re.IGNORECASE)]
    diag = [ln for ln in diag if not ln.startswith(("[", "FAILED", "RuntimeError"))]
    loose = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("[")]
    picked = (diag or loose or lines)[:max_lines]
    return f"{type(exc).__name__}: " + " | ".join(picked)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_dir(name: str, sources: list[Path], flags: list[str]) -> Path:
    h = hashlib.sha256()
    for part in (name, torch.__version__, str(torch.version.cuda), *flags):
        h.update(part.encode() + b"\0")
    # Headers next to the sources change the build too, so hash the whole source folders.
    for folder in sorted({s.parent for s in sources}):
        for f in sorted(folder.iterdir()):
            if f.is_file():
                h.update(f.name.encode() + b"\0" + f.read_bytes())
    ver = torch.__version__.replace("+", "_")
    return cache_dir() / "extensions" / f"{name}-torch{ver}-{h.hexdigest()[:16]}"


def _build_and_load(
    name: str,
    sources: list[Path],
    cflags: list[str],
    ldflags: list[str],
    cuda_cflags: list[str] | None = None,
    verbose: bool = False,
) -> None:
    from torch.utils import cpp_extension

    build_dir = _build_dir(name, sources, cflags + ldflags + (cuda_cflags or []))
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / ".infopt.lock"):
        # torch's own build baton (a "lock" file in the build directory) stays behind when a
        # build is killed, and every later load then waits for it forever. Under this flock no
        # other infopt process is building here, so a baton that exists now is stale.
        (build_dir / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_cuda_cflags=cuda_cflags,
            build_directory=str(build_dir),
            is_python_module=False,  # a plain .so: torch.ops.load_library, no pybind module
            verbose=verbose,
        )


def _cxx_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} not found on PATH (set CXX)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary next to python)
        except ImportError:
            return "ninja not found (pip install ninja)"
    return None


def _load_once(name: str, build) -> str | None:
    with _lock:
        if name not in _results:
            try:
                _results[name] = build()
            except Exception as e:  # any build/load failure becomes an "unavailable" reason
                _results[name] = _short_error(e)
        return _results[name]


def load_cpu(verbose: bool = False) -> str | None:
    """Build (first time) and load the CPU library; None on success, else why it failed."""

    def build() -> str | None:
        if os.environ.get("INFOPT_DISABLE_CPP", "") not in ("", "0"):
            return "disabled by INFOPT_DISABLE_CPP=1"
        src = csrc_dir()
        if src is None:
            return "C++ sources (csrc/) not found next to the infopt package"
        if (why := _cxx_missing()) is not None:
            return why
        sources = sorted((src / "cpu").glob("*.cpp"))
        _build_and_load("infopt_cpu", sources, CPU_CFLAGS, CPU_LDFLAGS, verbose=verbose)
        from . import library

        library.register_fakes()
        return None

    return _load_once("infopt_cpu", build)


def load_cuda(verbose: bool = False) -> str | None:
    """Build (first time) and load the CUDA library; None on success, else why it failed."""

    def build() -> str | None:
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
        from torch.utils import cpp_extension

        home = cpp_extension.CUDA_HOME
        if home is None or not (Path(home) / "bin" / "nvcc").is_file():
            return f"nvcc not found (CUDA_HOME={home!r}; set CUDA_HOME or put nvcc on PATH)"
        if (why := load_cpu(verbose)) is not None:
            return f"needs the CPU library, which defines the op schemas: {why}"
        src = csrc_dir()
        assert src is not None  # load_cpu succeeded, so the sources exist
        sources = [src / "cuda" / "torch_binding.cpp", *sorted((src / "cuda").glob("*.cu"))]
        _build_and_load("infopt_cuda", sources, CUDA_CFLAGS, [], NVCC_CFLAGS, verbose=verbose)
        return None

    return _load_once("infopt_cuda", build)


# --- availability probes shared by every op's cpp / cuda backend (see registry.BackendImpl) ---


def cpp_probe(device_type: str) -> str | None:
    """None if the C++ CPU extension can run on ``device_type`` tensors, else the reason."""
    if device_type != "cpu":
        return "the cpp backend runs on CPU tensors only"
    return load_cpu()


def cuda_probe(device_type: str) -> str | None:
    """None if the CUDA extension can run on ``device_type`` tensors, else the reason."""
    if device_type != "cuda":
        cuda = "no CUDA device" if not torch.cuda.is_available() else "CUDA is available"
        return f"the cuda backend runs on CUDA tensors only ({cuda} here)"
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return load_cuda()
