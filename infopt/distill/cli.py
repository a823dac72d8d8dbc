"""``infopt distill``: distill a student toward a teacher from the command line.

    infopt distill --teacher NAME_OR_PATH --student NAME_OR_PATH [--student-quant int4]
        [--loss forward_kl|reverse_kl|jsd|tvd] [--data sharegpt|text|PATH] --out DIR ...
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(sub: Any, int_at_least: Any) -> None:
    """Register ``infopt distill`` on the top-level subparsers ``sub``."""
    from . import DIVERGENCES

    d = sub.add_parser(
        "distill", help="distill a student toward a teacher (soft targets; int4 recovery)",
        description="Train --student toward --teacher's distribution (alpha * CE + (1 - alpha) "
        "* T^2 * divergence), measure held-out perplexity and KL to the teacher before and "
        "after, and write --out (infopt.load_model(DIR), or infopt.load_quantized(DIR) with "
        "--student-quant int4). See docs/distill.md.",
    )  # fmt: skip
    d.add_argument("--teacher", required=True, help="registry name or local HF directory")
    d.add_argument("--student", required=True, help="registry name or local HF directory")
    d.add_argument("--student-quant", choices=("int4",), default=None,
                   help="train on the int4 g128 RTN grid (fake quantization) and export int4")
    d.add_argument("--student-layers", type=int_at_least(1), metavar="N",
                   help="keep only the student's first N decoder layers")
    d.add_argument("--loss", choices=DIVERGENCES, default="forward_kl")
    for flag, default, text in (("--beta", 0.5, "JSD mixture weight in [0, 1]"),
                                ("--temperature", 1.0, "softmax temperature (> 0)"),
                                ("--alpha", 0.0, "cross-entropy weight in [0, 1]"),
                                ("--lmbda", 0.0, "fraction of on-policy (student-sampled) "
                                 "batches in [0, 1]"),
                                ("--lr", 1e-4, "AdamW learning rate")):
        d.add_argument(flag, type=float, default=default, metavar="X", help=f"{text} ({default})")
    d.add_argument("--data", default="text",
                   help="sharegpt, text (Lee articles 40-149) or a .txt/.jsonl/.json file")
    for flag, lo, default, text in (("--steps", 1, 100, "optimizer steps"),
                                    ("--seq-len", 2, 256, "tokens per training sequence"),
                                    ("--batch-size", 1, 4, "sequences per micro-batch"),
                                    ("--grad-accum", 1, 1, "micro-batches per step"),
                                    ("--warmup-steps", 0, 0, "linear warmup steps"),
                                    ("--lora-rank", 0, 0, "LoRA rank (0: train the weights)"),
                                    ("--eval-tokens", 2, 4096, "held-out tokens evaluated"),
                                    ("--save-every", 0, 0, "checkpoint every N steps"),
                                    ("--seed", 0, 0, "data order and sampling seed")):
        d.add_argument(flag, type=int_at_least(lo), default=default, metavar="N",
                       help=f"{text} ({default})")
    d.add_argument("--max-windows", type=int_at_least(1), metavar="N",
                   help="training sequences at most (default: all the data gives)")
    d.add_argument("--freeze", default="", metavar="GLOB[,GLOB]",
                   help="parameter name patterns kept frozen, e.g. '*embed_tokens*'")
    d.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    d.add_argument("--gradient-checkpointing", action="store_true")
    d.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    d.add_argument("--out", required=True, metavar="DIR", help="output directory")
    d.add_argument("--threads", type=int_at_least(1), metavar="N", help="torch threads")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_distill)


def _cmd_distill(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from . import DistillConfig
    from .recipes import run_distill

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = DistillConfig(
            loss=args.loss, beta=args.beta, temperature=args.temperature, alpha=args.alpha,
            lmbda=args.lmbda, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
            grad_accum=args.grad_accum, warmup_steps=args.warmup_steps,
            lora_rank=args.lora_rank, dtype=args.dtype, save_every=args.save_every,
            gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
            frozen=tuple(p.strip() for p in args.freeze.split(",") if p.strip()),
            fake_quant=args.student_quant,
        )  # fmt: skip
    except ValueError as e:
        parser.error(f"argument --{str(e).split()[0].replace('_', '-')}: {e}")
    run = run_distill(
        args.teacher, args.student, args.out, cfg, student_quant=args.student_quant,
        student_layers=args.student_layers, data=args.data, seq_len=args.seq_len,
        max_windows=args.max_windows, eval_tokens=args.eval_tokens, resume=args.resume,
        progress=not args.quiet,
    )  # fmt: skip
    print(run.format())
    return 0
