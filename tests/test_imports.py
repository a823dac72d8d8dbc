"""Imports run one way (docs/DESIGN layering): each package imports alone, and no module
imports a layer above its own.

    cli / serve / bench / eval  ->  api  ->  batching  ->  quant / kvcache / speculative / distill
        ->  ops  ->  models / config / options / module_walk / logs
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "infopt"

# Layer of each top-level part of the package; a module may import its own layer and below.
LAYERS = {
    "config": 0, "options": 0, "module_walk": 0, "logs": 0, "models": 0,
    "ops": 1,
    "quant": 2, "kvcache": 2, "speculative": 2,
    "batching": 3,
    "api": 4,
    # distill trains on the engine's ShareGPT workload and evaluates with infopt.eval
    "eval": 5, "bench": 5, "serve": 5, "cli": 5, "distill": 5, "__main__": 5, "__init__": 5,
}  # fmt: skip
# Known exceptions (importer part, imported module): the evaluation corpus is plain data with
# no infopt imports of its own, which calibration reads too; the version string.
ALLOWED = {("quant", "infopt.eval.texts"), ("models", "infopt.__version__")}


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").exists():
        return parts[1] if len(parts) > 1 else "__init__"
    return "__init__"  # from infopt import wrap_model: a name of the top-level package


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out.append((name.removesuffix(".__init__"), path))
    return out


def _imports(module: str, path: Path) -> list[str]:
    """Every ``infopt`` module ``module`` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "infopt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "infopt":
                continue
            if node.module is None or target == "infopt":  # from . import x / from infopt import x
                found += [f"{target}.{a.name}" for a in node.names]
            else:
                found.append(target)
    return found


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for module, path in _modules():
        src = _part(module)
        for target in _imports(module, path):
            dst = _part(target)
            if dst not in LAYERS or src not in LAYERS:
                bad.append(f"{module}: unknown part {dst if dst not in LAYERS else src!r}")
                continue
            if LAYERS[dst] > LAYERS[src] and (src, target) not in ALLOWED:
                bad.append(f"{module} imports {target} ({src} is below {dst})")
    assert not bad, "\n".join(bad)


def test_technique_packages_never_import_the_bench():
    for module, path in _modules():
        if _part(module) in ("quant", "kvcache", "speculative", "distill", "batching", "ops"):
            assert not [t for t in _imports(module, path) if _part(t) == "bench"], module


@pytest.mark.parametrize(
    "package", ["infopt.quant", "infopt.kvcache", "infopt.speculative", "infopt.batching",
                "infopt.bench", "infopt.eval", "infopt.api"],
)  # fmt: skip
def test_each_package_imports_alone(package):
    # A fresh interpreter per package: an import cycle shows as an ImportError here.
    code = f"import {package}, sys; assert {package!r} in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
