"""Benchmarks: every config of a model measured in one process against an fp32 baseline.

    >>> from infopt.bench import run_bench
    >>> res = run_bench("smollm2-135m", "baseline,bf16")
    >>> print(res.format_table()); res.write_json("bench.json")

The same thing from the shell: ``infopt bench --configs baseline,bf16 --json bench.json``.
See docs/bench.md for what each column means and how it is measured.
"""

from .configs import (
    BASELINE,
    BenchConfig,
    get_bench_config,
    list_bench_configs,
    register_bench_config,
    resolve_configs,
)
from .report import format_report
from .runner import BenchResult, ConfigResult, model_bytes, run_bench
from .timing import PeakMemory, TimingStreamer, timed_generate

__all__ = [
    "BASELINE",
    "BenchConfig",
    "BenchResult",
    "ConfigResult",
    "PeakMemory",
    "TimingStreamer",
    "format_report",
    "get_bench_config",
    "list_bench_configs",
    "model_bytes",
    "register_bench_config",
    "resolve_configs",
    "run_bench",
    "timed_generate",
]
