"""``run_serve_bench``: serving throughput and latency on ShareGPT requests, rows side by side.

vLLM's ``benchmark_serving`` method, in one process: N ShareGPT requests
(:mod:`infopt.batching.workload`), greedy, EOS ignored and ``max_tokens`` = each request's
reference reply length, so every row generates exactly the same number of tokens. Offline mode
(``request_rate=inf``) submits all N at t=0; online mode gives them seeded Poisson arrival times
and drives the engine in-process (``add_request(arrival_time=...)`` as their times pass, then
``step()``), so TTFT includes queueing. Rows (each on its own freshly loaded model):

- ``hf-generate``: HF ``model.generate``, one request at a time, on the first ``hf_sample``
  requests only (it is slow); its rates are over that sample.
- ``hf-generate-batch``: HF's continuous batching (transformers 5.x). ``generate_batch`` takes
  one ``max_new_tokens`` for all requests, so the row drives the manager it wraps
  (``continuous_batching_context_manager`` + ``add_request(max_new_tokens=...)``) to give each
  request its own length; EOS disabled (``eos_token_id=-1``). The reference of the ratio column.
- ``engine`` / ``engine-int4-head8`` / ``engine-prefix``: :class:`infopt.batching.Engine` fp32,
  on a ``wrap_model(quant=Int4WeightOnlyConfig(lm_head="int8"))`` model, with prefix caching.

Both batched implementations get the same batch limits and KV capacity (``kv_budget_tokens``:
``max_num_seqs`` requests of the longest prompt + output; HF's default would take 90 % of free
RAM). Each row first serves one short warm-up request, untimed.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .runner import (
    DEFAULT_MODEL,
    _apply,
    _default_loader,
    _finite,
    _logger,
    _pad_token_id,
    _release_freed_memory,
    machine_info,
    versions,
)
from .serve_metrics import RequestRecord, percentile, poisson_arrivals, summarize_records
from .timing import PeakMemory, TimingStreamer, _eos_suppression, memory_in_use

__all__ = [
    "COLUMNS", "ROWS", "RequestRecord", "ServeResult", "ServeRow", "format_serve_report",
    "percentile", "poisson_arrivals", "run_serve_bench", "summarize_records",
]  # fmt: skip

# (name, description, bench config applied to the fp32 model, kind)
_ROW_SPECS: dict[str, tuple[str, str, str]] = {
    "hf-generate": ("HF model.generate, one request at a time (sample)", "baseline", "hf"),
    "hf-generate-batch": ("HF continuous batching (generate_batch's manager)", "baseline",
                          "hf-batch"),
    "engine": ("infopt Engine, fp32", "baseline", "engine"),
    "engine-int4-head8": ("infopt Engine, int4 RTN g128 + int8 lm_head", "int4-head8", "engine"),
    "engine-prefix": ("infopt Engine, fp32, prefix caching", "baseline", "engine"),
    "engine-spec": ("infopt Engine, fp32, prompt-lookup speculation", "baseline", "engine"),
    "engine-compile": ("infopt Engine, fp32, compiled decode steps", "baseline", "engine"),
    "engine-int4-head8-compile": ("infopt Engine, int4-head8, compiled decode steps",
                                  "int4-head8", "engine"),
}
ROWS = tuple(_ROW_SPECS)
#: rows of a run without ``rows=``: the opt-in ones (speculation, compilation) are left out
DEFAULT_ROWS = ("hf-generate", "hf-generate-batch", "engine", "engine-int4-head8",
                "engine-prefix")
#: EngineConfig fields of the engine rows (beyond the shared batch limits and pool size)
_ENGINE_OPTIONS: dict[str, dict[str, Any]] = {
    "engine-prefix": {"enable_prefix_caching": True},
    "engine-spec": {"speculative": "prompt-lookup"},
    "engine-compile": {"compile": True},
    "engine-int4-head8-compile": {"compile": True},
}
HF_ROWS = ("hf-generate", "hf-generate-batch")
REFERENCE_ROW = "hf-generate-batch"
DEFAULT_NUM_REQUESTS = 256
DEFAULT_MAX_OUTPUT_TOKENS = 128
DEFAULT_HF_SAMPLE = 16
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
ENGINE_BLOCK_SIZE = 16
_WARMUP_TOKENS = 4

Loader = Callable[[str, torch.dtype, str], tuple[Any, Any]]


# --- results ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ServeRow:
    """One row. ``metrics``: :func:`summarize_records`; memory in bytes; KV figures are the
    engine's (``None`` where a row cannot report them)."""

    name: str
    description: str
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    load_s: float = 0.0
    peak_mem_bytes: int = 0
    peak_mem_delta_bytes: int = 0
    mem_method: str = ""
    kv_blocks_peak: int | None = None
    kv_blocks_total: int | None = None  # blocks of ENGINE_BLOCK_SIZE tokens
    preemptions: int | None = None
    prefix_hit_rate: float | None = None
    same_tokens: float | None = None  # mean greedy prefix match vs the reference row
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None
    raw: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    records: list[RequestRecord] = dataclasses.field(default_factory=list, repr=False)


