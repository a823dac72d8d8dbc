"""GPU benchmark of infopt quantized linears: int4 ``cuda`` (row-major and tiled layouts) /
``triton``, int8 and w8a8 ``triton``, against bf16 ``F.linear`` (cuBLAS). Run on a CUDA box:

    python -m infopt.ops.build                       # build + smoke-test every backend first
    python examples/bench_quant_kernels_gpu.py       # M = 1 4 16 on the shapes below
    python examples/bench_quant_kernels_gpu.py --m 1 --shapes 4096x4096 --rounds 20
    python examples/bench_quant_kernels_gpu.py --kernels cuda     # only names containing "cuda"
    python examples/bench_quant_kernels_gpu.py --kernels gemv --m 1 4 --gemv-sweep
                                                     # int4 triton decode kernel: tile configs

Prints microseconds per call, effective weight GB/s and the speed-up over bf16 ``F.linear``
for each (K x N, M). Every kernel is first checked against the fp32 reference (SQNR). Each
kernel cycles through weight copies worth ``--rotate-mib`` (default 512 MiB, ten times the
50 MiB L2 of an H100) so weights stream from HBM as in real decode, not from L2. Timing: CUDA
events around a CUDA-graph replay of ``--calls`` back-to-back calls (GPU time only: an eager
infopt op call costs ~20 us of Python on the host, more than a decode GEMV takes on an H100, so
eager timing measures the host; ``--eager`` shows that), median over ``--rounds``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics

import torch
import torch.nn.functional as F

from infopt import ops
from infopt.ops import quant_ref

GROUP = 128


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    noise = torch.linalg.vector_norm(ref - got)
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def _time(fn, arg_sets, calls: int, rounds: int, graph: bool) -> float:
    """Median seconds per call; consecutive calls use different weight copies.

    ``graph``: the ``calls`` launches are captured once in a CUDA graph and the graph is
    replayed, so only GPU time counts (how decode runs under CUDA graphs / ``torch.compile``
    "reduce-overhead", and the only way to see a ~10 us GEMV behind a Python op call that
    costs more than that on the host). Otherwise eager calls, host overhead included.
    """
    for a in arg_sets[:3]:
        fn(*a)
    torch.cuda.synchronize()
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on the capture stream (allocator, autotune)
            for i in range(3):
                fn(*arg_sets[i % len(arg_sets)])
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(*arg_sets[i % len(arg_sets)])
        g.replay()
        torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph:
            g.replay()
        else:
            for i in range(calls):
                fn(*arg_sets[i % len(arg_sets)])
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(per_call)


def _gemv_config(chunks: int, warps: int, s4, z4, x, w):
    """The int4 triton op with the decode kernel's launch constants overridden (read when the
    call is captured, so each CUDA graph holds its own configuration)."""
    from infopt.ops import quant_linear_triton as ql

    saved = ql._GEMV_MAX_CHUNKS, ql._GEMV_WARPS
    ql._GEMV_MAX_CHUNKS, ql._GEMV_WARPS = chunks, warps
    try:
        return ops.int4_weight_only_linear(x, w, s4, z4, GROUP, backend="triton")
    finally:
        ql._GEMV_MAX_CHUNKS, ql._GEMV_WARPS = saved


def bench(k: int, n: int, ms: list[int], args) -> None:
    dev = torch.device("cuda")
    g = -(-k // GROUP)
    copies = max(2, (args.rotate_mib << 20) // (2 * n * k))  # sized by the bf16 weight
    w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    c4 = max(2, (args.rotate_mib << 20) // (n * k // 2))
    q4 = [torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8) for _ in range(c4)]
    s4 = torch.rand(n, g, device=dev) * 0.01 + 1e-3
    z4 = torch.randint(0, 16, (n, g), device=dev, dtype=torch.uint8)
    c8 = max(2, (args.rotate_mib << 20) // (n * k))
    q8 = [torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(c8)]
    s8 = torch.rand(n, device=dev) * 0.01 + 1e-3
    tiled = [ops.int4_tile(q, s4, z4, GROUP) for q in q4]  # (codes, meta) per copy
    cands = {  # name: (fn, weights, reference, weight bytes)
        "bf16 F.linear": (lambda x, w: F.linear(x, w), w16, None, 2 * n * k),
        "int4 cuda": (
            lambda x, w: ops.int4_weight_only_linear(x, w, s4, z4, GROUP, backend="cuda"),
            q4,
            lambda x, w: quant_ref.int4_weight_only_linear(x, w, s4, z4, GROUP),
            n * k // 2 + 5 * n * g,
        ),
        "int4 tiled cuda": (
            lambda x, w: ops.int4_tiled_linear(x, w[0], w[1], n, GROUP, backend="cuda"),
            tiled,
            lambda x, w: ops.int4_tiled.int4_tiled_linear_reference(x, w[0], w[1], n, GROUP),
            n * k // 2 + 5 * n * g,
        ),
        "int4 triton": (
            lambda x, w: ops.int4_weight_only_linear(x, w, s4, z4, GROUP, backend="triton"),
            q4,
            lambda x, w: quant_ref.int4_weight_only_linear(x, w, s4, z4, GROUP),
            n * k // 2 + 5 * n * g,
        ),
        "int8 triton": (
            lambda x, w: ops.int8_weight_only_linear(x, w, s8, backend="triton"),
            q8,
            lambda x, w: quant_ref.int8_weight_only_linear(x, w, s8),
            n * k + 4 * n,
        ),
        "w8a8 triton": (
            lambda x, w: ops.int8_dynamic_linear(x, w, s8, backend="triton"),
            q8,
            lambda x, w: quant_ref.int8_dynamic_linear(x, w, s8),
            n * k + 4 * n,
        ),
    }
    if args.gemv_sweep:  # the int4 Triton decode kernel's K-step size and warps per program
        for chunks, warps in itertools.product((32, 64, 128, 256), (1, 2, 4)):
            cands[f"int4 triton gemv c{chunks} w{warps}"] = (
                functools.partial(_gemv_config, chunks, warps, s4, z4),
                *cands["int4 triton"][1:],
            )
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        res = {}
        for name, (fn, ws, ref, nbytes) in cands.items():
            if name != "bf16 F.linear" and not any(f in name for f in args.kernels):
                continue
            if ref is not None:  # correctness first: a fast wrong kernel is not a result
                db = _sqnr(ref(x.float(), ws[0]), fn(x, ws[0]).float())
                if db < 42:  # one bf16 rounding of the output is >= 42 dB
                    print(f"  {name}: WRONG, SQNR {db:.1f} dB vs reference")
                    continue
            sets = [(x, w) for w in ws]
            res[name] = (_time(fn, sets, args.calls, args.rounds, not args.eager), nbytes)
        base = res["bf16 F.linear"][0]
        cells = [
            f"{name} {t * 1e6:7.1f}us {nb / t / 1e9:6.0f}GB/s {base / t:5.2f}x"
            for name, (t, nb) in res.items()
        ]
        print(f"{k:5d}x{n:<5d} M={m:<3d} | " + " | ".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008", "11008x4096"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--rotate-mib", type=int, default=512)
    p.add_argument(
        "--kernels",
        nargs="+",
        default=[""],
        help="run only kernels whose name contains one of these (default: all)",
    )
    p.add_argument(
        "--gemv-sweep",
        action="store_true",
        help="add int4 triton decode-kernel rows for CHUNKS x num_warps configurations",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="time eager calls (host overhead included) instead of CUDA-graph replay",
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, group size {GROUP}, "
          f"x bf16, speed-up vs bf16 F.linear (cuBLAS)")  # fmt: skip
    print(ops.format_backend_report().split("\n")[0])
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        bench(k, n, args.m, args)


if __name__ == "__main__":
    main()
