"""Packaging hook: ship the C++/CUDA sources inside the wheel.

Everything else is declared in pyproject.toml. The kernels are JIT-built from ``csrc/`` on first
use (``infopt.ops.extensions``), which looks for the sources in ``infopt/csrc`` (an installed
wheel) before the repository root (a source checkout). ``csrc/`` lives at the repository root,
outside the package, so ``build_py`` copies it into the build tree as ``infopt/csrc``;
``MANIFEST.in`` puts it in the sdist.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_CSRC = Path(__file__).resolve().parent / "csrc"
_SUFFIXES = {".cpp", ".cu", ".h", ".cuh"}


class BuildPyWithCsrc(build_py):
    def run(self) -> None:
        super().run()
        if not (_CSRC / "cpu" / "schema.cpp").is_file():
            raise FileNotFoundError(f"{_CSRC} lacks cpu/schema.cpp: the C++ sources are needed")
        dest = Path(self.build_lib) / "infopt" / "csrc"
        for src in sorted(_CSRC.rglob("*")):
            if src.is_file() and src.suffix in _SUFFIXES:
                out = dest / src.relative_to(_CSRC)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)


setup(cmdclass={"build_py": BuildPyWithCsrc})
