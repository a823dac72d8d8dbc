"""``infopt eval``: quality of a (quantized) model from the command line.

    infopt eval humaneval --model NAME [--quant Q] [--limit N] [--json PATH]
    infopt eval domains --model NAME --quant Q[,Q...] [--eval-tokens N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(sub: Any, int_at_least: Any) -> None:
    """Register ``infopt eval`` and its sub-commands on the top-level subparsers ``sub``."""
    e = sub.add_parser("eval", help="quality of a model: HumanEval pass@1, per-domain quality",
                       description="Measure a model's quality. See docs/eval.md.")
    esub = e.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    h = esub.add_parser(
        "humaneval", help="HumanEval pass@1 (greedy, batching engine, tests in subprocesses)",
        description="Greedy HumanEval pass@1: completions through the batching engine, each "
        "program run in its own `python -I` process with a timeout and CPU / memory limits "
        "(process isolation, not a sandbox: see docs/eval.md).",
    )  # fmt: skip
    h.add_argument("--model", required=True, help="registry name or local HF dir")
    h.add_argument("--quant", help="a wrap_model quant alias (int8, int4, int4-awq, ...)")
    h.add_argument("--limit", type=int_at_least(1), metavar="N", help="first N problems only")
    h.add_argument("--max-new-tokens", type=int_at_least(1), default=512, metavar="N")
    h.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds per test program (10)")
    h.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    h.add_argument("--json", metavar="PATH", help="also write every result as JSON to PATH")
    h.add_argument("--quiet", action="store_true", help="print pass@1 only, not each problem")
    h.set_defaults(func=_cmd_humaneval)

    d = esub.add_parser(
        "domains", help="perplexity increase, KL and top-1 vs fp32 on prose, code and chat",
        description="Compare quantized copies of a model with the fp32 model on each "
        "evaluation domain (infopt.eval.compare_domains).",
    )  # fmt: skip
    d.add_argument("--model", required=True)
    d.add_argument("--quant", required=True, help="comma-separated wrap_model quant aliases")
    d.add_argument("--eval-tokens", type=int_at_least(2), default=2048, metavar="N")
    d.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    d.add_argument("--json", metavar="PATH")
    d.set_defaults(func=_cmd_domains)


def _load(name: str, quant: str | None, device: str) -> tuple[Any, Any]:
    import torch

    import infopt

    model, tok = infopt.load_model(name, torch.float32, device=device)
    if quant:
        infopt.wrap_model(model, quant=quant)
    return model, tok


def _cmd_humaneval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .humaneval import evaluate_humaneval

    model, tok = _load(args.model, args.quant, args.device)
    res = evaluate_humaneval(model, tok, limit=args.limit, max_new_tokens=args.max_new_tokens,
                             timeout=args.timeout)
    print(f"model {args.model} | quant {args.quant or 'none (fp32)'}")
    print(res.format(per_problem=not args.quiet))
    if args.json:
        out = {"model": args.model, "quant": args.quant, "limit": args.limit, **res.to_dict()}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _cmd_domains(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import copy

    import infopt

    from .domains import compare_domains

    ref, tok = _load(args.model, None, args.device)
    rows = []
    for q in [q for q in args.quant.split(",") if q]:
        cand = infopt.wrap_model(copy.deepcopy(ref), quant=q)
        for dom, r in compare_domains(ref, cand, tok, max_tokens=args.eval_tokens).items():
            rows.append({"quant": q, **r.to_dict()})
            print(f"{q:<12} {dom:<6} ppl {r.ppl_ref:8.3f} -> {r.ppl_cand:8.3f} "
                  f"({100 * r.ppl_rel_increase:+6.2f} %)  KL {r.kl_mean:.4f}  "
                  f"top1 {r.top1_agreement:.3f}", flush=True)
        del cand
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "eval_tokens":
                                               args.eval_tokens, "rows": rows}, indent=2) + "\n")
    return 0
