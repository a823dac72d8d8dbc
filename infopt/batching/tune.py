"""Batch tuning: sweep ``max_num_seqs`` x ``max_num_batched_tokens`` on a sample of a workload
and pick the configuration with the highest output throughput that meets a latency bound.

Larger batches raise throughput until the step time (and so TPOT) grows; larger token budgets
finish prefills sooner (lower TTFT under load) but make the steps that carry them longer. The
trade depends on the model, the machine and the prompt/output lengths, so it is measured:

    >>> from infopt.batching.tune import tune_batch
    >>> res = tune_batch(model, tok, prompts, max_tokens, tpot_bound_s=0.05)
    >>> print(res.format()); res.pick.config
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from .engine import Engine
from .params import EngineConfig, SamplingParams

__all__ = ["TuneResult", "TuneRow", "percentile", "tune_batch"]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of a non-empty sequence (numpy's
    default rule)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclasses.dataclass(frozen=True)
class TuneRow:
    """One measured configuration (times in seconds)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    output_tok_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    preemptions: int
    wall_s: float
    meets_bound: bool = True
    on_frontier: bool = False

    @property
    def config(self) -> dict[str, int]:
        return {"max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens}


@dataclasses.dataclass(frozen=True)
class TuneResult:
    rows: tuple[TuneRow, ...]
    pick: TuneRow | None
    bound: str

    def format(self) -> str:
        head = ("| max_num_seqs | max_num_batched_tokens | output tok/s | TTFT p50 / p99 (s) | "
                "TPOT p50 / p99 (ms) | preemptions | frontier | meets bound |")
        lines = [head, "|" + "---|" * 8]
        for r in self.rows:
            mark = " **pick**" if r is self.pick else ""
            lines.append(
                f"| {r.max_num_seqs} | {r.max_num_batched_tokens} | {r.output_tok_s:.1f}{mark} | "
                f"{r.ttft_p50:.2f} / {r.ttft_p99:.2f} | {1e3 * r.tpot_p50:.1f} / "
                f"{1e3 * r.tpot_p99:.1f} | {r.preemptions} | {'yes' if r.on_frontier else ''} | "
                f"{'yes' if r.meets_bound else 'no'} |"
            )
        lines.append(f"\nbound: {self.bound}; pick: "
                     + (str(self.pick.config) if self.pick else "none meets the bound"))
        return "\n".join(lines)


def tune_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    max_tokens: Sequence[int] | int,
    *,
    max_num_seqs: Sequence[int] = (4, 8, 16, 32, 64),
    max_num_batched_tokens: Sequence[int] = (128, 256, 512),
    tpot_bound_s: float | None = None,
    ttft_bound_s: float | None = None,
    base: EngineConfig | None = None,
) -> TuneResult:
    """Run the whole sample offline (all requests at t=0, greedy, EOS ignored so every
    configuration generates the same tokens) once per grid point.

    Returns every row, marks the throughput / TPOT-p99 Pareto frontier, and picks the highest
    output tok/s whose p99 TPOT and p99 TTFT meet the bounds (``None``: unbounded).
    """
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    if len(max_tokens) != len(prompts) or not prompts:
        raise ValueError("tune_batch needs a non-empty prompt sample and one max_tokens each")
    for name, bound in (("tpot_bound_s", tpot_bound_s), ("ttft_bound_s", ttft_bound_s)):
        if bound is not None and not bound > 0:
            raise ValueError(f"{name} must be > 0 seconds or None, got {bound!r}")
    base = base or EngineConfig()
    sps = [SamplingParams(max_tokens=int(n), temperature=0, ignore_eos=True) for n in max_tokens]
    rows = []
    for seqs in max_num_seqs:
        for budget in max_num_batched_tokens:
            cfg = dataclasses.replace(base, max_num_seqs=seqs, max_num_batched_tokens=budget)
            engine = Engine(model, tokenizer, cfg)
            engine.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0),
                            use_tqdm=False)  # warm-up: first-call allocations, kernel probes
            t0 = time.perf_counter()
            outs = engine.generate(prompts, sps, use_tqdm=False)
            wall = time.perf_counter() - t0
            bad = [o.error for o in outs if o.finish_reason == "error"]
            if bad:
                raise ValueError(f"a sample request failed in the sweep: {bad[0]}")
            ttft = [o.metrics.ttft for o in outs]
            tpot = [o.metrics.tpot for o in outs if o.metrics.tpot is not None] or [0.0]
            r = TuneRow(seqs, budget, sum(len(o.token_ids) for o in outs) / wall,
                        percentile(ttft, 50), percentile(ttft, 99), percentile(tpot, 50),
                        percentile(tpot, 99), engine.stats().num_preemptions, wall)
            meets = (tpot_bound_s is None or r.tpot_p99 <= tpot_bound_s) and (
                ttft_bound_s is None or r.ttft_p99 <= ttft_bound_s)
            rows.append(dataclasses.replace(r, meets_bound=meets))
    frontier = {
        id(r) for r in rows
        if not any(o.output_tok_s >= r.output_tok_s and o.tpot_p99 <= r.tpot_p99
                   and (o.output_tok_s, o.tpot_p99) != (r.output_tok_s, r.tpot_p99)
                   for o in rows)
    }
    rows = [dataclasses.replace(r, on_frontier=id(r) in frontier) for r in rows]
    ok = [r for r in rows if r.meets_bound]
    pick = max(ok, key=lambda r: r.output_tok_s) if ok else None
    bound = ", ".join(
        s for s in (
            f"TPOT p99 <= {1e3 * tpot_bound_s:.0f} ms" if tpot_bound_s else "",
            f"TTFT p99 <= {ttft_bound_s:.2f} s" if ttft_bound_s else "",
        ) if s
    ) or "none"
    return TuneResult(tuple(rows), pick, bound)
