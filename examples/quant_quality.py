"""Quality of every infopt quantization method on a real model.

For each method: quantize a copy of the fp32 model, then compare it with the fp32 model on
the evaluation text (``infopt.eval.compare``: perplexity, relative increase, mean KL(fp32 ||
quantized), top-1 agreement). Evaluation: the first ``--eval-tokens`` tokens of the Lee news
corpus (infopt's default text); calibration (AWQ, GPTQ, SmoothQuant): the library default
``--calib-text mix`` (chat, code and prose, disjoint from every evaluation text), or one source
(``lee``: the second half of that corpus, ``pydoc``, ``chat``, ``code``). Per-domain figures
(prose, code, chat): ``scripts/quality_domains.py``.

    python examples/quant_quality.py                       # SmolLM2-135M-Instruct, all methods
    python examples/quant_quality.py --methods int8,int4-gptq:64 --eval-tokens 4096

Method names: ``int8``, ``w8a8``, ``fp8``, ``int4[-awq|-gptq][:GROUP]`` (group 32/64/128,
default 128), ``int4-gptq-ao[:GROUP]`` (GPTQ with act_order).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

import infopt.quant as q
from infopt.eval import compare

#: QuantConfig's calibration defaults, so that the script measures what the library ships.
_CALIB_DEFAULTS = {f.name: f.default for f in dataclasses.fields(q.QuantConfig)}

DEFAULT_METHODS = (
    "int8,w8a8,fp8,int4:128,int4-awq:128,int4-gptq:128,int4:64,int4-awq:64,int4-gptq:64"
)


def make_config(method: str, args: argparse.Namespace) -> q.QuantConfig:
    """``"int4-awq:64"`` -> ``Int4WeightOnlyConfig(group_size=64, method="awq", ...)``."""
    name, _, group = method.partition(":")
    calib = {"calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
             "seed": args.seed, "calib_text": args.calib_text}
    if name == "int8":
        return q.Int8WeightOnlyConfig()
    if name == "w8a8":
        return q.W8A8Config(alpha=args.alpha, **calib)
    if name == "fp8":
        return q.FP8Config()
    if name.startswith("int4"):
        algo = name.removeprefix("int4").lstrip("-") or "rtn"
        act_order = algo.endswith("-ao")
        algo = algo.removesuffix("-ao")
        return q.Int4WeightOnlyConfig(group_size=int(group or 128), method=algo,
                                      act_order=act_order, damp=args.damp,
                                      awq_clip=not args.no_awq_clip, **calib)
    raise ValueError(f"unknown method {method!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="infopt model name or local HF dir")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--calib-samples", type=int, default=_CALIB_DEFAULTS["calib_samples"],
                   help="calibration windows (default: the library's)")
    p.add_argument("--calib-seq-len", type=int, default=_CALIB_DEFAULTS["calib_seq_len"],
                   help="tokens per calibration window (default: the library's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-text", default=_CALIB_DEFAULTS["calib_text"],
                   choices=q.config.CALIB_TEXTS)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ Hessian damping")
    p.add_argument("--no-awq-clip", action="store_true", help="AWQ: skip the clip-ratio search")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()

    from infopt.models import load_model

    model, tok = load_model(args.model, dtype=torch.float32)
    model.eval()
    calib = q.calibration_ids(tok, args.calib_samples, args.calib_seq_len, args.seed,
                              args.calib_text)
    print(f"model={args.model} fp32 | calibration: {args.calib_text}, {args.calib_samples} x "
          f"{args.calib_seq_len} tokens, seed {args.seed} | evaluation: Lee news corpus, first "
          f"{args.eval_tokens} tokens, windows of {args.window}")
    header = f"{'method':<18} {'ppl':>8} {'d_ppl':>8} {'KL':>8} {'top1':>7} {'quant s':>8}"
    print(header)
    rows = []
    for method in args.methods.split(","):
        cfg = make_config(method.strip(), args)
        t0 = time.perf_counter()
        qmodel = q.quantize_model(copy.deepcopy(model), cfg, calib_input_ids=calib)
        secs = time.perf_counter() - t0
        r = compare(model, qmodel, tok, max_tokens=args.eval_tokens, window=args.window,
                    prompts=[])
        if not rows:
            print(f"{'fp32':<18} {r.ppl_ref:8.3f} {'':>8} {'':>8} {'':>7} {'':>8}")
        row = {"method": method, "ppl_fp32": r.ppl_ref, "ppl": r.ppl_cand,
               "ppl_rel_increase": r.ppl_rel_increase, "kl_mean": r.kl_mean,
               "top1_agreement": r.top1_agreement, "quantize_seconds": secs,
               "config": cfg.to_dict()}
        rows.append(row)
        print(f"{method:<18} {r.ppl_cand:8.3f} {100 * r.ppl_rel_increase:+7.2f}% "
              f"{r.kl_mean:8.4f} {r.top1_agreement:7.4f} {secs:8.1f}", flush=True)
        del qmodel
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
