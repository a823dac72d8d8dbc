"""Batched decode on the engine, eager vs compiled, in one process.

For each batch size B, B requests with distinct prompts decode N tokens each (greedy, EOS
ignored) on one engine; the decode rate counts the tokens generated after every request's first
token, over the time from the last first token to the end (prefill excluded). Each engine is
run once to warm up (compiles its buckets) and then timed ``--repeats`` times; the best run is
reported. Output identity between the eager and compiled engines is checked too.

    python examples/compiled_batch.py --quant int4 --batch 1,8,32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import infopt
from infopt.batching import CompileConfig, Engine, EngineConfig, SamplingParams


def decode_rate(engine: Engine, prompts: list[str], n: int) -> tuple[float, list[tuple[int, ...]]]:
    sp = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in prompts]
    first: dict[str, float] = {}
    done: dict[str, tuple[int, ...]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter()
            if out.finished:
                done[out.request_id] = out.token_ids
    end = time.perf_counter()
    t0 = max(first.values())
    # tokens produced after t0: everything but each request's tokens up to t0 (its first one)
    return len(prompts) * (n - 1) / (end - t0), [done[i] for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quant", default=None, help="wrap_model quant= alias (default: fp32)")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = infopt.load_model(args.model, dtype=torch.float32)
    if args.quant:
        infopt.wrap_model(model, quant=args.quant)
    words = ["history", "physics", "a recipe", "the ocean", "music", "a city", "trees", "code"]
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        prompts = [f"Tell me about {words[i % len(words)]} (item {i})." for i in range(b)]
        res = {}
        for name, cc in (("eager", None), ("compiled", CompileConfig(batch_buckets=(b,)))):
            engine = Engine(model, tok, EngineConfig(max_num_seqs=b, max_model_len=512,
                                                     max_num_batched_tokens=2048, compile=cc))
            t = time.perf_counter()
            decode_rate(engine, prompts, args.new_tokens)
            warm = time.perf_counter() - t
            best, toks = 0.0, None
            for _ in range(args.repeats):
                rate, toks = decode_rate(engine, prompts, args.new_tokens)
                best = max(best, rate)
            res[name] = (best, toks, warm)
        row = {
            "batch": b, "eager_tok_s": res["eager"][0], "compiled_tok_s": res["compiled"][0],
            "speedup": res["compiled"][0] / res["eager"][0],
            "first_run_s": {"eager": res["eager"][2], "compiled": res["compiled"][2]},
            "identical": res["eager"][1] == res["compiled"][1],
        }  # fmt: skip
        rows.append(row)
        print(f"batch {b:3d}: eager {row['eager_tok_s']:8.1f} tok/s  compiled "
              f"{row['compiled_tok_s']:8.1f} tok/s  x{row['speedup']:.2f}  identical "
              f"{row['identical']}  (first run {row['first_run_s']['compiled']:.1f} s)",
              flush=True)
    if args.json:
        meta = {"model": args.model, "quant": args.quant, "new_tokens": args.new_tokens,
                "threads": torch.get_num_threads(), "machine": platform.processor() or
                platform.machine(), "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
