"""Backend registry semantics: parsing, defaults, explicit vs AUTO, fallbacks, build failures."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest
import torch
from ops_utils import run_python

from infopt import ops
from infopt.ops import Backend, BackendUnavailableError, extensions, registry

ACCEPTED = "'auto', 'reference', 'cpp', 'triton', 'cuda'"


@pytest.fixture
def restore_default():
    old = ops.get_backend()
    yield
    ops.set_backend(old)


@pytest.fixture
def fake_op():
    """A throwaway op whose cpp backend always fails to 'build' (probe counts its calls)."""
    name = "_test_fallback_op"
    probes = []

    def probe(device_type):
        probes.append(device_type)
        return "simulated build failure: error: boom" if device_type == "cpu" else "cpu only"

    registry.register_op(
        name,
        lambda x: x + 1,
        {Backend.CPP: registry.BackendImpl(fn=lambda x: x + 2, probe=probe)},
    )

    def call(x, backend=None):
        _, fn = registry.select_backend(name, x.device, (x,), backend)
        return fn(x)

    yield name, call, probes
    registry._OPS.pop(name)


def test_parse_backend_accepts_enum_and_strings():
    assert ops.parse_backend(Backend.CPP) is Backend.CPP
    assert ops.parse_backend("triton") is Backend.TRITON
    assert ops.parse_backend(" CUDA ") is Backend.CUDA
    assert ops.parse_backend(None) is Backend.AUTO
    assert Backend("reference") == "reference"  # str enum: compares equal to its value


@pytest.mark.parametrize("bad", ["gpu", "", 3, Backend])
def test_bad_backend_names_argument_and_accepted_values(bad):
    with pytest.raises(ValueError) as info:
        ops.parse_backend(bad)
    assert "backend=" in str(info.value) and ACCEPTED in str(info.value)


def test_bad_backend_on_op_call_and_set_backend(restore_default):
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"backend='fast' is not a backend; accepted values"):
        ops.rms_norm(x, w, backend="fast")
    with pytest.raises(ValueError, match="accepted values"):
        ops.set_backend("fast")
    assert ops.get_backend() is Backend.AUTO  # a failed set leaves the default alone


def test_set_backend_and_use_backend_restore(restore_default):
    assert ops.set_backend("reference") is Backend.AUTO
    assert ops.get_backend() is Backend.REFERENCE
    with ops.use_backend(Backend.AUTO) as b:
        assert b is Backend.AUTO and ops.get_backend() is Backend.AUTO
    assert ops.get_backend() is Backend.REFERENCE
    with pytest.raises(RuntimeError, match="inside"), ops.use_backend("auto"):
        raise RuntimeError("inside")
    assert ops.get_backend() is Backend.REFERENCE  # restored on exception too


def test_default_backend_drives_calls_and_per_call_overrides(restore_default):
    x, w = torch.randn(2, 8), torch.randn(8)
    before = ops.backend_report(probe=False)["rms_norm"]["ran"].get("reference", 0)
    with ops.use_backend("reference"):
        ops.rms_norm(x, w)
        ops.rms_norm(x, w, backend="reference")
    after = ops.backend_report(probe=False)["rms_norm"]["ran"].get("reference", 0)
    assert after - before == 2
    with ops.use_backend("cuda"), pytest.raises(BackendUnavailableError):
        ops.rms_norm(x, w)  # the default is explicit too: no silent downgrade
    ops.rms_norm(x, w, backend="reference")  # ...and the per-call argument wins over it


def test_explicit_unavailable_backend_raises_with_reason_and_alternatives():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(BackendUnavailableError) as info:
        ops.rms_norm(x, w, backend="cuda")
    msg = str(info.value)
    assert "'cuda' is unavailable" in msg and "CUDA tensors only" in msg
    assert "Backends that can run it: [" in msg and "'reference'" in msg


def test_auto_fallback_logs_once_and_is_recorded(fake_op, caplog):
    name, call, probes = fake_op
    x = torch.zeros(3)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="infopt"):
        warnings.simplefilter("error")  # a notice, not a Python warning
        assert torch.equal(call(x), x + 1)
        assert torch.equal(call(x), x + 1)
    msgs = [r.getMessage() for r in caplog.records if r.name == "infopt.ops.registry"]
    assert len(msgs) == 1, msgs  # once, not once per call
    assert f"infopt.ops.{name}: backend=auto on cpu" in msgs[0]
    assert re.search(r"fell back to 'reference' \(cpp: simulated build", msgs[0]), msgs[0]
    assert caplog.records[0].levelno == logging.WARNING
    rep = ops.backend_report()[name]
    assert rep["ran"] == {"reference": 2}
    assert rep["fallbacks"] == [
        {
            "device": "cpu",
            "ran": "reference",
            "skipped": {"cpp": "simulated build failure: error: boom"},
            "count": 2,
        }
    ]
    assert rep["available"] == ["reference"]
    assert "simulated build failure" in rep["unavailable"]["cpp"]
    assert "fallback [cpu] -> reference x2" in ops.format_backend_report()
    with pytest.raises(BackendUnavailableError, match="simulated build failure.*'reference'"):
        call(x, backend="cpp")
    assert probes.count("cpu") == 1  # probed once, the answer cached


def test_report_structure():
    rep = ops.backend_report()["rms_norm"]
    assert set(rep) == {"available", "unavailable", "by_device", "ran", "fallbacks"}
    assert "reference" in rep["available"]
    assert "cpu" in rep["by_device"]
    assert "cuda" in rep["available"] or "cuda" in rep["unavailable"]
    json.dumps(rep)  # plain data, loggable as-is
    text = ops.format_backend_report()
    assert text.startswith("infopt.ops backends (default:") and "rms_norm:" in text


def test_auto_on_cpu_prefers_cpp_and_never_picks_triton():
    x, w = torch.randn(4, 64), torch.randn(64)
    chosen, _ = registry.select_backend("rms_norm", x.device, (x, w, 1e-6))
    cpp_ok = "cpp" in ops.backend_report()["rms_norm"]["by_device"]["cpu"]["available"]
    assert chosen is (Backend.CPP if cpp_ok else Backend.REFERENCE)


def test_build_failure_reason_is_short_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / "cache"))
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    bad = src_dir / "bad.cpp"
    bad.write_text("int broken( {\n")
    with pytest.raises(Exception) as info:
        extensions._build_and_load("infopt_test_bad", [bad], ["-O0"], [])
    reason = extensions._short_error(info.value)
    assert "error" in reason and len(reason) < 1500, reason
    assert (tmp_path / "cache" / "extensions").is_dir()  # INFOPT_CACHE honoured


def test_build_after_a_killed_build_does_not_wait_forever(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's baton file ("lock") in the build directory; the
    next load must not wait on it forever (it runs under infopt's own flock instead)."""
    import threading

    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src" / "ok.cpp"
    src.parent.mkdir()
    src.write_text("extern \"C\" int infopt_test_answer() { return 42; }\n")
    build_dir = extensions._build_dir("infopt_test_ok", [src], ["-O0"])
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()  # what a killed build leaves behind
    errors: list[BaseException] = []

    def build():
        try:
            extensions._build_and_load("infopt_test_ok", [src], ["-O0"], [])
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=build, daemon=True)
    t.start()
    t.join(timeout=300)
    assert not t.is_alive(), "the build waited on the stale baton file"
    assert not errors, errors
    assert (build_dir / "infopt_test_ok.so").is_file() and not (build_dir / "lock").exists()


