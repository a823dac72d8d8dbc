"""Wall time of ``wrap_model(model, quant=ALIAS)`` for calibrated aliases, cold (calibrating,
then storing the result in the calibration cache) and warm (the same model, config and data:
loaded from the cache). Each wrap gets a freshly loaded model; loading is not timed.

    python examples/calib_cache_timing.py --model smollm2-135m --quant int4-awq --threads 2

``INFOPT_CACHE`` is pointed at a fresh temporary root (every folder but ``calibration``
a link to the usual one), so the first wrap really is cold and the user's calibration
cache is left alone; the root is deleted at the end unless ``--root DIR`` names one to keep (a
second run with the same ``--root`` then measures warm wraps in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.machine()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quant", default="int4-awq,int4-gptq")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default=None, help="cache root to use and keep (default: temp)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from infopt.models.disk_cache import resolve_cache_dir

    real = resolve_cache_dir()
    root = args.root or tempfile.mkdtemp(prefix="infopt-calib-")
    os.makedirs(root, exist_ok=True)
    for sub in os.listdir(real) if real.is_dir() else []:  # models, kernels, datasets, ...
        if sub not in ("calibration", "locks") and not os.path.lexists(os.path.join(root, sub)):
            os.symlink(real / sub, os.path.join(root, sub))
    calib = os.path.join(root, "calibration")
    os.environ["INFOPT_CACHE"] = root
    os.environ.pop("INFOPT_CALIB_CACHE", None)

    import torch

    import infopt
    from infopt.models import load_model

    torch.set_num_threads(args.threads)
    infopt.set_progress(False)
    rows = []
    for alias in args.quant.split(","):
        for _ in range(2):
            model, _tok = load_model(args.model, dtype=torch.float32)
            before = _entries(calib)
            t0 = time.perf_counter()
            infopt.wrap_model(model, quant=alias)
            dt = time.perf_counter() - t0
            phase = "cold" if _entries(calib) - before else "warm"
            rows.append({"quant": alias, "phase": phase, "seconds": round(dt, 2)})
            print(f"{alias:10s} {phase}: {dt:8.2f} s", flush=True)
            del model
    sizes = {e.name: e.stat().st_size for e in os.scandir(calib) if e.name.endswith(".safetensors")}
    info = {
        "date": time.strftime("%Y-%m-%d"), "machine": _cpu_name(),
        "threads": args.threads, "model": args.model, "torch": torch.__version__,
        "rows": rows, "entry_bytes": sizes,
    }
    print(json.dumps(info, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
    if args.root is None:
        shutil.rmtree(root)


def _entries(calib: str) -> set[str]:
    return set(os.listdir(calib)) if os.path.isdir(calib) else set()


if __name__ == "__main__":
    main()
