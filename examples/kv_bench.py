"""Paged KV cache vs HF's default DynamicCache: decode throughput and memory accounting.

    python examples/kv_bench.py [--model smollm2-135m] [--batch 4] [--new-tokens 32]
    python examples/kv_bench.py --sections prefix [--system-tokens 1000]
    python examples/kv_bench.py --sections policy [--long-tokens 2048 --budget 256]

1. Decode tok/s of greedy ``generate`` on a left-padded batch of mixed-length prompts, unwrapped
   (DynamicCache + sdpa) vs ``wrap_model(kv="paged")``, in the same process, interleaved runs.
   Decode time = time(prompt + N tokens) - time(prompt + 1 token), so prefill is excluded.
2. Memory after that generate: the paged pool's allocated vs used bytes (waste = partially filled
   last blocks) next to the DynamicCache's padded ``[B, Hkv, max_len, D]`` tensors.
3. Allocator-only accounting for many sequences of mixed lengths (no model run): waste % of the
   allocated KV memory per block size.
4. ``prefix``: time to first token (``generate(max_new_tokens=1)``, batch 1) of a shared
   ~``--system-tokens`` system prompt + a short question with ``kv="paged-prefix"``: a *miss*
   (cache cleared first) vs a *hit* (an earlier request with another question left the system
   prompt's blocks cached), interleaved in one process; plus the unwrapped HF model's TTFT and a
   check that hit and miss generate the same tokens as HF.
5. ``policy``: bounded-memory policies at one token budget on the first ``--long-tokens`` tokens of
   the eval text, teacher-forced through the cache in 16-token chunks
   (:func:`infopt.eval.compare_through_cache`): perplexity / KL vs HF's full cache for
   recent-window only, StreamingLLM and H2O, then the KV bytes held as the sequence grows.
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


def prefix_ttft(model, tok, system_tokens: int, repeats: int) -> None:
    from infopt.eval import default_text

    cached = infopt.wrap_model(copy.deepcopy(model), kv=kv.KVConfig(prefix_caching=True))
    ids = tok(default_text()[: 8 * system_tokens], add_special_tokens=False).input_ids
    system = torch.tensor([ids[:system_tokens]])
    questions = [
        torch.tensor([tok(" Question: " + q + " Answer:", add_special_tokens=False).input_ids])
        for q in eval_prompts(2 * repeats + 2, n_words=6)
    ]
    prompts = [torch.cat([system, q], 1) for q in questions]

    def ttft(m, ids):
        t0 = time.perf_counter()
        with torch.no_grad():
            m.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.eos_token_id)
        return time.perf_counter() - t0

    def gen(m, ids):
        with torch.no_grad():
            return m.generate(
                ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id
            )

    ttft(cached, prompts[0])  # warm-up (also builds the pool)
    pool = kv.model_pool(cached, kv.kv_state(cached).config)
    hf, miss, hit = [], [], []
    for i in range(repeats):
        pool.allocator.clear()
        miss.append(ttft(cached, prompts[2 * i + 1]))  # cold: the whole prompt is computed
        hit.append(ttft(cached, prompts[2 * i + 2]))  # the system prompt's blocks are cached
        hf.append(ttft(model, prompts[2 * i + 2]))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    lens = sorted({p.shape[1] for p in prompts})
    st = pool.allocator.stats
    print(
        f"prefix caching: system prompt {system_tokens} tokens, prompts {lens[0]}..{lens[-1]} "
        f"tokens, batch 1, {repeats} interleaved runs (median)"
    )
    print(
        f"  TTFT HF {1e3 * med(hf):.1f} ms | paged-prefix miss {1e3 * med(miss):.1f} ms | "
        f"hit {1e3 * med(hit):.1f} ms | miss/hit {med(miss) / med(hit):.1f}x"
    )
    print(
        f"  cache counters: hit tokens {st.hit_tokens}, miss tokens {st.miss_tokens}, hit blocks "
        f"{st.hit_blocks}, miss blocks {st.miss_blocks}, evictions {st.evictions}"
    )
    p = prompts[-1]
    ref = gen(model, p)
    pool.allocator.clear()
    cold = gen(cached, p)
    warm = gen(cached, p)  # full hit: all but the last prompt token reused
    print(
        f"  16 greedy tokens identical (HF / miss / full hit): {torch.equal(ref, cold)} / "
        f"{torch.equal(ref, warm)}"
    )


def policy_quality(model, tok, tokens: int, budget: int) -> None:
    from infopt.eval import default_text
    from infopt.eval.through_cache import compare_through_cache, new_cache

    bs = 16
    cfgs = {
        "full (no eviction)": kv.KVConfig(),
        f"recent window only ({budget - bs})": kv.KVConfig(
            policy="streaming", n_sink=0, window=budget - bs
        ),
        f"streaming (4 sinks -> 1 block, window {budget - 2 * bs})": kv.KVConfig(
            policy="streaming", n_sink=4, window=budget - 2 * bs
        ),
        f"h2o (budget {budget}, window {budget // 2})": kv.KVConfig(
            policy="h2o", budget=budget, window=budget // 2
        ),
    }
    print(f"policies: first {tokens} tokens of the eval text, one window, 16-token chunks, vs HF")
    wrapped = {}
    for name, cfg in cfgs.items():
        m = infopt.wrap_model(copy.deepcopy(model), kv=cfg)
        wrapped[name] = m
        r = compare_through_cache(
            model, m, tok, max_tokens=tokens, window=tokens, chunk=16, first_chunk=16
        )
        print(
            f"  {name}: ppl {r.ppl_cand:.3f} vs {r.ppl_ref:.3f} ({100 * r.ppl_rel_increase:+.2f}%)"
            f", KL {r.kl_mean:.4f}, top1 {r.top1_agreement:.3f}, max tokens held "
            f"{r.cand_max_cached_tokens}, max KV {r.cand_max_allocated_bytes / 2**20:.2f} MiB"
        )
    ids = tok(default_text(), verbose=False)["input_ids"][:tokens]
    marks = [t for t in (256, 512, 1024, 2048, 4096, 8192) if t <= tokens]
    print("  KV MiB allocated after N tokens: " + ", ".join(f"N={t}" for t in marks))
    for name, m in wrapped.items():
        cache, row = new_cache(m, tokens), []
        with torch.no_grad():
            for a in range(0, marks[-1], 16):
                m(input_ids=torch.tensor([ids[a : a + 16]]), past_key_values=cache, use_cache=True)
                if a + 16 in marks:
                    row.append(cache.memory_stats()["allocated_bytes"] / 2**20)
        print(f"    {name}: " + ", ".join(f"{x:.2f}" for x in row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--sections", default="decode,prefix,policy", help="comma list: decode, prefix, policy"
    )
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--long-tokens", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sections = {x.strip() for x in args.sections.split(",")}

    model, tok = infopt.load_model(args.model)
    model.eval()
    if "prefix" in sections:
        prefix_ttft(model, tok, args.system_tokens, max(args.repeats, 3))
    if "policy" in sections:
        policy_quality(model, tok, args.long_tokens, args.budget)
    if "decode" not in sections:
        return
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
