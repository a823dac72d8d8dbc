"""Warm or check the model cache: ``python -m infopt.models [--verify] [NAME ...]``."""

from __future__ import annotations

import argparse
import time

from infopt.models.disk_cache import resolve_cache_dir
from infopt.models.loader import ensure_model
from infopt.models.registry import MODEL_REGISTRY, list_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infopt.models", description=__doc__)
    parser.add_argument("names", nargs="*", help="embedded models (default: list them)")
    parser.add_argument("--verify", action="store_true", help="re-hash cached weights")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $INFOPT_CACHE "
                        "or ~/.cache/infopt)")
    args = parser.parse_args(argv)
    if not args.names:
        print(f"cache: {resolve_cache_dir(args.cache_dir)}")
        for name in list_models():
            print(f"{name:22s} {MODEL_REGISTRY[name].description}")
        return 0
    for name in args.names:
        t0 = time.perf_counter()
        path = ensure_model(name, args.cache_dir, verify=args.verify)
        print(f"{name}: {path} ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
