"""Per-domain quality of quantization methods: prose, code and chat perplexity, KL and top-1.

For each method: quantize a copy of the fp32 model (calibrated methods on ``--calib-text``),
then ``infopt.eval.compare_domains`` it with the fp32 model on the first ``--eval-tokens``
tokens of each domain. Prints one row per (method, domain) plus, for each method, the mean
perplexity increase over the domains and its ratio to RTN's (when ``int4`` is among them).

    python scripts/quality_domains.py --methods int8,int4,int4-awq,int4-gptq
    python scripts/quality_domains.py --methods int4-awq,int4-gptq --calib-text lee --json lee.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time

import torch

import infopt.quant as q
from infopt.eval.domains import DOMAINS, compare_domains
from infopt.models import load_model
from infopt.quant.config import CALIB_TEXTS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="int8,int4,int4-awq,int4-gptq",
                   help="wrap_model quant aliases (int4 = RTN with the head in fp32 here)")
    p.add_argument("--calib-text", default="mix", choices=CALIB_TEXTS)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    domains = [d for d in args.domains.split(",") if d]
    ref, tok = load_model(args.model, torch.float32)
    ref.eval()
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        # "int4" is RTN with the output head kept in fp32, like int4-awq / int4-gptq, so the
        # three int4 rows differ only by the method.
        cfg = q.Int4WeightOnlyConfig() if method == "int4" else q.ALIASES[method]()
        if cfg.calibrated:
            cfg = dataclasses.replace(cfg, calib_text=args.calib_text)
        cand = copy.deepcopy(ref)
        t0 = time.perf_counter()
        q.quantize_model(cand, cfg, tokenizer=tok, progress=False)
        qs = time.perf_counter() - t0
        res = compare_domains(ref, cand, tok, domains, max_tokens=args.eval_tokens)
        for d, r in res.items():
            rows.append({"method": method, "calib_text": args.calib_text if cfg.calibrated
                         else None, "quantize_s": round(qs, 1), **r.to_dict()})
            print(f"{method:<10} {d:<6} ppl {r.ppl_ref:8.3f} -> {r.ppl_cand:8.3f} "
                  f"({100 * r.ppl_rel_increase:+6.2f} %)  KL {r.kl_mean:.4f}  top1 "
                  f"{r.top1_agreement:.3f}  ({qs:.0f} s)", flush=True)
        del cand
    means = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        incs = [r["ppl_rel_increase"] for r in rows if r["method"] == m]
        means[m] = sum(incs) / len(incs)
    for m, v in means.items():
        vs = f", {v / means['int4']:.2f}x RTN" if "int4" in means and m != "int4" else ""
        print(f"{m:<10} mean over domains {100 * v:+.2f} %{vs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "eval_tokens": args.eval_tokens,
                       "calib_text": args.calib_text, "rows": rows, "mean": means}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