@dataclasses.dataclass
class ServeResult:
    """A whole ``bench-serve`` run."""

    model: str
    mode: str  # "offline" or "online"
    request_rate: float
    settings: dict[str, Any]
    machine: dict[str, Any]
    versions: dict[str, str]
    threads: int
    date: str
    rows: list[ServeRow]
    reference: str | None
    wall_s: float = 0.0

    def row(self, name: str) -> ServeRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for row in d["rows"]:
            row.pop("records")  # raw holds the per-request figures, without the token ids
        return d

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False) + "\n")
        return path

    def format_table(self) -> str:
        return format_serve_report(self)


# --- row drivers ------------------------------------------------------------------------------


def _run_hf_generate(model, tok, reqs, device) -> tuple[list[RequestRecord], float]:
    """Each request alone through ``model.generate``; its TTFT has no queueing by construction."""
    pad = _pad_token_id(tok)
    ids = [torch.tensor([r.prompt_token_ids], device=device) for r in reqs]

    def one(x: torch.Tensor, n: int) -> tuple[TimingStreamer, list[int]]:
        streamer = TimingStreamer(x, clock=time.perf_counter)
        streamer.begin()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False, pad_token_id=pad, streamer=streamer,
                             **_eos_suppression(model, n))
        return streamer, out[0, x.shape[-1]:].tolist()

    one(ids[0], _WARMUP_TOKENS)
    records = []
    t0 = time.perf_counter()
    for x, r in zip(ids, reqs):
        s, toks = one(x, r.output_len)
        first, last = s.chunks[0][0], s.chunks[-1][0]
        records.append(RequestRecord(r.prompt_len, len(toks), s.start - t0, first - t0,
                                     last - t0, tuple(toks)))
    return records, time.perf_counter() - t0


