"""Paged KV cache vs HF's default DynamicCache: decode throughput and memory accounting.

    python examples/kv_bench.py [--model smollm2-135m] [--batch 4] [--new-tokens 32]

1. Decode tok/s of greedy ``generate`` on a left-padded batch of mixed-length prompts, unwrapped
   (DynamicCache + sdpa) vs ``wrap_model(kv="paged")``, in the same process, interleaved runs.
   Decode time = time(prompt + N tokens) - time(prompt + 1 token), so prefill is excluded.
2. Memory after that generate: the paged pool's allocated vs used bytes (waste = partially filled
   last blocks) next to the DynamicCache's padded ``[B, Hkv, max_len, D]`` tensors.
3. Allocator-only accounting for many sequences of mixed lengths (no model run): waste % of the
   allocated KV memory per block size.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch

import infopt
import infopt.kvcache as kv
from infopt.eval.texts import eval_prompts


def timed_generate(model, enc, n, pad_id, **kw):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            enc.input_ids,
            attention_mask=enc.attention_mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad_id,
            **kw,
        )
    return time.perf_counter() - t0, out


def decode_tps(model, enc, n, pad_id, repeats):
    best = float("inf")
    for _ in range(repeats):  # best of: the machine is shared, the minimum is the least noisy
        t_full, _ = timed_generate(model, enc, n, pad_id)
        t_first, _ = timed_generate(model, enc, 1, pad_id)
        best = min(best, max(t_full - t_first, 1e-9))
    return enc.input_ids.shape[0] * (n - 1) / best


def allocator_waste(num_seqs: int, lo: int, hi: int, seed: int = 0) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(num_seqs)]
    rows = []
    for bs in (8, 16, 32):
        m = kv.BlockManager(kv.BlockAllocator(sum(-(-n // bs) for n in lens), bs))
        m.append({m.add_sequence(): n for n in lens})
        allocated, used = m.token_counts()
        rows.append((bs, 100.0 * (allocated - used) / allocated))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = infopt.load_model(args.model)
    model.eval()
    paged = infopt.wrap_model(copy.deepcopy(model), kv=kv.KVConfig(block_size=args.block_size))
    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tok.pad_token_id = pad_id
    # Mixed prompt lengths: 8 .. 80 words.
    prompts = [
        eval_prompts(args.batch, n_words=8 + 72 * i // max(args.batch - 1, 1))[i]
        for i in range(args.batch)
    ]
    enc = tok(prompts, return_tensors="pt", padding=True)
    real = enc.attention_mask.sum(1).tolist()
    print(
        f"model={args.model} batch={args.batch} prompt tokens={real} new={args.new_tokens} "
        f"threads={args.threads} block_size={args.block_size}"
    )

    hf_tps = decode_tps(model, enc, args.new_tokens, pad_id, args.repeats)
    paged_tps = decode_tps(paged, enc, args.new_tokens, pad_id, args.repeats)
    print(
        f"decode tok/s: HF DynamicCache {hf_tps:.1f} | paged {paged_tps:.1f} | "
        f"ratio paged/HF {paged_tps / hf_tps:.2f}"
    )

    cache = kv.PagedCache.from_model(paged, kv.KVConfig(block_size=args.block_size))
    _, out_p = timed_generate(paged, enc, args.new_tokens, pad_id, past_key_values=cache)
    _, out_h = timed_generate(model, enc, args.new_tokens, pad_id)
    st = cache.memory_stats()
    mib = 2**20
    print(f"greedy tokens identical to HF: {torch.equal(out_p, out_h)}")
    print(
        f"paged KV: reserved {st['reserved_bytes'] / mib:.2f} MiB, allocated "
        f"{st['allocated_bytes'] / mib:.2f} MiB, used {st['used_bytes'] / mib:.2f} MiB, "
        f"waste {st['waste_pct']:.2f}% of allocated"
    )
    # DynamicCache holds [B, Hkv, padded_len, D] per layer: every row at the longest length.
    dyn_tokens = enc.input_ids.shape[0] * (enc.input_ids.shape[1] + args.new_tokens - 1)
    dyn = dyn_tokens * st["bytes_per_token"]
    print(
        f"DynamicCache KV: {dyn / mib:.2f} MiB, waste (padding) "
        f"{100 * (dyn - st['used_bytes']) / dyn:.2f}%"
    )

    print("allocator, 256 sequences of 100..2000 tokens:")
    for bs, pct in allocator_waste(256, 100, 2000):
        print(f"  block_size={bs:3d}: waste {pct:.2f}% of allocated KV memory")


if __name__ == "__main__":
    main()
