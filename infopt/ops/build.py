"""Build every extension this machine can build, smoke-test each backend, print the report.

    python -m infopt.ops.build            # build + report
    python -m infopt.ops.build --verbose  # show the compiler command lines / output
    python -m infopt.ops.build --no-check # skip the per-backend numerical smoke test

Exits non-zero if a backend that should work here (cpp everywhere; cuda and triton when a GPU is
visible) is unavailable or disagrees with the reference, so it doubles as a GPU-box sanity check.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import extensions
from .quant_linear import QUANT_OPS, smoke_check
from .registry import Backend, backend_report, format_backend_report
from .rmsnorm import rms_norm, rms_norm_reference


def _smoke(device: str, backend: str) -> str:
    """Max abs error vs the reference on a small bf16 and fp32 input; '' if within tolerance."""
    problems = []
    for dtype, atol, rtol in ((torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 1.6e-2)):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(37, 1000, generator=g).to(device=device, dtype=dtype)
        w = torch.randn(1000, generator=g).to(device=device, dtype=dtype)
        got = rms_norm(x, w, 1e-6, backend=backend)
        ref = rms_norm_reference(x, w, 1e-6)
        if not torch.allclose(got.float(), ref.float(), atol=atol, rtol=rtol):
            err = (got.float() - ref.float()).abs().max().item()
            problems.append(f"{dtype}: max abs err {err:.3g}")
    return "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infopt.ops.build", description=__doc__)
    p.add_argument("--verbose", action="store_true", help="show compiler output")
    p.add_argument("--no-check", action="store_true", help="skip the numerical smoke test")
    args = p.parse_args(argv)

    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), cache {extensions.cache_dir()}")
    print(f"cpu extension: {extensions.load_cpu(args.verbose) or 'ok'}")
    if torch.cuda.is_available():
        print(f"cuda extension: {extensions.load_cuda(args.verbose) or 'ok'}")
    print(format_backend_report())

    failed = []
    expected = {"cpu": [Backend.CPP]}
    if torch.cuda.is_available():
        expected["cuda"] = [Backend.CUDA, Backend.TRITON]
    by_device = backend_report(probe=False)["rms_norm"]["by_device"]
    for dev, wanted in expected.items():
        for b in wanted:
            if b.value not in by_device[dev]["available"]:
                failed.append(f"{b.value} on {dev}: {by_device[dev]['unavailable'][b.value]}")
    if not args.no_check:
        for dev, d in by_device.items():
            for b in d["available"]:
                msg = _smoke(dev, b)
                print(f"check rms_norm[{dev}/{b}]: {msg or 'ok'}")
                if msg:
                    failed.append(f"rms_norm {b} on {dev}: {msg}")
    # Quantized linears: cpp expected on CPU; triton (all three) and cuda (int4) on a GPU box.
    for op in QUANT_OPS:
        by_dev = backend_report(probe=False)[op]["by_device"]
        for dev, wanted in expected.items():
            for b in wanted:  # only backends the op has appear in "unavailable"
                if b.value in by_dev[dev]["unavailable"]:
                    failed.append(f"{op} {b.value} on {dev}: {by_dev[dev]['unavailable'][b.value]}")
        if not args.no_check:
            for dev, d in by_dev.items():
                for b in d["available"]:
                    msg = smoke_check(op, dev, b)
                    print(f"check {op}[{dev}/{b}]: {msg or 'ok'}")
                    if msg:
                        failed.append(f"{op} {b} on {dev}: {msg}")
    for f in failed:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
