"""Tests for the ``infopt`` command line (infopt.cli) and ``python -m infopt``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infopt import cli

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process -> (exit code, stdout, stderr); argparse exits count."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_commands_and_configs(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and all(c in out for c in ("bench", "models", "ops"))
    code, out, _ = run_main(capsys, "bench", "--help")
    assert code == 0 and "--configs" in out and "baseline" in out and "bf16" in out


def test_bad_config_exits_2_listing_accepted(capsys):
    code, _, err = run_main(capsys, "bench", "--configs", "baseline,fp8x")
    assert code == 2
    assert "--configs" in err and "'fp8x'" in err and "accepted: baseline, bf16" in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "--repeats", "0"], "argument --repeats: must be >= 1"),
        (["bench", "--new-tokens", "x"], "argument --new-tokens: expected an integer"),
        (["bench", "--device", "tpu"], "argument --device: invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(capsys, argv, fragment):
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and fragment in err


def test_library_error_is_one_line_with_hint(capsys, monkeypatch):
    def boom(*a, **k):
        raise ValueError("unknown embedded model 'nope'; embedded models: smollm2-135m\nmore")

    monkeypatch.setattr(cli._runner, "run_bench", boom)
    code, out, err = run_main(capsys, "bench", "--model", "nope")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[0] == "infopt bench: error: unknown embedded model 'nope'; embedded models: " \
        "smollm2-135m"  # fmt: skip
    assert lines[1].startswith("hint:") and "Traceback" not in err
    with pytest.raises(ValueError):
        cli.main(["--debug", "bench", "--model", "nope"])


def test_models_lists_registry(capsys):
    code, out, _ = run_main(capsys, "models")
    assert code == 0
    assert "smollm2-135m" in out and "qwen2.5-coder-0.5b" in out and "cached" in out


def test_ops_report(capsys):
    code, out, _ = run_main(capsys, "ops")
    assert code == 0 and out.strip()


def test_python_dash_m_version():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "infopt", "--version"], capture_output=True, text=True, cwd=ROOT,
        env=env, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("infopt ") and "torch" in p.stdout


@pytest.mark.model
def test_bench_end_to_end_on_default_model(capsys, tmp_path):
    from infopt.models import ensure_model

    # Fetch/convert up front (a no-op once cached) so the bench below times only the bench;
    # this is the README's main job and must run, not skip, on a fresh CI machine.
    ensure_model("smollm2-135m", progress=False)
    path = tmp_path / "bench.json"
    code, out, err = run_main(
        capsys, "bench", "--configs", "baseline,bf16", "--new-tokens", "8", "--repeats", "1",
        "--eval-tokens", "256", "--eval-prompts", "2", "--json", str(path),
    )  # fmt: skip
    assert code == 0, err
    assert "baseline" in out and "bf16" in out
    d = json.loads(path.read_text())
    assert [r["config"]["name"] for r in d["rows"]] == ["baseline", "bf16"]
    for r in d["rows"]:
        nums = [r["model_bytes"], r["ttft_ms"]["median"], r["decode_tok_s"]["median"],
                r["peak_mem_bytes"], r["eval"]["ppl_cand"]]  # fmt: skip
        assert all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in nums)
    assert all(v == 1.0 for v in d["rows"][0]["ratios"].values())
    assert d["rows"][1]["ratios"]["model_bytes"] == pytest.approx(0.5, rel=0.02)
    assert d["rows"][1]["eval"]["kl_mean"] > 0


def test_ops_require_exits_1_naming_missing_backends(capsys, monkeypatch):
    from infopt import ops
    from infopt.ops import registry

    code, out, err = run_main(capsys, "ops", "--require", "cpp")
    assert code == 0 and "rms_norm" in out and "required backend missing" not in err
    code, _, err = run_main(capsys, "ops", "--require", "gpu")
    assert code == 2 and "--require" in err and "'cpp', 'triton', 'cuda'" in err
    report = registry.backend_report()
    report["rms_norm"]["unavailable"]["cpp"] = "C++ sources (csrc/) not found"
    monkeypatch.setattr(ops, "backend_report", lambda probe=True: report)
    code, _, err = run_main(capsys, "ops", "--require", "cpp")
    assert code == 1 and "rms_norm: cpp: C++ sources (csrc/) not found" in err


def test_bench_plot_without_matplotlib_fails_before_running(capsys, monkeypatch):
    from infopt.bench import plot, runner

    monkeypatch.setattr(plot, "plot_available", lambda: "--plot needs matplotlib, which is not "
                        "installed: pip install matplotlib")
    monkeypatch.setattr(runner, "run_bench", lambda *a, **k: pytest.fail("bench ran"))
    code, _, err = run_main(capsys, "bench", "--plot", "out.png")
    assert code == 2 and "argument --plot: --plot needs matplotlib" in err
