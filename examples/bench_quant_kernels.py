"""CPU micro-benchmark of infopt's quantized linears against fp32 and torch's packed int kernels.

    python examples/bench_quant_kernels.py                    # all shapes, M = 1 4 16 128
    python examples/bench_quant_kernels.py --m 1 --shapes 1536x8960 --rounds 9

For each (K x N) weight and each M it prints microseconds per call and effective weight GB/s
(bytes of the weight in that format, scales included, per second) for:

* ``fp32``: ``F.linear`` (MKL) on an fp32 weight, the baseline every ratio is relative to;
* ``aten int8``: ``torch.ops.aten._weight_int8pack_mm`` (int8 weight-only, per-channel scale);
* ``infopt int8``: ``infopt.ops.int8_weight_only_linear(backend="cpp")``;
* ``aten int4``: ``_weight_int4pack_mm_for_cpu`` on ``_convert_weight_to_int4pack_for_cpu``;
* ``infopt int4``: ``infopt.ops.int4_weight_only_linear(backend="cpp")``; group size 128, or 64
  where K is not a multiple of 128 (torch's kernel needs K % group == 0; SmolLM's K = 576);
* ``infopt int4a8``: ``infopt.ops.int4_dynamic_linear(backend="cpp")``: the same int4 weights
  times activations rounded to int8 per 32-block (int8 dot products on AVX-512 VNNI);
* ``infopt w8a8``: ``infopt.ops.int8_dynamic_linear(backend="cpp")``.

Decode streams every weight from DRAM once per token (a 1.5B model is far larger than the
cache), so each kernel cycles through enough distinct weight copies (``--rotate-mib`` per format,
default 1 GiB, more than the 480 MiB L3 of the box it was written on) that its weights are not
cache-resident. Candidates are interleaved round by round and the median round is reported,
which keeps a noisy shared machine from favouring whichever ran in a quiet moment.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from infopt import ops

SHAPES = {  # name: (K, N)
    "qwen-qkvo 1536x1536": (1536, 1536),
    "qwen-kv 1536x256": (1536, 256),
    "qwen-up/gate 1536x8960": (1536, 8960),
    "qwen-down 8960x1536": (8960, 1536),
    "smol-attn 576x576": (576, 576),
    "smol-up 576x1536": (576, 1536),
    "smol-down 1536x576": (1536, 576),
}
GROUPS = (128, 64, 32)  # the first that divides K, for both int4 kernels


def _rotating_views(big: torch.Tensor, shape: tuple[int, int], bytes_wanted: int) -> list:
    """Distinct ``shape`` views into one big random buffer, ``bytes_wanted`` worth in total."""
    numel = shape[0] * shape[1]
    count = max(2, min(big.numel() // numel, -(-bytes_wanted // (numel * big.element_size()))))
    return [big[i * numel : (i + 1) * numel].view(shape) for i in range(count)]


def _time_round(fn, arg_sets: list, calls: int, clock, cursor: list[int]) -> float:
    """Seconds per call over up to ``calls`` calls (fewer once 0.2 s have passed: torch's packed
    int4 kernel takes seconds per prefill call). ``cursor`` carries the position in ``arg_sets``
    across rounds, so every call uses the least recently used weight copy (evicted from cache)."""
    t0 = clock()
    done = 0
    while done < calls and (done < 2 or clock() - t0 < 0.2):
        fn(*arg_sets[cursor[0] % len(arg_sets)])
        cursor[0] += 1
        done += 1
    return (clock() - t0) / done


def bench_shape(k: int, n: int, ms: list[int], bufs: dict, args) -> list[str]:
    rot = args.rotate_mib << 20
    group = next((gs for gs in GROUPS if k % gs == 0), GROUPS[0])
    g = -(-k // group)
    fp32 = _rotating_views(bufs["f32"], (n, k), rot)
    i8 = _rotating_views(bufs["i8"], (n, k), rot)
    u4 = _rotating_views(bufs["u8"], (n, (k + 1) // 2), rot)
    s8 = torch.rand(n) * 0.01 + 1e-3
    s4, z4 = torch.rand(n, g) * 0.01 + 1e-3, torch.randint(0, 16, (n, g), dtype=torch.uint8)
    # torch's int4 CPU format: its own packing, built from int32 codes, one per weight copy.
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    a4 = [
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        for _ in range(max(2, -(-rot // (n * k // 2))))
    ]
    sz = torch.rand(g, n, 2) * 0.01
    kernels = {
        "fp32": (lambda x, w: F.linear(x, w), lambda x: [(x, w) for w in fp32], 4 * n * k),
        "aten int8": (
            torch.ops.aten._weight_int8pack_mm,
            lambda x: [(x, w, s8) for w in i8],
            n * k + 4 * n,
        ),
        "infopt int8": (
            lambda x, w: ops.int8_weight_only_linear(x, w, s8, backend="cpp"),
            lambda x: [(x, w) for w in i8],
            n * k + 4 * n,
        ),
        "aten int4": (
            lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz),
            lambda x: [(x, w) for w in a4],
            n * k // 2 + 8 * n * g,
        ),
        "infopt int4": (
            lambda x, w: ops.int4_weight_only_linear(x, w, s4, z4, group, backend="cpp"),
            lambda x: [(x, w) for w in u4],
            n * ((k + 1) // 2) + 5 * n * g,
        ),
        "infopt int4a8": (
            lambda x, w: ops.int4_dynamic_linear(x, w, s4, z4, group, backend="cpp"),
            lambda x: [(x, w) for w in u4],
            n * ((k + 1) // 2) + 5 * n * g,
        ),
        "infopt w8a8": (
            lambda x, w: ops.int8_dynamic_linear(x, w, s8, backend="cpp"),
            lambda x: [(x, w) for w in i8],
            n * k + 4 * n,
        ),
    }
    rows = []
    for m in ms:
        x = torch.randn(m, k)
        sets = {name: make(x) for name, (_, make, _) in kernels.items()}
        for name, (fn, _, _) in kernels.items():  # warm-up (and the first-call extension build)
            fn(*sets[name][0])
        times: dict[str, list[float]] = {name: [] for name in kernels}
        cursors = {name: [1] for name in kernels}
        for _ in range(args.rounds):
            for name, (fn, _, _) in kernels.items():
                t = _time_round(fn, sets[name], args.calls, args.clock, cursors[name])
                times[name].append(t)
        med = {name: statistics.median(t) for name, t in times.items()}
        cells = []
        for name, (_, _, nbytes) in kernels.items():
            us, gbs = med[name] * 1e6, nbytes / med[name] / 1e9
            ratio = med["fp32"] / med[name]
            cells.append(f"{us:9.1f} {gbs:6.1f} {ratio:5.2f}x")
        rows.append(f"{k:5d}x{n:<5d} M={m:<4d}| " + " | ".join(cells) + f" | g{group}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 128])
    p.add_argument("--shapes", nargs="+", help="KxN, e.g. 1536x8960 (default: the table above)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=30, help="calls per kernel per round")
    p.add_argument("--rotate-mib", type=int, default=1024, help="weight bytes cycled per kernel")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, for a machine shared with other jobs; only meaningful with "
        "--threads 1 (idle OpenMP threads spin, and CPU time adds up all threads)",
    )
    args = p.parse_args()
    args.clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = (
        [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        if args.shapes
        else list(SHAPES.values())
    )
    torch.manual_seed(0)
    nbytes = args.rotate_mib << 20
    bufs = {
        "f32": torch.randn(nbytes // 4),
        "i8": torch.randint(-127, 128, (nbytes,), dtype=torch.int8),
        "u8": torch.randint(0, 256, (nbytes,), dtype=torch.uint8),
    }
    clock = "wall" if args.clock is time.perf_counter else "process CPU"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} time, rotating "
        f"{args.rotate_mib} MiB of weights per kernel, median of {args.rounds} rounds"
    )
    names = ["fp32", "aten int8", "infopt int8", "aten int4", "infopt int4", "infopt int4a8",
             "infopt w8a8"]  # fmt: skip
    head = " | ".join(f"{nm + ' us  GB/s  vs32':>22s}" for nm in names)
    print(f"{'KxN':11s} {'M':6s}| {head}")
    for k, n in shapes:
        for row in bench_shape(k, n, args.m, bufs, args):
            print(row, flush=True)
    print(ops.format_backend_report(probe=False).splitlines()[0])


if __name__ == "__main__":
    main()
