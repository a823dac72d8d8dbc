"""Serving metrics as vLLM's ``benchmark_serving`` reports them: per-request records,
percentiles, TTFT / TPOT / E2E summaries and seeded Poisson arrivals (:mod:`.serve` drives the
rows)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

__all__ = ["RequestRecord", "percentile", "poisson_arrivals", "summarize_records"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default); NaN if
    ``values`` is empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    rank = q / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival times (seconds from t=0) of ``n`` requests at ``rate`` requests/s.

    A Poisson process: exponential gaps of mean ``1 / rate``, drawn from ``random.Random(seed)``;
    the first request arrives at 0 (as in vLLM's benchmark). ``rate=inf``: all at 0 (offline).
    """
    if not (rate > 0):
        raise ValueError(f"request rate must be > 0 (inf = offline), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return list(itertools.accumulate([0.0] + [rng.expovariate(rate) for _ in range(n - 1)]))[:n]


@dataclasses.dataclass
class RequestRecord:
    """One finished request. Times in seconds from the row's start (its t=0)."""

    prompt_len: int
    num_generated: int
    arrival: float
    first_token: float
    finished: float
    token_ids: tuple[int, ...] = dataclasses.field(default=(), repr=False)
    num_cached_tokens: int = 0  # prompt tokens served by a prefix cache
    num_preemptions: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (None for 1-token outputs)."""
        n = self.num_generated
        return (self.finished - self.first_token) / (n - 1) if n >= 2 else None


def _stats_ms(values: Sequence[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    mean = sum(ms) / len(ms) if ms else math.nan
    return {"mean": mean, "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


def summarize_records(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """vLLM's serving metrics over ``records`` completed in ``duration_s`` seconds.

    Rates are totals over the duration (output tokens/s, prompt + output tokens/s,
    requests/s); TTFT / TPOT / E2E are ``{"mean", "p50", "p99"}`` in ms over requests (TPOT
    over those with >= 2 tokens).
    """
    out_tokens = sum(r.num_generated for r in records)
    in_tokens = sum(r.prompt_len for r in records)
    rate = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: math.nan)
    return {
        "num_requests": len(records), "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "duration_s": duration_s, "output_tok_s": rate(out_tokens),
        "total_tok_s": rate(out_tokens + in_tokens), "requests_s": rate(len(records)),
        "ttft_ms": _stats_ms([r.ttft for r in records]),
        "tpot_ms": _stats_ms([t for r in records if (t := r.tpot) is not None]),
        "e2e_ms": _stats_ms([r.finished - r.arrival for r in records]),
    }  # fmt: skip
