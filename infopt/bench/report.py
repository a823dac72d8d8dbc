"""Plain-text rendering of a :class:`~infopt.bench.runner.BenchResult`.

The table is fixed-width so it can be pasted into issues and diffs. Every ``(x..)`` figure is
relative to the baseline row of the same run: speedups (> 1 faster) for TTFT and decode,
size ratios (< 1 smaller) for memory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .stack import format_stack

if TYPE_CHECKING:
    from .runner import BenchResult, ConfigResult

MB = 1e6

# (header, width, cell function); numbers right-aligned, the config name left-aligned.
_COLUMNS: list[tuple[str, int, Any]] = [
    ("config", 12, lambda r: r.name),
    ("dtype", 8, lambda r: r.config["dtype"]),
    ("model MB", 14, lambda r: _with_ratio(r, r.model_bytes / MB, ".1f", "model_bytes")),
    ("TTFT ms", 15, lambda r: _with_ratio(r, r.ttft_ms["median"], ".1f", "ttft_speedup")),
    (
        "decode tok/s",
        15,
        lambda r: _with_ratio(r, r.decode_tok_s["median"], ".2f", "decode_speedup"),
    ),
    ("peak MB", 7, lambda r: _num(r.peak_mem_bytes / MB, ".0f")),
    ("+mem MB", 13, lambda r: _with_ratio(r, r.peak_mem_delta_bytes / MB, ".0f", "peak_mem")),
    ("ppl", 8, lambda r: _ev(r, "ppl_cand", ".3f")),
    ("dppl %", 7, lambda r: _ev(r, "ppl_rel_increase", "+.2f", 100.0)),
    ("KL", 7, lambda r: _ev(r, "kl_mean", ".4f")),
    ("top1", 5, lambda r: _ev(r, "top1_agreement", ".3f")),
    # compare() reports the greedy prefix match; "greedy_agreement" is the older contract name.
    ("greedy", 6, lambda r: _ev(r, ("greedy_prefix_match", "greedy_agreement"), ".3f")),
]
# Shown only when some row has them (run_bench(humaneval=N), the quality gate).
_PASS_COLUMN = ("pass@1", 6, lambda r: _pass_at_1(r))
_GATE_COLUMN = ("gate", 4, lambda r: "" if r.gate is None else
                ("ok" if r.gate["passed"] else "FAIL"))


def _pass_at_1(r: ConfigResult) -> str:
    h = r.humaneval or {}
    if "error" in h:
        return "err"
    return _num(h.get("pass_at_1"), ".1f", 100.0)


def _columns(rows: list[ConfigResult]) -> list[tuple[str, int, Any]]:
    cols = list(_COLUMNS)
    if any(r.humaneval for r in rows):
        cols.append(_PASS_COLUMN)
    if any(r.gate is not None for r in rows):
        cols.append(_GATE_COLUMN)
    return cols


def _num(v: Any, fmt: str, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v * scale, fmt)


def _with_ratio(r: ConfigResult, v: float, fmt: str, ratio: str) -> str:
    """``v`` followed by row ``r``'s ``ratio`` against the baseline, e.g. ``26.90 (1.00x)``."""
    return f"{_num(v, fmt)} ({_num(r.ratios[ratio], '.2f')}x)"


def _ev(r: ConfigResult, keys: str | tuple[str, ...], fmt: str, scale: float = 1.0) -> str:
    """An eval figure of row ``r``: the first of ``keys`` it has, "-" when none."""
    ev = r.eval or {}
    keys = (keys,) if isinstance(keys, str) else keys
    return _num(next((ev[k] for k in keys if ev.get(k) is not None), None), fmt, scale)


def format_table(rows: list[ConfigResult]) -> str:
    """One fixed-width line per config, under a header and a rule."""
    # The name column is as wide as the longest config name, so long names keep the alignment.
    columns = _columns(rows)
    widths = [w for _, w, _ in columns]
    widths[0] = max([widths[0], *(len(r.name) for r in rows)])
    lines = []
    for i, ((h, _, _), w) in enumerate(zip(columns, widths)):
        lines.append(h.ljust(w) if i == 0 else h.rjust(w))
    out = ["  ".join(lines)]
    out.append("-" * len(out[0]))
    for r in rows:
        cells = [f(r) for _, _, f in columns]
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )
        )
    return "\n".join(out)


def format_domains(rows: list[ConfigResult]) -> str:
    """Per-domain quality: one line per config, ``dppl % / KL / top1`` for each domain, "" when
    no row was scored on domains."""
    names = list(dict.fromkeys(d for r in rows for d in (r.domains or {})))
    if not names:
        return ""
    w0 = max([6, *(len(r.name) for r in rows)])
    cell = 27
    head = "config".ljust(w0) + "".join(f"  {n:>{cell}}" for n in names)
    sub = " " * w0 + "".join(f"  {'dppl % / KL / top1':>{cell}}" for _ in names)
    out = ["quality per domain (vs baseline; no averaging across domains):", head, sub,
           "-" * len(head)]
    for r in rows:
        cells = []
        for n in names:
            d = (r.domains or {}).get(n)
            if d is None:
                cells.append("-")
                continue
            inc = _num(d.get("ppl_rel_increase"), "+.2f", 100.0)
            kl, top1 = _num(d.get("kl_mean"), ".4f"), _num(d.get("top1_agreement"), ".3f")
            cells.append(f"{inc} / {kl} / {top1}")
        out.append(r.name.ljust(w0) + "".join(f"  {c:>{cell}}" for c in cells))
    refs = []
    for n in names:
        ref = next((r.domains[n].get("ppl_ref") for r in rows if n in (r.domains or {})), None)
        refs.append(f"{n} {_num(ref, '.3f')}")
    out.append(f"baseline ppl: {'  '.join(refs)}")
    return "\n".join(out)


