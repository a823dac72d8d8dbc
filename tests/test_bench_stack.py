"""Compound bench rows and the stack table (infopt.bench.stack)."""

from __future__ import annotations

import types

import pytest

from infopt.bench.configs import BenchConfig, get_bench_config
from infopt.bench.stack import compound_config, format_stack


def test_compound_rows_merge_their_parts_options():
    row = get_bench_config("int4+paged-prefix+spec-prompt-lookup")
    assert row.wrap_options == {"quant": "int4", "kv": "paged-prefix", "spec": "prompt-lookup"}
    assert row.quality is get_bench_config("paged-prefix").quality  # read through the cache
    assert get_bench_config("int4+compile").wrap_options == {"quant": "int4", "compile": True}


def test_compound_rows_refuse_what_cannot_combine():
    a = BenchConfig("a", "a", wrap_options={"quant": "int8"})
    with pytest.raises(ValueError, match="more than one part"):
        compound_config([a, BenchConfig("b", "b", wrap_options={"quant": "int4"})])
    with pytest.raises(ValueError, match="cannot be part"):
        compound_config([a, BenchConfig("p", "peer", apply=lambda m: m)])


def row(name, speedup, ppl=None):
    ev = None if ppl is None else {"ppl_ref": 10.0, "ppl_cand": ppl}
    return types.SimpleNamespace(name=name, ratios={"decode_speedup": speedup}, eval=ev)


def test_stack_table_lines_up_parts_product_and_measured():
    rows = [row("baseline", 1.0), row("int4", 3.0, 11.0), row("compile", 1.5, 10.0),
            row("int4+compile", 4.0, 11.0), row("int4+spec-x", 5.0)]
    text = format_stack(rows)
    line = next(ln for ln in text.splitlines() if "int4+compile:" in ln)
    assert "int4 3.00x (+10.0% ppl)" in line and "compile 1.50x (+0.0% ppl)" in line
    assert "= 4.50x expected" in line and "measured 4.00x (89% of the product)" in line
    assert "ppl +10.0%" in line
    assert "int4+spec-x" not in text  # a part was not measured in this run
    assert format_stack(rows[:3]) == ""


def test_any_compound_of_registered_rows_is_accepted_by_name():
    row = get_bench_config("int4-head8+paged+spec-draft-qwen0.5b-int4")
    assert set(row.wrap_options) == {"quant", "kv", "spec"}
    assert row.wrap_options["kv"] == "paged"
    with pytest.raises(ValueError, match="unknown bench config 'int4\\+nonsense'"):
        get_bench_config("int4+nonsense")
    with pytest.raises(ValueError, match="set by more than one part"):
        get_bench_config("int4+int8")


def test_cli_accepts_compounds_of_registered_rows():
    import argparse

    from infopt.cli import _config_list

    assert _config_list("baseline,int4-head8+paged") == ["baseline", "int4-head8+paged"]
    with pytest.raises(argparse.ArgumentTypeError, match="'int4\\+zz'.*joined by '\\+'"):
        _config_list("int4+zz")