def _run_hf_batch(model, tok, reqs, kv_tokens, max_num_seqs, max_batched):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256  # HF's default page size (tokens per block)
    cb = ContinuousBatchingConfig(
        page_size=page, num_blocks=-(-kv_tokens // page), max_batch_tokens=max_batched,
        max_requests_per_batch=max_num_seqs,
    )  # fmt: skip
    gen = GenerationConfig(max_new_tokens=max(r.output_len for r in reqs), do_sample=False,
                           eos_token_id=-1, pad_token_id=_pad_token_id(tok))

    def collect(manager, want: set[str]) -> dict[str, Any]:
        got = {}
        while len(got) < len(want):
            res = manager.get_result(timeout=1)
            if res is not None and res.is_finished() and res.request_id in want:
                if res.error is not None:
                    raise RuntimeError(f"HF continuous batching: {res.request_id}: {res.error}")
                got[res.request_id] = res
            elif res is None and not manager.is_running():
                raise RuntimeError("HF continuous batching: generation thread stopped")
        return got

    with model.continuous_batching_context_manager(
        generation_config=gen, continuous_batching_config=cb, block=True, timeout=30
    ) as manager:
        # reversed: shares no prefix with the workload (HF shares blocks by default)
        manager.add_request(list(reversed(reqs[0].prompt_token_ids)), request_id="warmup",
                            max_new_tokens=_WARMUP_TOKENS, eos_token_id=-1)
        collect(manager, {"warmup"})
        t0 = time.perf_counter()
        for i, r in enumerate(reqs):
            manager.add_request(list(r.prompt_token_ids), request_id=f"r{i}",
                                max_new_tokens=r.output_len, record_timestamps=True,
                                eos_token_id=-1)
        got = collect(manager, {f"r{i}" for i in range(len(reqs))})
        wall = time.perf_counter() - t0
    records = []
    for i, r in enumerate(reqs):
        res = got[f"r{i}"]
        ts = res.timestamps or [math.nan]
        records.append(RequestRecord(r.prompt_len, len(res.generated_tokens), 0.0, ts[0] - t0,
                                     ts[-1] - t0, tuple(res.generated_tokens)))
    return records, wall


def engine_fields(row: str) -> dict[str, Any]:
    """The EngineConfig fields engine row ``row`` sets beyond the shared limits and pool size
    (option aliases parsed into configs)."""
    from infopt.api import parse_option

    opts = dict(_ENGINE_OPTIONS.get(row, {}))
    if "speculative" in opts:
        opts["speculative"] = parse_option("spec", opts["speculative"])
    if "compile" in opts:
        # Every batch bucket compiles when the engine is built: warm-up, not serving time.
        opts["compile"] = dataclasses.replace(parse_option("compile", opts["compile"]),
                                              warmup=True)
    return opts


def _run_engine(model, tok, reqs, arrivals, settings, opts):
    from infopt.batching import Engine, EngineConfig, SamplingParams

    engine = Engine(model, tok, EngineConfig(
        max_num_seqs=settings["max_num_seqs"],
        max_num_batched_tokens=settings["max_num_batched_tokens"], block_size=ENGINE_BLOCK_SIZE,
        num_blocks=-(-settings["kv_budget_tokens"] // ENGINE_BLOCK_SIZE), **opts,
    ))  # fmt: skip
    warm = list(reversed(reqs[0].prompt_token_ids))  # shares no prefix block with the workload
    engine.generate([warm], SamplingParams(max_tokens=_WARMUP_TOKENS, temperature=0.0,
                                           ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
              for r in reqs]
    done: dict[str, Any] = {}
    t0 = time.monotonic()
    i = 0
    while len(done) < len(reqs):
        now = time.monotonic()
        while i < len(reqs) and t0 + arrivals[i] <= now:
            # The scheduled time, not now: a step that ran past it counts as queueing.
            engine.add_request(list(reqs[i].prompt_token_ids), params[i], request_id=f"r{i}",
                               arrival_time=t0 + arrivals[i])
            i += 1
        if engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    if out.error:
                        raise RuntimeError(f"engine: request {out.request_id}: {out.error}")
                    done[out.request_id] = out
        elif i < len(reqs):
            time.sleep(max(0.0, t0 + arrivals[i] - time.monotonic()))
    records = []
    for k, r in enumerate(reqs):
        m = done[f"r{k}"].metrics
        records.append(RequestRecord(
            r.prompt_len, m.num_generated, m.arrival_time - t0, m.first_token_time - t0,
            m.last_token_time - t0, tuple(done[f"r{k}"].token_ids),
            num_cached_tokens=getattr(m, "num_cached_tokens", 0),
            num_preemptions=m.num_preemptions,
        ))  # fmt: skip
    wall = max(rec.finished for rec in records)
    return records, wall, engine.stats()


# --- the run ----------------------------------------------------------------------------------


def run_serve_bench(
    model: str = DEFAULT_MODEL,
    rows: Sequence[str] | None = None,
    *,
    num_requests: int = DEFAULT_NUM_REQUESTS,
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
    request_rate: float = math.inf,
    hf_sample: int = DEFAULT_HF_SAMPLE,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
    loader: Loader | None = None,
    requests: Sequence[Any] | None = None,
    conversations: Sequence[dict[str, Any]] | None = None,
) -> ServeResult:
    """Serve the same ShareGPT requests with every row of ``rows`` (default: all that apply).

    Args:
        rows: names from :data:`ROWS`; HF rows run offline only (``request_rate=inf``) and are
            left out of the default online run.
        num_requests / max_output_tokens / seed: the workload
            (:func:`infopt.batching.workload.sample_requests`; ``seed`` also seeds arrivals).
        request_rate: requests/s of the Poisson arrivals; ``inf`` = offline.
        hf_sample: requests given to ``hf-generate`` (the first ones).
        max_num_seqs / max_num_batched_tokens: batch limits of both batched implementations.
        loader / requests / conversations: test injection points (default
            ``infopt.models.load_model``, sampled from ``conversations`` or the cached dataset).

    Rows that fail keep their error in ``ServeRow.error``; the others are still measured.
    """
    online = not math.isinf(request_rate)
    names = list(rows) if rows is not None else [
        n for n in DEFAULT_ROWS if not (online and n in HF_ROWS)
    ]
    unknown = [n for n in names if n not in _ROW_SPECS]
    if unknown or not names:
        raise ValueError(f"unknown row(s) {unknown or 'none given'}; accepted: {', '.join(ROWS)}")
    if online and (hf := [n for n in names if n in HF_ROWS]):
        raise ValueError(f"rows {hf} run offline only; drop them or use request_rate=inf")
    for arg, v in (("num_requests", num_requests), ("max_output_tokens", max_output_tokens),
                   ("hf_sample", hf_sample), ("max_num_seqs", max_num_seqs),
                   ("max_num_batched_tokens", max_num_batched_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {v!r}")
    arrivals = poisson_arrivals(num_requests, request_rate, seed)
    dev = torch.device(device)
    loader = loader or _default_loader
    log = _logger(progress)
    machine = machine_info(dev)
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    reqs = list(requests) if requests is not None else None
    out_rows: list[ServeRow] = []
    settings: dict[str, Any] = {}
    try:
        for name in names:
            desc, cfg_name, kind = _ROW_SPECS[name]
            row = ServeRow(name, desc)
            out_rows.append(row)
            gc.collect()
            _release_freed_memory(dev)
            mem_before = memory_in_use(dev)
            log(f"{name}: loading {model}")
            t0 = time.perf_counter()
            m, tok = loader(model, torch.float32, str(dev))
            if reqs is None:
                reqs = _sample(tok, num_requests, seed, max_output_tokens, conversations, log)
            if len(reqs) != num_requests:
                raise ValueError(f"{len(reqs)} requests given, num_requests={num_requests}")
            if not settings:
                settings = _settings(reqs, num_requests, max_output_tokens, request_rate, seed,
                                     hf_sample, max_num_seqs, max_num_batched_tokens, tok)
            try:
                from .configs import get_bench_config

                m = _apply(get_bench_config(cfg_name), m).eval()
                row.load_s = time.perf_counter() - t0
                sub = reqs[:hf_sample] if kind == "hf" else reqs
                log(f"{name}: serving {len(sub)} requests" + (
                    f" at {request_rate:g} req/s" if online else " (offline)"))
                with PeakMemory(dev) as peak:
                    stats = None
                    if kind == "hf":
                        records, wall = _run_hf_generate(m, tok, sub, dev)
                    elif kind == "hf-batch":
                        records, wall = _run_hf_batch(m, tok, sub, settings["kv_budget_tokens"],
                                                      max_num_seqs, max_num_batched_tokens)
                    else:
                        records, wall, stats = _run_engine(m, tok, sub, arrivals, settings,
                                                           engine_fields(name))
                _fill_row(row, records, wall, stats, peak, mem_before)
                log(f"{name}: {row.metrics['output_tok_s']:.1f} output tok/s, TTFT p50 "
                    f"{row.metrics['ttft_ms']['p50']:.0f} ms, wall {wall:.1f} s")
            except Exception as e:  # noqa: BLE001 - keep the other rows' numbers; CLI exits 1
                row.error = f"{type(e).__name__}: {e}"
                log(f"{name}: FAILED: {row.error}")
            finally:
                del m
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev_threads)
    reference = _fill_ratios(out_rows)
    return ServeResult(
        model=model, mode="online" if online else "offline", request_rate=request_rate,
        settings=settings, machine=machine, versions=versions(), threads=used_threads,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        rows=out_rows, reference=reference, wall_s=time.perf_counter() - t_start,
    )  # fmt: skip


def _sample(tok, n, seed, max_output_tokens, conversations, log):
    from infopt.batching.workload import has_chat_template, load_sharegpt, sample_requests

    if conversations is None:
        conversations = load_sharegpt(progress=True)
    log(f"sampling {n} ShareGPT requests (seed {seed}, chat template: "
        f"{'yes' if has_chat_template(tok) else 'no, raw text'})")
    return sample_requests(tok, n, seed=seed, max_output_tokens=max_output_tokens,
                           conversations=conversations)


def _settings(reqs, n, max_out, rate, seed, hf_sample, max_num_seqs, max_batched, tok):
    from infopt.batching.workload import has_chat_template

    longest = max(r.prompt_len + r.output_len for r in reqs)
    return {
        "num_requests": n, "max_output_tokens": max_out,
        "request_rate": None if math.isinf(rate) else rate, "seed": seed, "hf_sample": hf_sample,
        "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_batched,
        # the KV capacity every batched row gets: max_num_seqs of the longest request
        "kv_budget_tokens": min(max_num_seqs, len(reqs)) * longest,
        "prompt_tokens": sum(r.prompt_len for r in reqs),
        "output_tokens": sum(r.output_len for r in reqs),
        "chat_template": has_chat_template(tok), "decoding": "greedy, ignore_eos",
        "warmup": f"1 request of {_WARMUP_TOKENS} tokens per row, untimed",
    }  # fmt: skip


_RAW_FIELDS: dict[str, Callable[[RequestRecord], Any]] = {
    "prompt_len": lambda r: r.prompt_len, "num_generated": lambda r: r.num_generated,
    "arrival_s": lambda r: r.arrival, "ttft_s": lambda r: r.ttft, "tpot_s": lambda r: r.tpot,
    "e2e_s": lambda r: r.finished - r.arrival,
}  # fmt: skip


def _fill_row(row, records, wall, stats, peak, mem_before) -> None:
    row.records = records
    row.metrics = summarize_records(records, wall)
    row.peak_mem_bytes = peak.peak_bytes
    row.peak_mem_delta_bytes = peak.peak_bytes - mem_before
    row.mem_method = peak.method
    row.raw = {key: [get(r) for r in records] for key, get in _RAW_FIELDS.items()}
    if stats is not None:
        row.kv_blocks_peak, row.kv_blocks_total = stats.peak_blocks_used, stats.num_blocks
        row.preemptions = sum(r.num_preemptions for r in records)
        prompt = sum(r.prompt_len for r in records)
        row.prefix_hit_rate = sum(r.num_cached_tokens for r in records) / prompt if prompt else 0.0


def _prefix_match(a: Sequence[int], b: Sequence[int]) -> float:
    n = max(len(a), len(b))
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return k / n if n else 1.0


def _fill_ratios(rows: list[ServeRow]) -> str | None:
    """Output tok/s ratios and greedy agreement vs ``hf-generate-batch`` (else the first row
    that ran); returns the reference's name."""
    ok = [r for r in rows if r.error is None and r.metrics]
    ref = next((r for r in ok if r.name == REFERENCE_ROW), ok[0] if ok else None)
    if ref is None:
        return None
    ref_rate = ref.metrics["output_tok_s"]
    for r in ok:
        r.ratios = {"output_tok_s": r.metrics["output_tok_s"] / ref_rate if ref_rate > 0
                    else math.nan}
        pairs = list(zip(r.records, ref.records))  # hf-generate ran a prefix of the requests
        r.same_tokens = sum(_prefix_match(a.token_ids, b.token_ids) for a, b in pairs) / len(
            pairs) if pairs else None
    return ref.name


# --- report -----------------------------------------------------------------------------------


def _f(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def _latency(key: str, q: str, fmt: str) -> tuple[str, Callable[[ServeRow], str]]:
    return f"{key.upper()} {q} ms", lambda r: _f(r.metrics[f"{key}_ms"][q], fmt)


_COLUMNS: list[tuple[str, Callable[[ServeRow], str]]] = [
    ("row", lambda r: r.name),
    ("reqs", lambda r: str(r.metrics["num_requests"])),
    ("out tok", lambda r: str(r.metrics["output_tokens"])),
    ("output tok/s (x ref)", lambda r: f"{_f(r.metrics['output_tok_s'], '.1f')} "
                                       f"({_f(r.ratios.get('output_tok_s'), '.2f')}x)"),
    ("total tok/s", lambda r: _f(r.metrics["total_tok_s"], ".1f")),
    ("req/s", lambda r: _f(r.metrics["requests_s"], ".3f")),
    *(_latency(key, q, fmt) for key, fmt in (("ttft", ".0f"), ("tpot", ".1f"))
      for q in ("p50", "p99", "mean")),
    ("peak MB", lambda r: _f(r.peak_mem_bytes / 1e6, ".0f")),
    ("KV blocks peak/total", lambda r: "-" if r.kv_blocks_total is None
        else f"{r.kv_blocks_peak}/{r.kv_blocks_total}"),  # fmt: skip
    ("preempt", lambda r: _f(r.preemptions, "d")),
    ("prefix hit", lambda r: _f(r.prefix_hit_rate, ".3f")),
    ("same tokens", lambda r: _f(r.same_tokens, ".3f")),
    ("wall s", lambda r: _f(r.metrics["duration_s"], ".1f")),
]
COLUMNS = tuple(h for h, _ in _COLUMNS)


def format_table(rows: Sequence[ServeRow]) -> str:
    """A markdown table, one line per row (a failed row shows its error)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(
        ":---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"]
    for r in rows:
        if r.error is not None or not r.metrics:
            cells = [r.name, f"error: {r.error}"] + [""] * (len(COLUMNS) - 2)
        else:
            cells = [f(r) for _, f in _COLUMNS]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def format_serve_report(res: ServeResult) -> str:
    """Header, table and notes, as printed by ``infopt bench-serve``."""
    m, v, s = res.machine, res.versions, res.settings
    mode = (f"online, Poisson arrivals at {res.request_rate:g} req/s (seed {s.get('seed')})"
            if res.mode == "online" else "offline (all requests at t=0)")
    ref = res.reference or "-"
    head = [
        f"## infopt bench-serve: {res.model}, {s.get('num_requests')} ShareGPT requests, {mode}",
        "",
        f"- date: {res.date}; machine: {m.get('cpu')}, {m.get('logical_cores')} logical cores"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; threads {res.threads}"
        + (f"; load avg {m['loadavg_1m_at_start']} at start"
           if m.get("loadavg_1m_at_start") is not None else ""),
        f"- torch {v['torch']}, transformers {v['transformers']}, infopt {v['infopt']}",
        f"- workload: {s.get('prompt_tokens')} prompt + {s.get('output_tokens')} output tokens, "
        f"output capped at {s.get('max_output_tokens')}, prompts "
        f"{'through the chat template' if s.get('chat_template') else 'raw text (no template)'}"
        f"; greedy, EOS ignored; wall {res.wall_s:.0f} s",
        f"- batched rows: max_num_seqs {s.get('max_num_seqs')}, max_num_batched_tokens "
        f"{s.get('max_num_batched_tokens')}, KV capacity {s.get('kv_budget_tokens')} tokens",
        "",
    ]
    names = {r.name for r in res.rows}
    notes = [
        "",
        f"(x ref) and same tokens: vs {ref} in this run (same tokens: mean greedy prefix "
        "match of the outputs). TTFT: arrival -> first token; TPOT: (last - first token) / "
        "(tokens - 1); rates: totals / wall (first arrival -> last token).",
        f"peak MB: peak during serving ({res.rows[0].mem_method if res.rows else '?'}), model "
        f"included. KV blocks: engine blocks of {ENGINE_BLOCK_SIZE} tokens.",
    ]
    if "hf-generate" in names:
        notes.append(f"hf-generate: the first {s.get('hf_sample')} requests one at a time; its "
                     "rates are over that sample.")
    if "hf-generate-batch" in names:
        notes.append("hf-generate-batch: the manager behind generate_batch, each request with "
                     "its own max_new_tokens; HF's block sharing left on (its default).")
    return "\n".join(head + [format_table(res.rows)] + notes)
