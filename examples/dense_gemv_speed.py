"""Time ``infopt.ops.dense_gemv`` against ``F.linear`` (MKL) on decode-sized float32 linears.

For each weight shape (SmolLM2-135M's projections and head, a Qwen2.5-1.5B MLP matrix) and row
count M: enough distinct random weights to cycle through ~300 MB, so every call reads its weight
from memory as in a real decode step; each timed call runs for ~0.5 s of repeats after 2 warm-up
passes. Prints microseconds per call, the weight bytes per second and the ratio.

    python examples/dense_gemv_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from infopt import ops

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (8960, 1536)]


def per_call(fn, weights, seconds=0.5) -> float:
    for w in weights[:2]:
        fn(w)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for w in weights:
            fn(w)
            reps += 1
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,8")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads")
    for n, k in SHAPES:
        weights = [torch.randn(n, k) for _ in range(max(1, int(3e8 // (n * k * 4))))]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k)
            err = (ops.dense_gemv(x, weights[0], backend="cpp") - F.linear(x, weights[0]))
            t_mkl = per_call(lambda w, x=x: F.linear(x, w), weights)
            t_ker = per_call(lambda w, x=x: ops.dense_gemv(x, w, backend="cpp"), weights)
            gb = n * k * 4 / 1e9
            print(f"M={m} N x K={n} x {k}: F.linear {t_mkl * 1e6:8.1f} us ({gb / t_mkl:5.1f} GB/s)"
                  f"  dense_gemv {t_ker * 1e6:8.1f} us ({gb / t_ker:5.1f} GB/s)"
                  f"  x{t_mkl / t_ker:.2f}  max |diff| {err.abs().max().item():.1e}", flush=True)


if __name__ == "__main__":
    main()
