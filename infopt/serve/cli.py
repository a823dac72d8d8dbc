"""Arguments of ``infopt serve`` (shared by ``python -m infopt.serve``).

Imports nothing heavy at module level: ``infopt --help`` builds this parser too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["add_arguments", "config_from_args", "main", "run"]

_KV_REFUSED = (
    "argument --kv: eviction policies (streaming, h2o) do not run in the batching engine; it "
    "takes paged, paged-prefix, paged-int8, paged-fp8 (or --kv-cache-dtype and "
    "--enable-prefix-caching)"
)
_SPEC_REFUSED = (
    "argument --spec: the batching engine runs prompt lookup (--spec prompt-lookup); draft-model "
    "and layer-skip drafting need a draft KV cache it does not have yet"
)


def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def _seconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {s!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {s}")
    return v


_seconds.__name__ = "seconds"


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {s!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535] (0: any free port), got {v}")
    return v


_port.__name__ = "port"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``p``."""
    from ..batching.params import KV_CACHE_DTYPES
    from .config import DTYPES, LOG_LEVELS

    p.add_argument("--model", required=True, help="registry name (`infopt models`), local HF "
                   "directory or org/name hub id")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the name clients send as 'model' (default: --model as given)")
    p.add_argument("--quant", metavar="Q", help="wrap_model(quant=Q) before the engine is "
                   "built (see infopt.accepted_options())")
    p.add_argument("--kv", metavar="KV", help="a wrap_model(kv=...) alias for the engine's pool: "
                   "paged, paged-prefix (= --enable-prefix-caching), paged-int8, paged-fp8 "
                   "(= --kv-cache-dtype)")
    p.add_argument("--spec", metavar="SPEC",
                   help="speculative decoding inside the engine: prompt-lookup (n-gram drafts)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (float32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=_port, default=8000, help="port (8000; 0: any free port)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on "
                   "/v1/* (default: no key)")
    p.add_argument("--max-num-seqs", type=_int_at_least(1), default=64, metavar="N",
                   help="requests in the running batch at most (64)")
    p.add_argument("--max-num-batched-tokens", type=_int_at_least(1), default=512, metavar="N",
                   help="tokens computed per engine step at most (512)")
    p.add_argument("--max-model-len", type=_int_at_least(2), metavar="N",
                   help="context length: prompt + output (default: the model's)")
    p.add_argument("--block-size", type=_int_at_least(1), default=16, metavar="N",
                   help="tokens per KV block, a power of two (16)")
    p.add_argument("--num-blocks", type=_int_at_least(1), metavar="N",
                   help="KV pool size in blocks (default: sized from free memory)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse the KV blocks of shared prompt prefixes")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV pool dtype (auto: the model's)")
    p.add_argument("--request-timeout", type=_seconds, default=600.0, metavar="S",
                   help="abort a request after S seconds, queueing included (600)")
    p.add_argument("--max-request-bytes", type=_int_at_least(1024), default=1 << 20,
                   metavar="N", help="largest request body accepted; 413 beyond (1 MiB)")
    p.add_argument("--shutdown-timeout", type=_seconds, default=30.0, metavar="S",
                   help="on SIGINT/SIGTERM, in-flight requests get S seconds to finish, then "
                   "are aborted (30)")
    p.add_argument("--threads", type=_int_at_least(1), metavar="N",
                   help="torch threads (default: torch's)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """A :class:`~infopt.serve.config.ServeConfig` from parsed arguments; refused or invalid
    combinations are ``parser.error`` (exit 2)."""
    from ..batching.params import EngineConfig
    from .config import ServeConfig

    prefix, kv_dtype = args.enable_prefix_caching, args.kv_cache_dtype
    if args.kv is not None:
        from ..api import parse_option

        try:
            kv = parse_option("kv", args.kv)
        except ValueError as e:
            parser.error(f"argument --kv: {e}")
        if kv.policy != "full":
            parser.error(_KV_REFUSED)
        if kv.cache_dtype != "auto" and kv_dtype not in ("auto", kv.cache_dtype):
            parser.error(f"argument --kv: {args.kv} conflicts with --kv-cache-dtype {kv_dtype}")
        prefix = prefix or kv.prefix_caching
        kv_dtype = kv.cache_dtype if kv.cache_dtype != "auto" else kv_dtype
    spec = None
    if args.spec is not None:
        from ..api import parse_option

        try:
            spec = parse_option("spec", args.spec)
        except ValueError as e:
            parser.error(f"argument --spec: {e}")
        if type(spec).__name__ != "PromptLookupConfig":
            parser.error(_SPEC_REFUSED)
    if args.quant is not None:
        from ..api import parse_option

        try:
            parse_option("quant", args.quant)
        except ValueError as e:
            parser.error(f"argument --quant: {e}")
    try:
        engine = EngineConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            max_model_len=args.max_model_len,
            enable_prefix_caching=prefix,
            kv_cache_dtype=kv_dtype,
            speculative=spec,
        )
        return ServeConfig(
            model=args.model, served_model_name=args.served_model_name, quant=args.quant,
            dtype=args.dtype, device=args.device, host=args.host, port=args.port,
            api_key=args.api_key, engine=engine, request_timeout=args.request_timeout,
            max_request_bytes=args.max_request_bytes, shutdown_timeout=args.shutdown_timeout,
            threads=args.threads, log_level=args.log_level,
        )  # fmt: skip
    except ValueError as e:
        parser.error(str(e))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validate the arguments and serve until interrupted; returns the exit code."""
    from .server import serve

    return serve(config_from_args(args, parser))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m infopt.serve``: the same as ``infopt serve``."""
    parser = argparse.ArgumentParser(prog="python -m infopt.serve",
                                     description="OpenAI-compatible server (see docs/serve.md)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        print(f"infopt serve: error: {e}", file=sys.stderr)
        return 1
