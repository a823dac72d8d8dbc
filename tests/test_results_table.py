"""scripts/results_table.py: a bench JSON becomes a docs/results.md table with its header line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_table.py"


@pytest.fixture(scope="module")
def rt():
    spec = importlib.util.spec_from_file_location("results_table", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(name, dtype, tok_s, ratio, ev):
    return {
        "config": {"name": name, "dtype": dtype},
        "model_bytes": 538_000_000 if dtype == "float32" else 269_000_000,
        "ttft_ms": {"median": 151.5}, "decode_tok_s": {"median": tok_s},
        "peak_mem_bytes": 1_200_000_000,
        "eval": ev,
        "ratios": {"decode_speedup": ratio, "ttft_speedup": 1.0, "model_bytes": 1.0},
    }


BENCH = {
    "date": "2026-11-22T16:20:00+00:00",
    "model": "smollm2-135m",
    "device": "cpu",
    "baseline": "baseline",
    "threads": 2,
    "settings": {"prompt_tokens": 128, "new_tokens": 64, "prompt": "text", "repeats": 3,
                 "warmup": 1, "eval_tokens": 1024, "eval_prompts": 8},
    "machine": {"cpu": "Intel(R) Xeon(R)", "logical_cores": 2, "ram_gib": 7.7,
                "loadavg_1m_at_start": 0.85},
    "versions": {"torch": "2.13.0", "transformers": "5.23.0", "infopt": "0.1.0"},
    "rows": [
        _row("baseline", "float32", 28.12, 1.0,
             {"ppl_cand": 30.891, "ppl_rel_increase": 0.0, "kl_mean": 0.0,
              "top1_agreement": 1.0, "greedy_prefix_match": 1.0}),
        _row("bf16", "bfloat16", 24.03, 0.8546, None),
    ],
}


def test_header_names_date_machine_model_and_command(rt):
    line = rt.header(BENCH)
    assert line.startswith("> 2026-11-22 · Intel(R) Xeon(R), 2 logical cores, 7.7 GiB")
    assert "load average 0.85 at start" in line and "torch 2.13.0" in line
    assert "· smollm2-135m ·" in line
    assert ("`infopt bench --model smollm2-135m --configs baseline,bf16 --prompt text "
            "--prompt-tokens 128 --new-tokens 64 --repeats 3 --warmup 1 --eval-tokens 1024 "
            "--eval-prompts 8 --threads 2`") in line


def test_rows_keep_the_measured_figures(rt):
    out = rt.render(BENCH, "Default run")
    lines = out.splitlines()
    assert lines[0] == "### Default run"
    table = [ln for ln in lines if ln.startswith("| `")]
    assert table[0].startswith(
        "| `baseline` | float32 | 538 (1.00x) | 151.5 (1.00x) | 28.12 (1.00x)"
    )
    assert "+0.00 %" in table[0] and "30.891" in table[0]
    assert table[1].startswith("| `bf16` | bfloat16 | 269 (1.00x) | 151.5 (1.00x) | 24.03 (0.85x)")
    assert table[1].endswith("|  |  |  |  |  |")  # no eval: empty cells, not invented values


def test_cli_reads_a_json_file(rt, tmp_path, capsys):
    p = tmp_path / "bench.json"
    p.write_text(json.dumps({**BENCH, "device": "cuda",
                             "machine": {**BENCH["machine"], "gpu": "NVIDIA H100", "cuda": "13.0",
                                         "gpu_mem_gib": 79.1}}))
    assert rt.main([str(p)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### smollm2-135m: baseline, bf16")
    assert "--device cuda" in out and "GPU NVIDIA H100 (79.1 GiB, CUDA 13.0)" in out
