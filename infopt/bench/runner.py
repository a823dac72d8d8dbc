"""``run_bench``: every config measured in one process against a baseline from the same run.

For each config: load a fresh model in the config's dtype, apply its ``wrap_model`` options
(or its ``apply`` callable), then measure batch-1 greedy generation through
``model.generate`` (TTFT, decode tokens/s, peak memory), its weight bytes, and its quality
against the baseline model (``infopt.eval.compare``), which stays loaded for the whole run.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .configs import BASELINE, BenchConfig, _json_safe, resolve_configs
from .environment import (
    _backend_report,
    _pad_token_id,
    _prompts,
    _release_freed_memory,
    machine_info,
    model_bytes,
    versions,
)
from .timing import GenTiming, PeakMemory, memory_in_use, summarize, timed_generate

Loader = Callable[[str, torch.dtype, str], tuple[Any, Any]]  # (name, dtype, device) -> (model, tok)

# The default rows show the library: its int8 and int4 (int8 head) weights, a paged KV cache with
# prefix reuse, and speculative decoding, each against the fp32 baseline. Sized so that
# `bash scripts/bench.sh` on SmolLM2-135M, 2-core CPU, takes well under 10 minutes.
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_CONFIGS = ("baseline", "int8", "int4", "paged-prefix", "spec-prompt-lookup")
DEFAULT_PROMPT_TOKENS = 128
PROMPT_SETS = ("text", "code", "grounded")
DEFAULT_PROMPT = "text"
DEFAULT_NEW_TOKENS = 64
DEFAULT_REPEATS = 3
DEFAULT_WARMUP = 1
DEFAULT_EVAL_TOKENS = 1024
DEFAULT_EVAL_PROMPTS = 8
#: quality gate: rows whose perplexity increase (any domain, percent) or HumanEval pass@1 drop
#: (percentage points) exceeds these budgets are flagged in the table and the JSON.
DEFAULT_MAX_PPL_INCREASE = 5.0
DEFAULT_MAX_PASS_DROP = 3.0


@dataclasses.dataclass
class ConfigResult:
    """Measurements for one config. Times in ms, rates in tokens/s, sizes in bytes.

    ``peak_mem_bytes`` is absolute (process RSS on CPU, allocated tensors on CUDA) and so
    includes the baseline model kept for the quality comparison; ``peak_mem_delta_bytes`` is
    the peak minus what was in use before this config's model was loaded, i.e. what this
    config costs, and is what the memory ratio compares.
    """

    config: dict[str, Any]
    model_bytes: int
    load_s: float
    ttft_ms: dict[str, float]
    decode_tok_s: dict[str, float]
    peak_mem_bytes: int
    peak_mem_delta_bytes: int
    mem_before_load_bytes: int
    mem_method: str
    raw: dict[str, list[float]]
    eval: dict[str, Any] | None = None
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    #: speculative rows: acceptance counters summed over the timed runs (SpecStats.to_dict)
    spec: dict[str, Any] | None = None
    #: quality per evaluation domain: {domain: {ppl_ref, ppl_cand, ppl_rel_increase, kl_mean,
    #: top1_agreement, n_tokens}}
    domains: dict[str, dict[str, Any]] | None = None
    #: HumanEval (run_bench(humaneval=N)): pass_at_1, n, passed, per-problem results
    humaneval: dict[str, Any] | None = None
    #: quality gate: {"passed": bool, "violations": [str, ...]} (None for the baseline)
    gate: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.config["name"]


@dataclasses.dataclass
class BenchResult:
    """A whole run: environment, settings, and one :class:`ConfigResult` per config."""

    model: str
    device: str
    baseline: str
    settings: dict[str, Any]
    machine: dict[str, Any]
    versions: dict[str, str]
    threads: int
    date: str
    rows: list[ConfigResult]
    wall_s: float = 0.0
    backend_report: Any = None
    backend_report_text: str | None = None
    batch_size: int = 1

    def row(self, name: str) -> ConfigResult:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backend_report"] = _json_safe(self.backend_report)
        return d

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # allow_nan=False: a NaN/inf would be invalid JSON for most readers; _finite maps to None.
        path.write_text(json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False) + "\n")
        return path

    def format_table(self) -> str:
        from .report import format_report

        return format_report(self)


def run_bench(
    model: str = DEFAULT_MODEL,
    configs: str | Iterable[str | BenchConfig] = DEFAULT_CONFIGS,
    *,
    device: str = "cpu",
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    prompt: str = DEFAULT_PROMPT,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    eval_prompts: int = DEFAULT_EVAL_PROMPTS,
    threads: int | None = None,
    progress: bool = True,
    loader: Loader | None = None,
    text: str | None = None,
    compare_fn: Callable[..., Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    domains: Sequence[str] | Mapping[str, str] | None = None,
    humaneval: int = 0,
    max_ppl_increase: float | None = DEFAULT_MAX_PPL_INCREASE,
    max_pass_drop: float | None = DEFAULT_MAX_PASS_DROP,
    humaneval_fn: Callable[..., Any] | None = None,
) -> BenchResult:
    """Benchmark ``configs`` of ``model`` (batch 1, greedy) against the fp32 baseline.

    Args:
        model: registry name or path given to ``infopt.models.load_model``.
        configs: names (``"baseline,bf16"`` or a list) or :class:`BenchConfig` objects; the
            baseline is always run first (prepended when missing).
        prompt_tokens: prompt length in tokens, cut from the evaluation text (``prompt="text"``).
        prompt: what is generated from: ``"text"`` (the first ``prompt_tokens`` tokens of the
            evaluation text), ``"code"`` (``infopt.eval.CODE_PROMPTS``: code completion, where a
            draft model helps) or ``"grounded"`` (``infopt.eval.GROUNDED_PROMPTS``: edits whose
            answer copies the prompt, where prompt lookup helps). With several prompts, timed
            run ``j`` uses prompt ``j % n`` (the same sequence for every config), so use
            ``repeats`` >= the number of prompts to cover them all.
        new_tokens: tokens generated per timed run (exactly; EOS is suppressed).
        repeats / warmup: timed runs (median reported, min/max kept) / untimed runs before.
        eval_tokens / eval_prompts: text tokens and greedy prompts for ``infopt.eval.compare``;
            ``eval_tokens=0`` skips quality evaluation.
        threads: ``torch.set_num_threads`` for the run (restored afterwards).
        domains: evaluation domains scored for every row (``compare`` without generation on
            each domain's first ``eval_tokens`` tokens): names from ``infopt.eval.DOMAINS``,
            or ``{name: text}``. ``None``: all of ``DOMAINS``, unless ``text`` is given
            (then none); ``()`` skips them.
        humaneval: HumanEval problems (the first N; 164 = all) whose greedy pass@1 is
            measured for every row, baseline included; 0 skips it.
        max_ppl_increase / max_pass_drop: the quality gate: a row whose perplexity increase
            (main text or any domain, percent) or pass@1 drop against the baseline
            (percentage points) exceeds its budget is flagged; ``None`` disables a budget.
        loader / text / compare_fn / clock / humaneval_fn: injection points for tests; default
            to ``infopt.models.load_model``, ``infopt.eval.default_text()``,
            ``infopt.eval.compare``, ``time.perf_counter`` and
            ``infopt.eval.humaneval.evaluate_humaneval``.
    """
    cfgs = resolve_configs(configs)
    for arg, v, lo in (
        ("prompt_tokens", prompt_tokens, 1),
        ("new_tokens", new_tokens, 2),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
        ("eval_tokens", eval_tokens, 0),
        ("eval_prompts", eval_prompts, 0),
        ("humaneval", humaneval, 0),
    ):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{arg} must be an integer >= {lo}, got {v!r}")
    if prompt not in PROMPT_SETS:
        raise ValueError(f"prompt must be one of {PROMPT_SETS}, got {prompt!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch.cuda.is_available() is False")
    loader = loader or _default_loader
    log = _logger(progress)
    if domains is None:
        from infopt.eval.domains import DOMAINS

        domains = () if text is not None else DOMAINS
    domain_names = list(domains)
    for name, budget in (("max_ppl_increase", max_ppl_increase),
                         ("max_pass_drop", max_pass_drop)):
        if budget is not None and not (isinstance(budget, (int, float)) and budget >= 0):
            raise ValueError(f"{name} must be a number >= 0 or None, got {budget!r}")

    settings = {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prompt": prompt,
        "repeats": repeats,
        "warmup": warmup,
        "eval_tokens": eval_tokens,
        "eval_prompts": eval_prompts,
        "decoding": "greedy",
        "batch_size": 1,
        "domains": domain_names,
        "humaneval": humaneval,
        "max_ppl_increase": max_ppl_increase,
        "max_pass_drop": max_pass_drop,
    }
    machine = machine_info(dev)  # before the run: its load average says how quiet it was
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    t_start = clock()
    try:
        extra = {"domains": domains, "humaneval_fn": humaneval_fn}
        rows, backend = _run_all(
            model, cfgs, dev, loader, text, compare_fn, log, clock, settings, extra
        )
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev_threads)
    _fill_ratios(rows)
    apply_quality_gate(rows, max_ppl_increase, max_pass_drop)
    return BenchResult(
        model=model,
        device=str(dev),
        baseline=BASELINE,
        settings=settings,
        machine=machine,
        versions=versions(),
        threads=used_threads,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        rows=rows,
        wall_s=clock() - t_start,
        backend_report=backend[0],
        backend_report_text=backend[1],
    )


def _run_all(model_name, cfgs, dev, loader, text, compare_fn, log, clock, settings, extra):
    prompt_tokens, new_tokens = settings["prompt_tokens"], settings["new_tokens"]
    repeats, warmup = settings["repeats"], settings["warmup"]
    eval_tokens, eval_prompts = settings["eval_tokens"], settings["eval_prompts"]
    rows: list[ConfigResult] = []
    baseline_model = tokenizer = None
    prompts: list[torch.Tensor] = []
    for cfg in cfgs:
        gc.collect()
        _release_freed_memory(dev)
        mem_before = memory_in_use(dev)
        log(f"{cfg.name}: loading {model_name} ({str(cfg.dtype).removeprefix('torch.')})")
        t0 = clock()
        m, tok = loader(model_name, cfg.dtype, str(dev))
        m = _apply(cfg, m)
        load_s = clock() - t0
        m.eval()
        if baseline_model is None:  # first config is the baseline (resolve_configs ensures it)
            baseline_model, tokenizer = m, tok
            kind = settings["prompt"]
            prompts = [p.to(dev) for p in _prompts(tokenizer, text, kind, prompt_tokens)]
        pad = _pad_token_id(tokenizer)

        log(f"{cfg.name}: timing {warmup} warmup + {repeats} runs of {new_tokens} tokens")
        timings: list[GenTiming] = []
        spec_runs: list[Any] = []
        with PeakMemory(dev) as peak:
            for _ in range(warmup):
                timed_generate(m, prompts[0], new_tokens, pad_token_id=pad, clock=clock)
            for j in range(repeats):
                ids = prompts[j % len(prompts)]
                timings.append(timed_generate(m, ids, new_tokens, pad_token_id=pad, clock=clock))
                spec_runs.append(_spec_stats(m))
        ttft = [t.ttft_s * 1e3 for t in timings]
        rate = [t.decode_tok_s for t in timings]
        row = ConfigResult(
            config=cfg.to_dict(),
            model_bytes=model_bytes(m),
            load_s=load_s,
            ttft_ms=summarize(ttft),
            decode_tok_s=summarize(rate),
            peak_mem_bytes=peak.peak_bytes,
            peak_mem_delta_bytes=peak.peak_bytes - mem_before,
            mem_before_load_bytes=mem_before,
            mem_method=peak.method,
            raw={"ttft_ms": ttft, "decode_tok_s": rate, "total_s": [t.total_s for t in timings]},
            spec=_sum_spec_stats(spec_runs),
        )
        if eval_tokens > 0 and cfg.name != BASELINE:
            log(f"{cfg.name}: quality vs {BASELINE} ({eval_tokens} tokens, {eval_prompts} prompts)")
            row.eval = _evaluate(
                compare_fn, baseline_model, m, tokenizer, text, eval_tokens, eval_prompts
            )
            if cfg.quality is not None:
                log(f"{cfg.name}: quality hook {getattr(cfg.quality, '__name__', '')}")
                hooked = cfg.quality(baseline_model, m, tokenizer, text, eval_tokens)
                row.eval.update({k: _as_py(v) for k, v in hooked.items()})
            if settings["domains"]:
                log(f"{cfg.name}: quality on domains {', '.join(settings['domains'])}")
                row.domains = _evaluate_domains(
                    cfg, compare_fn, baseline_model, m, tokenizer, extra["domains"], eval_tokens
                )
        if settings["humaneval"]:
            log(f"{cfg.name}: HumanEval pass@1 on {settings['humaneval']} problems")
            row.humaneval = _run_humaneval(extra["humaneval_fn"], m, tokenizer,
                                           settings["humaneval"])
        rows.append(row)
        log(
            f"{cfg.name}: TTFT {row.ttft_ms['median']:.1f} ms, "
            f"decode {row.decode_tok_s['median']:.2f} tok/s"
        )
        if m is not baseline_model:
            del m
    if eval_tokens > 0:
        _fill_baseline_eval(
            rows, baseline_model, tokenizer, text, eval_tokens, eval_prompts, compare_fn, log
        )
        if settings["domains"]:
            _fill_baseline_domains(rows, baseline_model, tokenizer, extra["domains"],
                                   eval_tokens, compare_fn)
    backend = _backend_report()
    del baseline_model
    gc.collect()
    return rows, backend


def _evaluate(compare_fn, ref, cand, tok, text, eval_tokens, eval_prompts) -> dict[str, Any]:
    """``infopt.eval.compare`` (or the injected ``compare_fn``) as a plain dict."""
    compare_fn = compare_fn or _default_compare
    res = compare_fn(
        ref,
        cand,
        tok,
        texts=None if text is None else [text],
        # [] skips greedy generation; None would make compare pick its default prompts
        prompts=None if eval_prompts else [],
        max_tokens=eval_tokens,
        n_prompts=max(eval_prompts, 1),
    )
    d = res.to_dict() if hasattr(res, "to_dict") else dict(vars(res))
    d = {k: _as_py(v) for k, v in d.items()}
    d["source"] = "compare"
    return d


def _domain_texts(domains: Sequence[str] | Mapping[str, str], tok: Any) -> dict[str, str]:
    if isinstance(domains, Mapping):
        return dict(domains)
    from infopt.eval.domains import domain_text

    return {d: domain_text(d, tok) for d in domains}


def _evaluate_domains(cfg, compare_fn, ref, cand, tok, domains, eval_tokens):
    """Per-domain perplexity / KL / top-1 (no generation); a row's ``quality`` hook (KV cache
    rows) scores each domain instead of ``compare``, as it does the main text."""
    compare_fn = compare_fn or _default_compare
    keys = ("ppl_ref", "ppl_cand", "ppl_rel_increase", "kl_mean", "top1_agreement", "n_tokens")
    out = {}
    for name, dtext in _domain_texts(domains, tok).items():
        res = compare_fn(ref, cand, tok, texts=[dtext], prompts=[], max_tokens=eval_tokens,
                         n_prompts=1)
        d = res.to_dict() if hasattr(res, "to_dict") else dict(vars(res))
        if cfg.quality is not None:
            d.update(cfg.quality(ref, cand, tok, dtext, eval_tokens))
        out[name] = {k: _as_py(d.get(k)) for k in keys}
    return out


def _fill_baseline_domains(rows, baseline_model, tok, domains, eval_tokens, compare_fn):
    """The baseline's domain figures: the identity, its ppl from another row's ``ppl_ref``."""
    other = next((r.domains for r in rows[1:] if r.domains), None)
    if other is None:
        itself = BenchConfig(BASELINE, "the baseline compared with itself")
        rows[0].domains = _evaluate_domains(itself, compare_fn, baseline_model, baseline_model,
                                            tok, domains, eval_tokens)
        return
    rows[0].domains = {
        name: {"ppl_ref": d["ppl_ref"], "ppl_cand": d["ppl_ref"], "ppl_rel_increase": 0.0,
               "kl_mean": 0.0, "top1_agreement": 1.0, "n_tokens": d["n_tokens"]}
        for name, d in other.items()
    }


def _run_humaneval(fn, model, tok, n):
    """HumanEval on the first ``n`` problems as a dict; an error is recorded, not raised (a
    peer row that the batching engine cannot run keeps its other figures)."""
    if fn is None:
        from infopt.eval.humaneval import evaluate_humaneval as fn
    try:
        res = fn(model, tok, limit=n)
    except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
        return {"error": f"{type(e).__name__}: {e}"}
    return res.to_dict() if hasattr(res, "to_dict") else dict(res)


def apply_quality_gate(
    rows: Sequence[ConfigResult], max_ppl_increase: float | None, max_pass_drop: float | None
) -> None:
    """Set each non-baseline row's ``gate``: the budgets its quality figures exceed.

    Perplexity: the main text's and every domain's increase, in percent, against
    ``max_ppl_increase``; HumanEval: the baseline's pass@1 minus the row's, in percentage
    points, against ``max_pass_drop``. A row without figures passes (nothing measured).
    """
    base_pass = (rows[0].humaneval or {}).get("pass_at_1") if rows else None
    for r in rows[1:]:
        bad = []
        if max_ppl_increase is not None:
            incs = {"text": (r.eval or {}).get("ppl_rel_increase")}
            incs.update({d: v.get("ppl_rel_increase") for d, v in (r.domains or {}).items()})
            for where, inc in incs.items():
                if inc is not None and math.isfinite(inc) and 100 * inc > max_ppl_increase:
                    bad.append(f"ppl {where} {100 * inc:+.2f}% > {max_ppl_increase:g}%")
        row_pass = (r.humaneval or {}).get("pass_at_1")
        if max_pass_drop is not None and base_pass is not None and row_pass is not None:
            drop = 100 * (base_pass - row_pass)
            if drop > max_pass_drop:
                bad.append(f"pass@1 -{drop:.1f} pts > {max_pass_drop:g}")
        r.gate = {"passed": not bad, "violations": bad}


def _fill_baseline_eval(
    rows, baseline_model, tok, text, eval_tokens, eval_prompts, compare_fn, log
):
    """The baseline compared with itself is the identity: KL 0, agreement 1, Δppl 0.

    Its perplexity is taken from another row's ``ppl_ref`` (the same model, text and token
    budget); only when the baseline runs alone is ``compare`` called, to measure that ppl.
    """
    base = rows[0]
    # Prefer a row scored by compare alone: a row with a ``quality`` hook (KV cache) overwrote
    # ppl_ref with its own, chunked-through-the-cache perplexity of the baseline.
    scored = [r.eval for r in rows[1:] if r.eval]
    other = next((e for e in scored if e.get("source") == "compare"), scored[0] if scored else None)
    if other is None:
        log(f"{BASELINE}: quality vs itself ({eval_tokens} tokens)")
        base.eval = _evaluate(
            compare_fn, baseline_model, baseline_model, tok, text, eval_tokens, eval_prompts
        )
        return
    base.eval = {}
    for k, v in other.items():
        if k.startswith("kl_") or k == "ppl_rel_increase":
            v = 0.0
        elif k.endswith("_cand"):
            v = other[k.removesuffix("_cand") + "_ref"]
        elif v is not None and ("agreement" in k or k.endswith("_match")):
            v = 1.0
        base.eval[k] = v
    base.eval["source"] = "identity"


def _fill_ratios(rows: Sequence[ConfigResult]) -> None:
    """Ratios against the baseline row of the same run; > 1 means faster, < 1 smaller."""
    base = rows[0]
    for r in rows:
        r.ratios = {
            "decode_speedup": _div(r.decode_tok_s["median"], base.decode_tok_s["median"]),
            "ttft_speedup": _div(base.ttft_ms["median"], r.ttft_ms["median"]),
            "peak_mem": _div(r.peak_mem_delta_bytes, base.peak_mem_delta_bytes),
            "model_bytes": _div(r.model_bytes, base.model_bytes),
        }


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


# --- model helpers ----------------------------------------------------------------------------


def _default_loader(name: str, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    from infopt.models import load_model

    return load_model(name, dtype, device=device)


def _default_compare(*args: Any, **kwargs: Any) -> Any:
    from infopt.eval import compare

    return compare(*args, **kwargs)


def _apply(cfg: BenchConfig, model: Any) -> Any:
    if cfg.apply is not None:
        return cfg.apply(model)
    if cfg.wrap_options:
        from infopt import wrap_model

        return wrap_model(model, **cfg.wrap_options)
    return model  # no options: wrap_model would be an exact no-op, so the row is plain HF


def _spec_stats(model: Any) -> Any:
    """The SpecStats of ``model``'s last speculative generate, or None (not speculative)."""
    from ..options import technique_state

    return getattr(technique_state(model, "spec"), "last_stats", None)


def _sum_spec_stats(runs: list[Any]) -> dict[str, Any] | None:
    """Counters of the timed runs added up (rates are recomputed from the sums)."""
    runs = [r for r in runs if r is not None]
    if not runs:
        return None
    total = copy.deepcopy(runs[0])
    for r in runs[1:]:
        total.merge(r)
    return total.to_dict()


def _as_py(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


# --- environment ------------------------------------------------------------------------------


def _logger(enabled: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if enabled:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    return log
