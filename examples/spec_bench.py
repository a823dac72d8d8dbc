"""Speculative decoding benchmark: target-only greedy vs each draft source, in one process.

Two tasks, batch 1, exactly ``--new-tokens`` greedy tokens per prompt (EOS suppressed through
``min_new_tokens``, as ``infopt bench`` does), timed through ``model.generate`` + a streamer:

* ``code``: code-completion prompts (``infopt.eval.CODE_PROMPTS``) - where a draft model helps;
* ``grounded``: input-grounded edits of given code (``infopt.eval.GROUNDED_PROMPTS``) - where
  prompt lookup helps, since the output copies the input.

Rows: ``target`` (HF greedy, the reference), infopt ``prompt-lookup`` / ``layer-skip`` /
``draft:<name>``, and HF's own assisted generation (``assistant_model=`` and
``prompt_lookup_num_tokens=``) as peers. Every row's tokens are checked against the target's.

    python examples/spec_bench.py --target smollm2-135m --sources prompt-lookup,layer-skip
    python examples/spec_bench.py --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b \\
        --new-tokens 64 --n-prompts 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import infopt
from infopt import speculative as sp
from infopt.bench.timing import TimingStreamer


def timed(gen, ids: torch.Tensor, n: int) -> tuple[list[int], float, float]:
    """Run ``gen(ids, streamer)``; return (new tokens, decode tok/s, total s)."""
    streamer = TimingStreamer(ids)
    streamer.begin()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = gen(ids, streamer)
    total = time.perf_counter() - t0
    new = out[0, ids.shape[1] :].tolist()
    if len(new) != n:
        raise RuntimeError(f"expected {n} new tokens, got {len(new)}")
    return new, streamer.decode_tok_s(), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="registry name of a draft model (same tokenizer)")
    ap.add_argument("--sources", default="prompt-lookup,layer-skip")
    ap.add_argument("--tasks", default="code,grounded")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=2)
    ap.add_argument("--num-draft-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF assisted-generation peers")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from infopt.eval import CODE_PROMPTS, GROUNDED_PROMPTS

    model, tok = infopt.load_model(args.target)
    draft = infopt.load_model(args.draft)[0] if args.draft else None
    n = args.new_tokens
    common = dict(
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )

    def hf(extra=None):
        def gen(ids, streamer):
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                streamer=streamer,
                **common,
                **(extra or {}),
            )

        return gen

    def spec(source):
        def gen(ids, streamer):
            nd = args.num_draft_tokens
            out = sp.generate(
                model,
                ids,
                source,
                n,
                min_new_tokens=n,
                streamer=streamer,
                num_draft_tokens=nd,
                pad_token_id=common["pad_token_id"],
            )
            gen.stats.append(out.stats)
            return out.sequences

        gen.stats = []
        return gen

    methods: dict[str, object] = {"target": hf()}
    for s in [s for s in args.sources.split(",") if s]:
        methods[s] = spec(s)
    if draft is not None:
        methods[f"draft:{args.draft}"] = spec(draft)
        if not args.no_hf:
            methods["hf-assisted"] = hf({"assistant_model": draft})
    if not args.no_hf:
        methods["hf-prompt-lookup"] = hf({"prompt_lookup_num_tokens": 10})

    tasks = {
        "code": list(CODE_PROMPTS[: args.n_prompts]),
        "grounded": list(GROUNDED_PROMPTS[: args.n_prompts]),
    }
    rows = []
    for task in [t for t in args.tasks.split(",") if t]:
        prompts = [tok(p, return_tensors="pt").input_ids for p in tasks[task]]
        with torch.inference_mode():  # warm-up: the first call pays one-time costs
            model.generate(
                prompts[0],
                attention_mask=torch.ones_like(prompts[0]),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=common["pad_token_id"],
            )
        ref_tokens = []
        for name, gen in methods.items():
            rates, totals, same = [], [], True
            for i, ids in enumerate(prompts):
                new, rate, total = timed(gen, ids, n)
                if name == "target":
                    ref_tokens.append(new)
                else:
                    same &= new == ref_tokens[i]
                rates.append(rate)
                totals.append(total)
            stats = getattr(gen, "stats", [])
            row = {
                "task": task,
                "method": name,
                "decode_tok_s": statistics.median(rates),
                "e2e_tok_s": n * len(prompts) / sum(totals),
                "identical": same,
            }
            if stats:
                prop = sum(s.proposed for s in stats)
                row["acceptance"] = sum(s.accepted for s in stats) / prop if prop else 0.0
                steps = sum(s.row_steps for s in stats)
                row["tokens_per_step"] = sum(s.emitted for s in stats) / steps
                gen.stats.clear()
            rows.append(row)
            base = next(r for r in rows if r["task"] == task and r["method"] == "target")
            row["ratio"] = row["e2e_tok_s"] / base["e2e_tok_s"]
            print(_fmt(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "target": args.target,
                    "draft": args.draft,
                    "new_tokens": n,
                    "threads": torch.get_num_threads(),
                    "rows": rows,
                },
                f,
                indent=2,
            )


def _fmt(r: dict) -> str:
    acc = f"{r['acceptance']:.2f}" if "acceptance" in r else "  - "
    tps = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else "  - "
    return (
        f"{r['task']:9s} {r['method']:28s} e2e {r['e2e_tok_s']:7.2f} tok/s  "
        f"decode {r['decode_tok_s']:7.2f} tok/s  x{r['ratio']:.2f}  accept {acc}  "
        f"tok/step {tps}  identical={r['identical']}"
    )


if __name__ == "__main__":
    main()
