"""The ``infopt`` command line (also ``python -m infopt``).

    infopt bench [--model NAME] [--configs int8,int4] [--json PATH] [--plot PNG] ...  # + baseline
    infopt bench-serve [--num-requests N] [--request-rate R] [--rows engine,...] [--json PATH] ...
    infopt serve --model NAME [--port 8000] [--api-key KEY] ...   # OpenAI-compatible server
    infopt distill --teacher NAME --student NAME [--student-quant int4] --out DIR
    infopt eval humaneval --model NAME [--quant Q] [--limit N] [--json PATH]   # pass@1
    infopt eval domains --model NAME --quant Q[,Q]   # per-domain ppl / KL / top-1 vs fp32
    infopt models        # the model registry, and which models are cached locally
    infopt ops           # kernel backends available / in use
    infopt --version

Bad arguments are argparse errors (exit 2, naming the accepted values). Expected failures
inside the library (a model that cannot be loaded, no CUDA, ...) print one line and a hint and
exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .bench import runner as _runner

# Failures the library raises on purpose (bad input, missing files, unavailable backends);
# anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, RuntimeError, OSError, ImportError, NotImplementedError)


def _version() -> str:
    import torch
    import transformers

    import infopt

    return (
        f"infopt {getattr(infopt, '__version__', 'unknown')} "
        f"(torch {torch.__version__}, transformers {transformers.__version__})"
    )


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"  # what argparse prints for a failed conversion
    return parse


def _config_list(s: str) -> list[str]:
    from .bench import list_bench_configs

    names = [n.strip() for n in s.split(",") if n.strip()]
    accepted = list_bench_configs()
    # "a+b": a compound of registered rows (get_bench_config builds it)
    unknown = [n for n in names if not all(p in accepted for p in n.split("+"))]
    if not names or unknown:
        bad = ", ".join(repr(n) for n in unknown) or "none given"
        raise argparse.ArgumentTypeError(
            f"unknown config(s) {bad}; accepted: {', '.join(accepted)}, or compounds of them "
            "joined by '+' (comma-separated)"
        )
    return names


def _domain_list(s: str) -> list[str]:
    from .eval.domains import DOMAINS

    if s.strip().lower() == "none":
        return []
    names = [n.strip() for n in s.split(",") if n.strip()]
    unknown = [n for n in names if n not in DOMAINS]
    if not names or unknown:
        bad = ", ".join(repr(n) for n in unknown) or "none given"
        raise argparse.ArgumentTypeError(
            f"unknown domain(s) {bad}; accepted: {', '.join(DOMAINS)} or 'none'"
        )
    return names


def _budget(s: str) -> float | None:
    if s.strip().lower() == "none":
        return None
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'none', got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'none', got {s}")
    return v


def _row_list(s: str) -> list[str]:
    from .bench.serve import ROWS

    names = [n.strip() for n in s.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if not names or unknown:
        bad = ", ".join(repr(n) for n in unknown) or "none given"
        raise argparse.ArgumentTypeError(
            f"unknown row(s) {bad}; accepted: {', '.join(ROWS)} (comma-separated)"
        )
    return names


def _request_rate(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of requests/s or 'inf', got {s!r}"
        ) from None
    if not v > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0 requests/s or 'inf' (offline), got {s}")
    return v


_request_rate.__name__ = "request rate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infopt", description="LLM inference-optimization primitives: benchmarks and tools."
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from .bench import get_bench_config, list_bench_configs

    epilog = "configs:\n" + "\n".join(
        f"  {n:<14} {get_bench_config(n).description}" for n in list_bench_configs()
    )
    b = sub.add_parser(
        "bench",
        help="benchmark configs of a model against the fp32 baseline (batch 1, greedy)",
        description="Measure TTFT, decode tokens/s, memory and quality of each config against "
        "the fp32 HF baseline, all in one process. See docs/bench.md.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--model", default=_runner.DEFAULT_MODEL, help="registry name or path")
    b.add_argument(
        "--configs",
        type=_config_list,
        default=list(_runner.DEFAULT_CONFIGS),
        help="comma-separated config names; baseline is always included "
        f"(default: {','.join(_runner.DEFAULT_CONFIGS)})",
    )
    b.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    b.add_argument(
        "--plot", metavar="PATH",
        help="also write a speed-versus-quality PNG to PATH (needs matplotlib)",
    )  # fmt: skip
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument(
        "--prompt",
        choices=_runner.PROMPT_SETS,
        default=_runner.DEFAULT_PROMPT,
        help="text: --prompt-tokens of the eval text; code: code-completion prompts; grounded: "
        "code edits that copy the prompt (prompt lookup's case). Timed run j uses prompt "
        f"j %% n (default: {_runner.DEFAULT_PROMPT})",
    )
    arg_int = [
        ("--prompt-tokens", 1, _runner.DEFAULT_PROMPT_TOKENS, "prompt length in tokens"),
        ("--new-tokens", 2, _runner.DEFAULT_NEW_TOKENS, "tokens generated per timed run"),
        ("--repeats", 1, _runner.DEFAULT_REPEATS, "timed runs per config (median reported)"),
        ("--warmup", 0, _runner.DEFAULT_WARMUP, "untimed runs per config before timing"),
        ("--eval-tokens", 0, _runner.DEFAULT_EVAL_TOKENS, "text tokens for ppl/KL; 0 skips eval"),
        ("--eval-prompts", 0, _runner.DEFAULT_EVAL_PROMPTS, "prompts for greedy agreement"),
    ]
    for flag, lo, default, text in arg_int:
        b.add_argument(
            flag, type=_int_at_least(lo), default=default, metavar="N", help=f"{text} ({default})"
        )
    b.add_argument(
        "--threads", type=_int_at_least(1), metavar="N", help="torch threads (default: torch's)"
    )
    b.add_argument(
        "--domains", type=_domain_list, default=None, metavar="D[,D]",
        help="evaluation domains scored for every row (prose,code,chat; 'none' skips them; "
        "default: all)",
    )  # fmt: skip
    b.add_argument(
        "--humaneval", type=_int_at_least(0), default=0, metavar="N",
        help="add a HumanEval pass@1 column on the first N problems (164 = all; 0 = off)",
    )  # fmt: skip
    b.add_argument(
        "--max-ppl-increase", type=_budget, default=_runner.DEFAULT_MAX_PPL_INCREASE,
        metavar="PCT", help="quality gate: flag rows whose perplexity increase on any text "
        f"exceeds PCT percent ('none' disables; default {_runner.DEFAULT_MAX_PPL_INCREASE})",
    )  # fmt: skip
    b.add_argument(
        "--max-pass-drop", type=_budget, default=_runner.DEFAULT_MAX_PASS_DROP, metavar="PTS",
        help="quality gate: flag rows whose HumanEval pass@1 is more than PTS points below "
        f"the baseline's ('none' disables; default {_runner.DEFAULT_MAX_PASS_DROP})",
    )  # fmt: skip
    b.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    b.set_defaults(func=_cmd_bench)
    _add_bench_serve_parser(sub)
    _add_tune_batch_parser(sub)
    from .distill.cli import add_arguments as _add_distill_args

    _add_distill_args(sub, _int_at_least)
    from .eval.cli import add_arguments as _add_eval_args

    _add_eval_args(sub, _int_at_least)

    from .serve.cli import add_arguments as _add_serve_args

    sv = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server on the batching engine",
        description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /metrics) on FastAPI + uvicorn. See docs/serve.md.",
    )  # fmt: skip
    _add_serve_args(sv)
    sv.set_defaults(func=_cmd_serve)

    sub.add_parser("models", help="list the model registry").set_defaults(func=_cmd_models)
    o = sub.add_parser("ops", help="kernel backend report")
    o.add_argument(
        "--require", metavar="B[,B]", default="",
        help="exit 1 if any op that implements one of these backends (cpp, triton, cuda) "
        "cannot run it here, e.g. an installed wheel whose C++ kernels do not build",
    )  # fmt: skip
    o.set_defaults(func=_cmd_ops)
    return parser


def _add_bench_serve_parser(sub: Any) -> None:
    from .bench import serve

    s = sub.add_parser(
        "bench-serve",
        help="serving benchmark on ShareGPT requests (HF generate, HF continuous batching, "
        "the infopt engine)",
        description="Serve the same ShareGPT requests (greedy, EOS ignored, each request's "
        "reference length) with every row, offline or with Poisson arrivals, and report "
        "throughput, TTFT/TPOT percentiles, peak memory and KV use. See docs/bench.md.",
        epilog="rows:\n" + "\n".join(
            f"  {n:<18} {serve._ROW_SPECS[n][0]}" for n in serve.ROWS
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--model", default=_runner.DEFAULT_MODEL, help="registry name or path")
    s.add_argument(
        "--rows", type=_row_list, default=None,
        help="comma-separated rows (default: all; online mode: the engine rows)",
    )  # fmt: skip
    s.add_argument(
        "--request-rate", type=_request_rate, default=float("inf"), metavar="R",
        help="Poisson arrivals at R requests/s (seeded); inf = offline, all at t=0 (default)",
    )  # fmt: skip
    for flag, lo, default, text in [
        ("--num-requests", 1, serve.DEFAULT_NUM_REQUESTS, "ShareGPT requests"),
        ("--max-output-tokens", 1, serve.DEFAULT_MAX_OUTPUT_TOKENS, "cap on each output"),
        ("--hf-sample", 1, serve.DEFAULT_HF_SAMPLE, "requests run by hf-generate"),
        ("--max-num-seqs", 1, serve.DEFAULT_MAX_NUM_SEQS, "requests in a batch at most"),
        ("--max-num-batched-tokens", 1, serve.DEFAULT_MAX_NUM_BATCHED_TOKENS,
         "tokens per step at most"),
        ("--seed", 0, 0, "workload shuffle and arrival seed"),
    ]:  # fmt: skip
        s.add_argument(
            flag, type=_int_at_least(lo), default=default, metavar="N", help=f"{text} ({default})"
        )
    s.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    s.add_argument(
        "--threads", type=_int_at_least(1), metavar="N", help="torch threads (default: torch's)"
    )
    s.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    s.add_argument(
        "--url", metavar="URL",
        help="also run the workload against a live server (e.g. http://127.0.0.1:8000 from "
        "`infopt serve`); default rows are then just `engine`, the in-process reference",
    )  # fmt: skip
    s.add_argument("--api-key", metavar="KEY", help="bearer key for --url")
    s.set_defaults(func=_cmd_bench_serve)


def _cmd_bench_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import math

    import torch

    from .bench import serve

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' given but no CUDA device is available")
    hf = [n for n in (args.rows or []) if n in serve.HF_ROWS]
    if hf and not math.isinf(args.request_rate):
        parser.error(f"argument --rows: {', '.join(hf)} run offline only; drop them or leave "
                     "--request-rate at inf")
    reqs = None
    rows = args.rows
    if args.url:
        if not args.url.startswith(("http://", "https://")):
            parser.error(f"argument --url: expected http://HOST:PORT, got {args.url!r}")
        import infopt
        from infopt.batching.workload import sample_requests

        _, tok = infopt.load_model(args.model, dtype=torch.float32)
        reqs = sample_requests(tok, args.num_requests, seed=args.seed,
                               max_output_tokens=args.max_output_tokens)
        rows = rows or ["engine"]
    extra = {"requests": reqs} if reqs is not None else {}
    res = serve.run_serve_bench(
        args.model,
        rows,
        **extra,
        num_requests=args.num_requests,
        max_output_tokens=args.max_output_tokens,
        request_rate=args.request_rate,
        hf_sample=args.hf_sample,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        progress=not args.quiet,
    )
    if args.url:
        from .bench.serve_client import run_url_bench

        arrivals = serve.poisson_arrivals(args.num_requests, args.request_rate, args.seed)
        try:
            row = run_url_bench(args.url, reqs, arrivals, api_key=args.api_key)
        except Exception as e:  # noqa: BLE001 - reported like a failed row
            row = serve.ServeRow("server", f"infopt serve at {args.url}")
            row.error = f"{type(e).__name__}: {e}"
        res.rows.append(row)
        base = next((r for r in res.rows if r.name == "engine" and r.error is None), None)
        if base is not None and row.error is None:
            ratio = row.metrics["output_tok_s"] / base.metrics["output_tok_s"]
            row.ratios = {"output_tok_s": ratio}
            itl = row.metrics["itl_ms"]
            print(f"server vs in-process engine: {ratio:.3f}x output tok/s "
                  f"({100 * (1 - ratio):.1f} % lost); inter-chunk latency p50 "
                  f"{itl.get('p50', math.nan):.1f} ms, p99 {itl.get('p99', math.nan):.1f} ms")
    print(res.format_table())
    if args.json:
        path = res.write_json(args.json)
        print(f"wrote {path}", file=sys.stderr)
    failed = [r for r in res.rows if r.error is not None]
    for r in failed:
        print(f"infopt bench-serve: error: row {r.name} failed: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' given but no CUDA device is available")
    if args.plot:
        from .bench.plot import plot_available

        if (missing := plot_available()) is not None:  # before the run, not after it
            parser.error(f"argument --plot: {missing}")
    res = _runner.run_bench(
        args.model,
        args.configs,
        device=args.device,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        prompt=args.prompt,
        repeats=args.repeats,
        warmup=args.warmup,
        eval_tokens=args.eval_tokens,
        eval_prompts=args.eval_prompts,
        threads=args.threads,
        progress=not args.quiet,
        domains=args.domains,
        humaneval=args.humaneval,
        max_ppl_increase=args.max_ppl_increase,
        max_pass_drop=args.max_pass_drop,
    )
    print(res.format_table())
    if args.json:
        path = res.write_json(args.json)
        print(f"wrote {path}", file=sys.stderr)
    if args.plot:
        from .bench.plot import plot_speed_quality

        print(f"wrote {plot_speed_quality(res, args.plot)}", file=sys.stderr)
    return 0


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {s!r}")
    return vals


def _seconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {s}")
    return v


def _add_tune_batch_parser(sub: Any) -> None:
    t = sub.add_parser(
        "tune-batch",
        help="sweep max_num_seqs x max_num_batched_tokens on a ShareGPT sample and pick one",
        description="Run a ShareGPT sample offline through the engine for every grid point; "
        "print the throughput / latency table, the frontier and the fastest setting within "
        "--tpot-bound / --ttft-bound. See docs/batching.md.",
    )
    t.add_argument("--model", default=_runner.DEFAULT_MODEL, help="registry name or path")
    t.add_argument("--quant", default=None, help="a wrap_model(quant=...) alias, e.g. int8")
    t.add_argument("--num-requests", type=_int_at_least(1), default=64, metavar="N")
    t.add_argument("--max-output-tokens", type=_int_at_least(1), default=128, metavar="N")
    t.add_argument("--max-num-seqs", type=_int_list, default=[8, 16, 32, 64], metavar="N,N")
    t.add_argument("--max-num-batched-tokens", type=_int_list, default=[256, 512, 1024],
                   metavar="N,N")
    t.add_argument("--tpot-bound", type=_seconds, metavar="S", help="p99 TPOT bound (seconds)")
    t.add_argument("--ttft-bound", type=_seconds, metavar="S", help="p99 TTFT bound (seconds)")
    t.add_argument("--seed", type=_int_at_least(0), default=0, metavar="N")
    t.add_argument("--threads", type=_int_at_least(1), metavar="N", help="torch threads")
    t.set_defaults(func=_cmd_tune_batch)


def _cmd_tune_batch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    import infopt
    from infopt.batching.tune import tune_batch
    from infopt.batching.workload import sample_requests

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = infopt.load_model(args.model, dtype=torch.float32)
    if args.quant:
        model = infopt.wrap_model(model, quant=args.quant)
    reqs = sample_requests(tok, args.num_requests, seed=args.seed,
                           max_output_tokens=args.max_output_tokens)
    res = tune_batch(
        model, tok, [r.prompt_token_ids for r in reqs], [r.output_len for r in reqs],
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        tpot_bound_s=args.tpot_bound, ttft_bound_s=args.ttft_bound,
    )  # fmt: skip
    print(f"model {args.model}, quant {args.quant or 'none'}, {len(reqs)} ShareGPT requests, "
          f"{torch.get_num_threads()} threads")
    print(res.format())
    return 0 if res.pick is not None else 1


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .serve.cli import run

    return run(args, parser)


def _cmd_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .models import get_spec, list_models, model_dir, resolve_cache_dir
    from .models.disk_cache import check_model_dir

    names = list_models()
    width = max(len(n) for n in names)
    print(f"cache: {resolve_cache_dir()}")
    print(f"{'name':<{width}}  cached  description")
    for name in names:
        spec = get_spec(name)
        # the cheap check load_model itself does (manifest + weight size), no hashing
        cached = check_model_dir(model_dir(name), name, spec.gguf_sha256) is None
        print(f"{name:<{width}}  {'yes' if cached else 'no':<6}  {spec.description}")
    return 0


def _cmd_ops(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import ops
    from .ops.registry import Backend

    wanted = [b.strip() for b in args.require.split(",") if b.strip()]
    kernels = [b.value for b in Backend if b.value not in ("auto", "reference")]
    bad = [b for b in wanted if b not in kernels]
    if bad:
        parser.error(f"argument --require: unknown backend(s) {bad}; accepted: {kernels}")
    print(ops.format_backend_report())
    missing = []
    for op, info in ops.backend_report().items():
        for b in wanted:
            reason = info["unavailable"].get(b)
            if reason is not None:
                missing.append(f"{op}: {b}: {reason}")
    for line in missing:
        print(f"infopt ops: required backend missing: {line}", file=sys.stderr)
    return 1 if missing else 0


def _hint(command: str | None, err: BaseException) -> str:
    if isinstance(err, ImportError):
        return "a module or optional dependency is missing; check the installation"
    if command in ("bench", "bench-serve"):
        return f"`infopt models` lists the models, `infopt {command} --help` the options"
    return "rerun with --debug for the traceback"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infopt`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, parser)
    except KeyboardInterrupt:
        print("infopt: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"infopt {args.command}: error: {msg}", file=sys.stderr)
        print(f"hint: {_hint(args.command, e)}; --debug shows the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
