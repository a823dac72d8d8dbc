"""The ``infopt`` command line (also ``python -m infopt``).

    infopt bench [--model NAME] [--configs baseline,bf16] [--json PATH] [--device cpu|cuda] ...
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
    unknown = [n for n in names if n not in accepted]
    if not names or unknown:
        bad = ", ".join(repr(n) for n in unknown) or "none given"
        raise argparse.ArgumentTypeError(
            f"unknown config(s) {bad}; accepted: {', '.join(accepted)} (comma-separated)"
        )
    return names


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
    b.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    b.set_defaults(func=_cmd_bench)

    sub.add_parser("models", help="list the model registry").set_defaults(func=_cmd_models)
    sub.add_parser("ops", help="kernel backend report").set_defaults(func=_cmd_ops)
    return parser


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' given but no CUDA device is available")
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
    )
    print(res.format_table())
    if args.json:
        path = res.write_json(args.json)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .models import get_spec, list_models, model_dir, resolve_cache_dir
    from .models.cache import check_model_dir

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

    print(ops.format_backend_report())
    return 0


def _hint(command: str | None, err: BaseException) -> str:
    if isinstance(err, ImportError):
        return "a module or optional dependency is missing; check the installation"
    if command == "bench":
        return "`infopt models` lists the models, `infopt bench --help` the options"
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
