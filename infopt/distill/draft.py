"""DistillSpec: distill a speculative-decoding draft toward its target, then measure.

The draft is a layer-truncated copy of the target (:func:`~.recipes.layer_truncated`), the
target itself on the int4 grid, or a smaller model of the same tokenizer (``--draft model
--draft-model NAME``, e.g. Qwen2.5-Coder-0.5B for the 1.5B target), optionally trained
through LoRA adapters (``--lora-rank``) and on the int4 grid (``--int4-draft``).
Training is on-policy (``lmbda=1``: the draft samples continuations of training prompts and
the target scores every token), as DistillSpec recommends; the divergence follows the
decoding mode: greedy verification accepts a draft token when the argmaxes agree, which
forward KL (mass-covering, and the target's mode gets the most weight) serves; for
sampling, acceptance is ``1 - TVD(p, q)`` per token, so ``loss="tvd"`` is the direct choice.

``python -m infopt.distill.draft`` runs the whole experiment on the default model and prints
acceptance and speedup of the undistilled and the distilled draft on held-out prompts.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .config import DistillConfig
from .data import DistillData, token_windows, training_text
from .recipes import layer_truncated
from .trainer import distill

__all__ = ["heldout_prompts", "int4_draft", "measure_speculative"]


def heldout_prompts(tokenizer: Any, n: int = 8, n_words: int = 24) -> list[torch.Tensor]:
    """Prompts ``[1, P]`` from Lee articles 0-39 (never in :data:`~.data.TRAIN_ARTICLES`)."""
    from ..eval.texts import lee_articles

    arts = lee_articles()[:40]
    picks = [arts[i * len(arts) // n] for i in range(n)]
    return [torch.tensor([tokenizer(" ".join(a.split()[:n_words]))["input_ids"]])
            for a in picks]


@torch.inference_mode()
def measure_speculative(target: nn.Module, drafts: dict[str, nn.Module],
                        prompts: Sequence[torch.Tensor], max_new_tokens: int = 64,
                        num_draft_tokens: int = 4, repeats: int = 2) -> dict[str, Any]:
    """Greedy decode every prompt with the target alone and with each draft.

    Returns per row: wall seconds (best of ``repeats``, summed over prompts), speedup over the
    target alone, acceptance rate, mean accepted length, and whether every output equals the
    target's own greedy output token for token.
    """
    from .. import speculative as sp

    def plain(ids: torch.Tensor) -> torch.Tensor:
        return target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                               pad_token_id=0)

    # Interleaved per prompt (target, then each draft, repeated) so a change in machine load
    # hits every row alike instead of whichever row happened to run then.
    secs = dict.fromkeys(["target", *drafts], 0.0)
    same = dict.fromkeys(drafts, True)
    stats: dict[str, Any] = dict.fromkeys(drafts)
    for ids in prompts:
        best = dict.fromkeys(secs, float("inf"))
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref = plain(ids)
            best["target"] = min(best["target"], time.perf_counter() - t0)
            for name, draft in drafts.items():
                t0 = time.perf_counter()
                res = sp.generate(target, ids, draft, max_new_tokens,
                                  min_new_tokens=max_new_tokens,
                                  num_draft_tokens=num_draft_tokens)
                best[name] = min(best[name], time.perf_counter() - t0)
                same[name] &= torch.equal(res.sequences, ref)
                if stats[name] is None:
                    stats[name] = res.stats
                else:
                    stats[name].merge(res.stats)
        for name in secs:
            secs[name] += best[name]
    rows: dict[str, Any] = {"target": {"seconds": secs["target"], "speedup": 1.0}}
    for name in drafts:
        st = stats[name]
        rows[name] = {"seconds": secs[name], "speedup": secs["target"] / secs[name],
                      "identical": same[name], "acceptance_rate": st.acceptance_rate,
                      "mean_accepted_length": st.mean_accepted_length}
    return rows


def int4_draft(model: nn.Module, group_size: int = 128) -> nn.Module:
    """``model`` (fp, or a fake-quantized student) as a fast int4 draft, in place: merged and
    rounded to int4 RTN on its training grid (:func:`~.student_linear.export_int4`), int8
    activations per 32-block, and the output head int8 weight-only."""
    from ..quant import Int4Linear, Int8Linear
    from .student_linear import export_int4

    export_int4(model, group_size)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.act_dtype = "int8"
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear.from_linear(head))
    return model


def main(argv: Sequence[str] | None = None) -> int:
    from ..models import load_model

    p = argparse.ArgumentParser(prog="python -m infopt.distill.draft",
                                description="DistillSpec: distill a draft toward its target, then "
                                "measure speculative decoding with both drafts")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft", choices=("layers", "int4", "model"), default="layers",
                   help="layers: a layer-truncated copy of the target (--keep); int4: the "
                   "target itself on the int4 g128 grid (trained with fake quantization, run "
                   "as int4 weights x int8 activations with an int8 head); model: the smaller "
                   "model --draft-model (same tokenizer as the target)")
    p.add_argument("--draft-model", default=None,
                   help="with --draft model: registry name or local dir of the draft")
    p.add_argument("--int4-draft", action="store_true",
                   help="train the draft on the int4 g128 grid and run both drafts as int4 "
                   "(implied by --draft int4)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train rank-r LoRA adapters on the draft's *_proj linears instead of "
                   "its weights (0: full training)")
    p.add_argument("--keep", default=None,
                   help="with --draft layers: target layers the draft keeps, comma-separated "
                   "(default: the first six and the last)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--loss", default="forward_kl")
    p.add_argument("--lmbda", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None, help="save the distilled draft here (load_model)")
    args = p.parse_args(argv)
    if (args.draft == "model") != (args.draft_model is not None):
        p.error("--draft-model NAME is required with --draft model and accepted only with it")
    if args.keep is not None and args.draft != "layers":
        p.error(f"--keep applies to --draft layers only, got --draft {args.draft}")
    if args.lora_rank < 0:
        p.error(f"--lora-rank must be >= 0, got {args.lora_rank}")
    int4 = args.draft == "int4" or args.int4_draft

    target, tok = load_model(args.model, dtype=torch.float32)
    keep = None
    if args.draft == "model":
        base, _ = load_model(args.draft_model, dtype=torch.float32)
    elif args.draft == "layers":
        from ..speculative.drafts import find_decoder_layers

        n = len(find_decoder_layers(target)[2])
        keep = ([int(x) for x in args.keep.split(",")] if args.keep
                else sorted({*range(min(6, n)), n - 1}))
        base = layer_truncated(target, keep)
    else:  # int4: the target itself
        base = copy.deepcopy(target)
    student = copy.deepcopy(base)
    data = token_windows(tok, training_text(), args.seq_len)
    cfg = DistillConfig(loss=args.loss, steps=args.steps, batch_size=args.batch_size,
                        lmbda=args.lmbda, prompt_len=args.prompt_len, lr=args.lr,
                        warmup_steps=max(1, args.steps // 10), frozen=("*embed_tokens*",),
                        log_every=10, fake_quant="int4" if int4 else None,
                        lora_rank=args.lora_rank)
    t0 = time.perf_counter()
    res = distill(student, target, DistillData(data.input_ids), cfg)
    train_s = time.perf_counter() - t0
    if int4:
        # Both drafts on the grid the student trained on: RTN int4 g128 (the undistilled draft
        # is plain RTN of its starting point), run with int8 activations and an int8 head.
        for m in (base, student):
            int4_draft(m, cfg.group_size)
    if args.out and int4:
        from ..quant import save_quantized

        save_quantized(student, args.out)  # load_quantized(out)
        tok.save_pretrained(args.out)
    elif args.out:
        from .trainer import export_student

        export_student(student, tok, args.out)
    prompts = heldout_prompts(tok, args.prompts)
    rows = measure_speculative(target, {"undistilled": base, "distilled": student}, prompts,
                               args.new_tokens, args.draft_tokens)
    out = {"model": args.model, "draft": args.draft, "draft_model": args.draft_model,
           "int4": int4, "keep": keep, "config": cfg.to_dict(),
           "train_seconds": train_s,
           "history": res.history, "threads": torch.get_num_threads(), "rows": rows}
    for name, r in rows.items():
        extra = "" if name == "target" else (
            f"  acceptance {r['acceptance_rate']:.3f}  mean accepted "
            f"{r['mean_accepted_length']:.2f}  identical {r['identical']}")
        print(f"{name:<12} {r['seconds']:7.2f} s  speedup {r['speedup']:.3f}{extra}")
    print(f"trained {train_s:.0f} s; distilled / undistilled speedup "
          f"{rows['distilled']['speedup'] / rows['undistilled']['speedup']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