def test_build_dir_keyed_by_sources_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path))
    src = tmp_path / "a" / "k.cpp"
    src.parent.mkdir()
    src.write_text("// v1\n")
    d1 = extensions._build_dir("lib", [src], ["-O3"])
    assert d1.parent == tmp_path / "extensions"
    assert torch.__version__.replace("+", "_") in d1.name
    assert extensions._build_dir("lib", [src], ["-O3"]) == d1
    assert extensions._build_dir("lib", [src], ["-O2"]) != d1
    (src.parent / "k.h").write_text("// a header change rebuilds too\n")
    assert extensions._build_dir("lib", [src], ["-O3"]) != d1


def test_disable_cpp_env_falls_back_cleanly():
    """INFOPT_DISABLE_CPP=1: imports work, cpp reports why, AUTO logs once (on stderr without
    any logging set up), explicit raises."""
    code = """
import sys, warnings, torch
import infopt, infopt.ops as ops
assert "triton" not in sys.modules, "importing infopt.ops must not import triton"
x, w = torch.randn(3, 16), torch.randn(16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ops.rms_norm(x, w); ops.rms_norm(x, w)
assert not [c for c in caught if "fell back" in str(c.message)], "a log record, not a warning"
rep = ops.backend_report()["rms_norm"]
assert "INFOPT_DISABLE_CPP=1" in rep["by_device"]["cpu"]["unavailable"]["cpp"], rep
assert rep["ran"] == {"reference": 2}, rep
try:
    ops.rms_norm(x, w, backend="cpp")
except ops.BackendUnavailableError as e:
    assert "INFOPT_DISABLE_CPP=1" in str(e)
else:
    raise AssertionError("explicit cpp must raise")
print("OK")
"""
    out = run_python(code, env={"INFOPT_DISABLE_CPP": "1"})
    assert "OK" in out
    msgs = [line for line in out.splitlines() if "rms_norm" in line and "fell back" in line]
    assert len(msgs) == 1, out
    assert "fell back to 'reference'" in msgs[0] and "INFOPT_DISABLE_CPP=1" in msgs[0], msgs


def test_triton_on_cpu_needs_the_interpreter():
    """Without TRITON_INTERPRET, explicit triton on CPU tensors raises and says how to enable it."""
    code = """
import torch, infopt.ops as ops
x, w = torch.randn(3, 16), torch.randn(16)
try:
    ops.rms_norm(x, w, backend="triton")
except ops.BackendUnavailableError as e:
    assert "TRITON_INTERPRET=1" in str(e), e
    print("OK")
"""
    out = run_python(code, env={"TRITON_INTERPRET": None, "INFOPT_DISABLE_CPP": "1"})
    assert "OK" in out
