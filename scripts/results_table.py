"""Turn the JSON of ``infopt bench --json PATH`` into a docs/results.md table.

    python scripts/results_table.py bench.json [--title "Decode speed on ..."] >> docs/results.md

The output is a ``###`` heading, the header line every table in docs/results.md carries
(date, machine, model, the ``infopt bench`` command that reproduces the run, rebuilt from the
JSON's settings), then one markdown row per config with its ratios to the run's baseline.
Only the standard library is used, so it runs without infopt installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def machine_line(m: dict[str, Any]) -> str:
    """``machine`` of the bench JSON as one phrase: CPU, cores, RAM, load, GPU."""
    parts = [str(m.get("cpu") or "unknown CPU")]
    if m.get("logical_cores"):
        cores = f"{m['logical_cores']} logical cores"
        if m.get("physical_cores"):
            cores += f" ({m['physical_cores']} physical)"
        parts.append(cores)
    if m.get("ram_gib"):
        parts.append(f"{m['ram_gib']} GiB")
    if m.get("loadavg_1m_at_start") is not None:
        parts.append(f"load average {m['loadavg_1m_at_start']} at start")
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']} ({m.get('gpu_mem_gib')} GiB, CUDA {m.get('cuda')})")
    return ", ".join(parts)


def command(d: dict[str, Any]) -> str:
    """The ``infopt bench`` command line that repeats the run's settings."""
    s = d.get("settings", {})
    configs = ",".join(r["config"]["name"] for r in d.get("rows", []))
    cmd = ["infopt bench", f"--model {d['model']}", f"--configs {configs}"]
    if d.get("device", "cpu") != "cpu":
        cmd.append(f"--device {d['device']}")
    prompt = s.get("prompt", "text")
    cmd.append(f"--prompt {prompt}")
    if prompt == "text" and "prompt_tokens" in s:
        cmd.append(f"--prompt-tokens {s['prompt_tokens']}")
    for key in ("new_tokens", "repeats", "warmup", "eval_tokens", "eval_prompts"):
        if key in s:
            cmd.append(f"--{key.replace('_', '-')} {s[key]}")
    if "domains" in s:
        cmd.append(f"--domains {','.join(s['domains']) or 'none'}")
    if s.get("humaneval"):
        cmd.append(f"--humaneval {s['humaneval']}")
    for key in ("max_ppl_increase", "max_pass_drop"):
        if key in s:
            cmd.append(f"--{key.replace('_', '-')} {'none' if s[key] is None else s[key]}")
    if d.get("threads"):
        cmd.append(f"--threads {d['threads']}")
    return " ".join(cmd)


def header(d: dict[str, Any]) -> str:
    """The results.md header line: date · machine · model · command."""
    v = d.get("versions", {})
    sw = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "infopt") if k in v)
    date = str(d.get("date", "date unknown"))[:10]
    return (
        f"> {date} · {machine_line(d.get('machine', {}))}"
        + (f"; {sw}" if sw else "")
        + f" · {d['model']} · `{command(d)}`"
    )


def _num(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _with_ratio(value: Any, ratio: Any, fmt: str) -> str:
    if value is None:
        return ""
    return f"{value:{fmt}}" + ("" if ratio is None else f" ({ratio:.2f}x)")


def row_line(r: dict[str, Any]) -> str:
    cfg, ev, ratios = r["config"], r.get("eval") or {}, r.get("ratios") or {}
    rel = ev.get("ppl_rel_increase")
    cells = [
        f"`{cfg['name']}`",
        cfg.get("dtype", ""),
        _with_ratio(r["model_bytes"] / 1e6 if r.get("model_bytes") else None,
                    ratios.get("model_bytes"), ".0f"),
        _with_ratio((r.get("ttft_ms") or {}).get("median"), ratios.get("ttft_speedup"), ".1f"),
        _with_ratio((r.get("decode_tok_s") or {}).get("median"), ratios.get("decode_speedup"),
                    ".2f"),
        _num(r["peak_mem_bytes"] / 1e6 if r.get("peak_mem_bytes") else None, ".0f"),
        _num(ev.get("ppl_cand"), ".3f"),
        "" if rel is None else f"{100 * rel:+.2f} %",
        _num(ev.get("kl_mean"), ".4f"),
        _num(ev.get("top1_agreement"), ".3f"),
        _num(ev.get("greedy_prefix_match"), ".3f"),
    ]
    return "| " + " | ".join(cells) + " |"


COLUMNS = ("config", "dtype", "model MB (x)", "TTFT ms (x)", "decode tok/s (x)", "peak MB",
           "ppl", "d ppl", "KL", "top-1", "greedy")


def quality_table(d: dict[str, Any]) -> list[str]:
    """Per-domain d ppl / KL / top-1, HumanEval pass@1 and the quality gate, one row per
    config; empty when the run measured none of them."""
    rows = d["rows"]
    names = list(dict.fromkeys(n for r in rows for n in (r.get("domains") or {})))
    has_pass = any(r.get("humaneval") for r in rows)
    has_gate = any(r.get("gate") is not None for r in rows)
    if not (names or has_pass or has_gate):
        return []
    cols = ["config", *(f"{n}: d ppl / KL / top-1" for n in names)]
    cols += ["HumanEval pass@1"] * has_pass + ["gate"] * has_gate
    out = ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"`{r['config']['name']}`"]
        for n in names:
            q = (r.get("domains") or {}).get(n) or {}
            rel = q.get("ppl_rel_increase")
            kl, top1 = _num(q.get("kl_mean"), ".4f"), _num(q.get("top1_agreement"), ".3f")
            cells.append("" if rel is None else f"{100 * rel:+.2f} % / {kl} / {top1}")
        if has_pass:
            h = r.get("humaneval") or {}
            cells.append("error" if "error" in h else "" if h.get("pass_at_1") is None
                         else f"{100 * h['pass_at_1']:.1f} % ({h.get('passed')}/{h.get('n')})")
        if has_gate:
            g = r.get("gate")
            cells.append("" if g is None else "ok" if g["passed"]
                         else "**FAIL**: " + "; ".join(g["violations"]))
        out.append("| " + " | ".join(cells) + " |")
    refs = [f"{n} {rows[0]['domains'][n]['ppl_ref']:.3f}" for n in names
            if n in (rows[0].get("domains") or {})]
    if refs:
        out += ["", f"Baseline perplexity per domain: {', '.join(refs)}."]
    return out


def render(d: dict[str, Any], title: str | None = None) -> str:
    """Markdown for one bench JSON: heading, header line, table."""
    title = title or f"{d['model']}: {', '.join(r['config']['name'] for r in d['rows'])}"
    lines = [f"### {title}", "", header(d), ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    lines.extend(row_line(r) for r in d["rows"])
    lines.extend(quality_table(d))
    lines.append("")
    lines.append(f"(x): ratio to `{d.get('baseline', 'baseline')}` of the same run "
                 "(speedup for TTFT and decode, size ratio for MB).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="file written by `infopt bench --json`")
    p.add_argument("--title", help="heading of the table (default: model and configs)")
    args = p.parse_args(argv)
    sys.stdout.write(render(json.loads(args.json.read_text()), args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
