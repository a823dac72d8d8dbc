"""Time the paged attention op on engine-like shapes (decode batches, prefill chunks, a mix).

Random fp32 K/V in a shuffled pool of 16-token blocks, SmolLM2-135M's heads by default (9 query
heads, 3 KV heads, head_dim 64). Each case: two untimed calls, then the mean of ``--repeats``
calls; ``--check`` also compares with the pure-torch reference.

    python examples/paged_attention_speed.py --threads 2 --check
    INFOPT_CPU_ISA=scalar python examples/paged_attention_speed.py   # the portable loop body
"""

from __future__ import annotations

import argparse
import time

import torch

from infopt.ops import paged_attention_prefill


def make_case(qlens, seqlens, hq, hkv, d, bs, kc):
    nb = kc.shape[0]
    maxb = max(-(-s // bs) for s in seqlens)
    table = torch.randperm(nb)[: len(qlens) * maxb].int().view(len(qlens), maxb)
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, d)
    return q, table, torch.tensor(seqlens, dtype=torch.int32), qsl


CASES = {
    "decode 64 x 300": ([1] * 64, [300] * 64),
    "decode 64 x 800": ([1] * 64, [800] * 64),
    "prefill 512, no prefix": ([512], [512]),
    "prefill 512 after 500": ([512], [1012]),
    "48 decodes + 464-token chunk": ([1] * 48 + [464], [400] * 48 + [700]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="9,3,64", help="Hq,Hkv,D")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check", action="store_true", help="compare with the reference backend")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    bs = args.block_size
    kc = torch.randn(8192 * 16 // bs, bs, hkv, d)
    vc = torch.randn_like(kc)
    print(f"Hq {hq}, Hkv {hkv}, D {d}, block {bs}, {torch.get_num_threads()} threads")
    for name, (qlens, seqlens) in CASES.items():
        q, table, lens, qsl = make_case(qlens, seqlens, hq, hkv, d, bs, kc)
        args_ = (q, kc, vc, table, lens, qsl, d**-0.5)
        for _ in range(2):
            out = paged_attention_prefill(*args_, backend="cpp")
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = paged_attention_prefill(*args_, backend="cpp")
        ms = (time.perf_counter() - t0) / args.repeats * 1e3
        err = ""
        if args.check:
            ref = paged_attention_prefill(*args_, backend="reference")
            err = f"  max |out - ref| {(out - ref).abs().max().item():.1e}"
        print(f"{name:<30} {ms:8.2f} ms{err}", flush=True)


if __name__ == "__main__":
    main()