def format_gate(res: BenchResult) -> str:
    """The quality gate's verdict: budgets and each flagged row's violations, "" if unset."""
    gated = [r for r in res.rows if r.gate is not None]
    if not gated:
        return ""
    s = res.settings
    budgets = (f"ppl increase <= {s.get('max_ppl_increase')}% (every text), HumanEval pass@1 "
               f"drop <= {s.get('max_pass_drop')} points")
    failed = [r for r in gated if not r.gate["passed"]]
    lines = [f"quality gate ({budgets}): {len(failed)} of {len(gated)} rows over budget"]
    lines += [f"  FAIL {r.name}: {'; '.join(r.gate['violations'])}" for r in failed]
    return "\n".join(lines)


def format_header(res: BenchResult) -> str:
    m, v, s = res.machine, res.versions, res.settings
    cores = f"{m.get('logical_cores')} logical cores"
    if m.get("physical_cores"):
        cores += f" ({m['physical_cores']} physical)"
    machine = f"machine: {m.get('cpu')}, {cores}"
    if m.get("ram_gib"):
        machine += f", {m['ram_gib']} GiB RAM"
    if m.get("loadavg_1m_at_start") is not None:
        machine += f", load avg {m['loadavg_1m_at_start']} at start"
    if m.get("gpu"):
        machine += f" | GPU: {m['gpu']} ({m.get('gpu_mem_gib')} GiB, CUDA {m.get('cuda')})"
    evals = (
        f"eval {s['eval_tokens']} tokens + {s['eval_prompts']} greedy prompts"
        if s["eval_tokens"]
        else "eval skipped"
    )
    return "\n".join(
        [
            f"infopt bench | model {res.model} | device {res.device} | batch {res.batch_size} | "
            f"greedy | baseline: {res.baseline} | {res.date}",
            machine,
            f"versions: torch {v['torch']} | transformers {v['transformers']} | "
            f"infopt {v['infopt']} | python {v['python']} | threads {res.threads}",
            f"run: prompt {_prompt_desc(s)}, {s['new_tokens']} new tokens, "
            f"{s['warmup']} warmup + {s['repeats']} timed runs (median); {evals}; "
            f"wall {res.wall_s:.0f} s",
        ]
    )


def _prompt_desc(s: dict[str, Any]) -> str:
    kind = s.get("prompt", "text")
    if kind == "text":
        return f"{s['prompt_tokens']} tokens of the eval text"
    return f"set '{kind}' (timed run j uses prompt j % n)"


def format_spec(rows: list[ConfigResult]) -> str:
    """Acceptance figures of the speculative rows (summed over their timed runs), or ""."""
    lines = []
    for r in rows:
        st = r.spec
        if not st:
            continue
        per_pos = " ".join(f"{a:.2f}" for a in st["acceptance_rate_per_position"][:8])
        lines.append(
            f"  {r.name}: acceptance {st['acceptance_rate']:.3f} "
            f"({st['accepted']}/{st['proposed']} drafted tokens), "
            f"{st['tokens_per_step']:.2f} tokens per target forward step, "
            f"{st['target_forwards']} target / {st['draft_forwards']} draft forwards; "
            f"per position: {per_pos}"
        )
    return "speculative acceptance (timed runs):\n" + "\n".join(lines) if lines else ""


def format_notes(res: BenchResult) -> str:
    method = res.rows[0].mem_method if res.rows else "?"
    return "\n".join(
        [
            "(Nx): vs baseline; TTFT, decode: speedup (>1 faster); MB: size ratio (<1 smaller).",
            "TTFT: prompt -> first new token via generate(); decode: later tokens / their time.",
            f"peak MB: peak during the generate runs ({method}); +mem MB: that peak minus the",
            "  level before this config was loaded (the baseline stays loaded for eval).",
            "ppl/KL/top1/greedy: infopt.eval.compare vs baseline"
            + (
                "; baseline row: itself (KL 0, agreement 1 by definition)."
                if res.rows and (res.rows[0].eval or {}).get("source") == "identity"
                else "."
            ),
        ]
    )


def _quality_hook_note(res: BenchResult) -> str:
    # Rows whose config declares a quality hook (the kv rows: BenchConfig.quality).
    hooked = [r.name for r in res.rows if r.eval and r.config.get("quality")]
    if not hooked:
        return ""
    return (
        f"{', '.join(hooked)}: ppl/KL/top1 decoded through the KV cache in chunks "
        "(infopt.eval.compare_through_cache), since compare's use_cache=False forwards never "
        "read it."
    )


def format_report(res: BenchResult) -> str:
    """Header, table, notes and the kernel backend report, as printed by ``infopt bench``."""
    parts = [format_header(res), "", format_table(res.rows), "", format_notes(res)]
    if dom := format_domains(res.rows):
        parts += ["", dom]
    if gate := format_gate(res):
        parts += ["", gate]
    if note := _quality_hook_note(res):
        parts.append(note)
    if spec := format_spec(res.rows):
        parts += ["", spec]
    if stack := format_stack(res.rows):
        parts += ["", stack]
    if res.backend_report_text:
        parts += ["", res.backend_report_text.rstrip()]
    return "\n".join(parts)
