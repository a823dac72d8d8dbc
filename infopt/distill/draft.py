"""DistillSpec: distill a speculative-decoding draft toward its target, then measure.

The draft is a layer-truncated copy of the target (:func:`~.recipes.layer_truncated`), the
target itself on the int4 grid, or a smaller model of the same tokenizer (``--draft model
--draft-model NAME``, e.g. Qwen2.5-Coder-0.5B for the 1.5B target), optionally trained
through LoRA adapters (``--lora-rank``) and on the int4 grid (``--int4-draft``).
Training is on-policy (``lmbda=1``: the draft samples continuations of training prompts and
the target scores every token), as DistillSpec recommends; the divergence follows the
decoding mode: greedy verification accepts a draft token when the argmaxes agree, which
forward KL (mass-covering, and the target's mode gets the most weight) serves; for
sampling, acceptance is ``1 - TVD(p, q)`` per token, so ``loss="tvd"`` is the direct choice.
``--teacher-data N`` trains on the target's own greedy continuations instead (sequence-level
KD, :func:`target_samples`): under greedy verification every accepted token is the target's,
so these are exactly the contexts the draft is asked to continue.

``python -m infopt.distill.draft`` runs the whole experiment on the default model and prints
acceptance and speedup of the undistilled and the distilled draft on held-out prompts.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .config import DistillConfig
from .data import (
    DistillData,
    _pad_id,
    sampled_batch,
    teacher_generate,
    token_windows,
    training_text,
)
from .recipes import layer_truncated
from .trainer import distill

__all__ = ["accepted_per_step", "draft_quality", "draft_samples", "greedy_acceptance",
           "heldout_prompts", "int4_draft", "measure_speculative", "target_samples"]

#: Lee articles the held-out prompts and the prose evaluation come from (training uses
#: :data:`~.data.TRAIN_ARTICLES`, which starts after them)
HELDOUT_ARTICLES = slice(0, 40)
#: how many held-out articles (and distinct held-out prompts) there are
N_HELDOUT = HELDOUT_ARTICLES.stop - HELDOUT_ARTICLES.start


def heldout_prompts(tokenizer: Any, n: int = 8, n_words: int = 24) -> list[torch.Tensor]:
    """Prompts ``[1, P]`` from Lee articles 0-39 (never in :data:`~.data.TRAIN_ARTICLES`)."""
    from ..eval.texts import lee_articles

    arts = lee_articles()[HELDOUT_ARTICLES]
    picks = [arts[i * len(arts) // n] for i in range(n)]
    return [torch.tensor([tokenizer(" ".join(a.split()[:n_words]))["input_ids"]])
            for a in picks]


@torch.inference_mode()
def measure_speculative(target: nn.Module, drafts: dict[str, nn.Module],
                        prompts: Sequence[torch.Tensor], max_new_tokens: int = 64,
                        num_draft_tokens: int = 4, repeats: int = 2) -> dict[str, Any]:
    """Greedy decode every prompt with the target alone and with each draft.

    Returns per row: wall seconds (best of ``repeats``, summed over prompts), speedup over the
    target alone, acceptance rate, mean accepted length, and whether every output equals the
    target's own greedy output token for token.
    """
    from .. import speculative as sp

    def plain(ids: torch.Tensor) -> torch.Tensor:
        return target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                               pad_token_id=0)

    # Interleaved per prompt (target, then each draft, repeated) so a change in machine load
    # hits every row alike instead of whichever row happened to run then.
    secs = dict.fromkeys(["target", *drafts], 0.0)
    same = dict.fromkeys(drafts, True)
    stats: dict[str, Any] = dict.fromkeys(drafts)
    for ids in prompts:
        best = dict.fromkeys(secs, float("inf"))
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref = plain(ids)
            best["target"] = min(best["target"], time.perf_counter() - t0)
            for name, draft in drafts.items():
                t0 = time.perf_counter()
                res = sp.generate(target, ids, draft, max_new_tokens,
                                  min_new_tokens=max_new_tokens,
                                  num_draft_tokens=num_draft_tokens)
                best[name] = min(best[name], time.perf_counter() - t0)
                same[name] &= torch.equal(res.sequences, ref)
                if stats[name] is None:
                    stats[name] = res.stats
                else:
                    stats[name].merge(res.stats)
        for name in secs:
            secs[name] += best[name]
    rows: dict[str, Any] = {"target": {"seconds": secs["target"], "speedup": 1.0}}
    for name in drafts:
        st = stats[name]
        rows[name] = {"seconds": secs[name], "speedup": secs["target"] / secs[name],
                      "identical": same[name], "acceptance_rate": st.acceptance_rate,
                      "mean_accepted_length": st.mean_accepted_length}
    return rows


def heldout_prose_tokens(tokenizer: Any) -> int:
    """How many tokens of the ``prose`` evaluation domain lie in the held-out articles (the
    domain is the Lee corpus from article 0, so its first tokens are never trained on)."""
    from ..eval.texts import lee_articles

    text = "\n".join(lee_articles()[HELDOUT_ARTICLES])
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def accepted_per_step(agree: Sequence[torch.Tensor], k: int) -> float:
    """Mean draft tokens greedy verification accepts per target step with ``k`` draft tokens,
    replayed from agreement rows (bool ``[T_i]``: the draft's argmax equals the target's greedy
    token at each position of the target's own continuation). A step accepts the run of
    agreeing positions (at most ``k``); the target then writes the next token itself (the
    correction, or the bonus token after ``k`` accepted)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tot = steps = 0
    for row in agree:
        g = row.tolist()
        j = 0
        while j < len(g):
            n = 0
            while n < k and j + n < len(g) and g[j + n]:
                n += 1
            tot, steps, j = tot + n, steps + 1, j + n + 1
    return tot / max(steps, 1)


@torch.no_grad()
def greedy_acceptance(target: nn.Module, drafts: dict[str, nn.Module], tokenizer: Any,
                      n_prompts: int = 40, new_tokens: int = 48,
                      ks: Sequence[int] = (1, 2, 3, 4, 6)) -> dict[str, dict[str, Any]]:
    """Greedy acceptance on many held-out prompts without timing each: the target writes its
    greedy continuation of ``n_prompts`` held-out prompts (batching engine), each draft scores
    it in one teacher-forced forward, and :func:`accepted_per_step` replays verification.
    Every accepted token is the target's, so the draft sees these very prefixes; but the
    teacher-forced forward runs the draft's multi-token kernels and the engine writes the
    continuations, where timed decoding runs single-token steps after HF's greedy output, so
    this is an estimate (measured: 1.100x tokens per step where the timed run gave 1.068x,
    docs/results.md). It costs a few forwards instead of a timed decode per prompt, so the
    sample can be large. Returns ``{draft: {agreement, n_tokens, accepted_per_step: {k:
    mean}}}``."""
    if not 1 <= n_prompts <= N_HELDOUT:
        raise ValueError(f"n_prompts must be in [1, {N_HELDOUT}] (one per held-out article), "
                         f"got {n_prompts}")
    prompts = heldout_prompts(tokenizer, n_prompts)
    data = teacher_generate(target, tokenizer, [p[0].tolist() for p in prompts], new_tokens)
    out: dict[str, dict[str, Any]] = {}
    for name, draft in drafts.items():
        rows = []
        for ids, mask in zip(data.input_ids, data.loss_mask):
            if not mask.any():  # the target wrote EOS first: nothing to propose against
                continue
            end = int(mask.nonzero().max()) + 1
            pred = draft(ids[None, :end]).logits[0, :-1].argmax(-1)
            rows.append((pred == ids[1:end])[mask[1:end]])
        flat = torch.cat(rows)
        out[name] = {"agreement": flat.float().mean().item(), "n_tokens": flat.numel(),
                     "accepted_per_step": {k: accepted_per_step(rows, k) for k in ks}}
    return out


@torch.no_grad()
def draft_quality(target: nn.Module, drafts: dict[str, nn.Module], tokenizer: Any,
                  max_tokens: int = 1024) -> dict[str, dict[str, dict[str, float]]]:
    """Each draft against the target on the prose, code and chat evaluation domains (the
    first ``max_tokens`` tokens of each, :func:`infopt.eval.compare_domains`):
    ``{draft: {domain: {ppl_target, ppl_draft, kl, top1, n_tokens}}}``. Top-1 agreement on
    text is what greedy verification would accept per position if the target had written it
    (acceptance on the target's own continuations can differ); a draft distilled on one
    domain can gain there and lose on the others, which this shows."""
    from ..eval.domains import compare_domains

    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, draft in drafts.items():
        res = compare_domains(target, draft, tokenizer, max_tokens=max_tokens,
                              window=min(512, max_tokens))
        out[name] = {d: {"ppl_target": q.ppl_ref, "ppl_draft": q.ppl_cand, "kl": q.kl_mean,
                         "top1": q.top1_agreement, "n_tokens": q.n_tokens}
                     for d, q in res.items()}
    return out


@torch.no_grad()
def draft_samples(draft: nn.Module, data: DistillData, n: int, prompt_len: int, *,
                  batch_size: int = 16, temperature: float = 1.0, seed: int = 0) -> DistillData:
    """``n`` sequences the *draft* writes: the first ``prompt_len`` tokens of ``data``'s
    windows (cycled) continued by ``draft`` sampling at ``temperature`` to the windows' length.
    The loss mask covers the sampled tokens only. Sampling these once with the draft's fast
    inference weights (e.g. int4 kernels) stands in for re-sampling every step with the
    training copy: the draft's own distribution, at a fraction of the cost, lagging the
    student by its training so far (GKD's on-policy data with a stale policy)."""
    ids = data.input_ids
    if not 0 < prompt_len < ids.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {ids.shape[1] - 1}], got {prompt_len}")
    prompts = ids[torch.arange(n) % ids.shape[0], :prompt_len]
    torch.manual_seed(seed)
    parts = [sampled_batch(draft, prompts[i: i + batch_size], ids.shape[1] - prompt_len,
                           temperature=temperature) for i in range(0, n, batch_size)]
    return DistillData(torch.cat([b.input_ids for b in parts]),
                       torch.cat([b.loss_mask for b in parts]))


@torch.no_grad()
def target_samples(target: nn.Module, tokenizer: Any, n: int, prompt_len: int, seq_len: int, *,
                   max_num_seqs: int = 32) -> DistillData:
    """``n`` sequences the *target* writes greedily through the batching engine: distinct
    ``prompt_len``-token windows of the training text continued to ``seq_len`` tokens
    (sequence-level KD). Greedy speculative decoding always conditions the draft on the
    target's own greedy output, so these are the contexts where acceptance is decided. Rows
    that reach EOS early are padded; the loss mask covers the generated tokens only."""
    windows = token_windows(tokenizer, training_text(), prompt_len).input_ids
    if not 0 < n <= windows.shape[0]:
        raise ValueError(f"n must be in [1, {windows.shape[0]}] (distinct {prompt_len}-token "
                         f"prompts in the training text), got {n}")
    if not 0 < prompt_len < seq_len:
        raise ValueError(f"prompt_len must be in [1, {seq_len - 1}], got {prompt_len}")
    # evenly spaced windows so the prompts cover every training article, not the first few
    picks = windows[torch.arange(n) * windows.shape[0] // n]
    data = teacher_generate(target, tokenizer, picks.tolist(), seq_len - prompt_len,
                            max_num_seqs=max_num_seqs)
    ids, mask = data.input_ids, data.loss_mask
    if ids.shape[1] < seq_len:  # every row stopped early: pad to the promised width
        pad = seq_len - ids.shape[1]
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), _pad_id(target, tokenizer))], 1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1)
    return DistillData(ids, mask)


def int4_draft(model: nn.Module, group_size: int = 128) -> nn.Module:
    """``model`` (fp, or a fake-quantized student) as a fast int4 draft, in place: merged and
    rounded to int4 RTN on its training grid (:func:`~.student_linear.export_int4`), int8
    activations per 32-block, and the output head int8 weight-only."""
    from ..quant import Int4Linear, Int8Linear
    from .student_linear import export_int4

    export_int4(model, group_size)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.act_dtype = "int8"
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear.from_linear(head))
    return model


def main(argv: Sequence[str] | None = None) -> int:
    from ..models import load_model

    p = argparse.ArgumentParser(prog="python -m infopt.distill.draft",
                                description="DistillSpec: distill a draft toward its target, then "
                                "measure speculative decoding with both drafts")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft", choices=("layers", "int4", "model"), default="layers",
                   help="layers: a layer-truncated copy of the target (--keep); int4: the "
                   "target itself on the int4 g128 grid (trained with fake quantization, run "
                   "as int4 weights x int8 activations with an int8 head); model: the smaller "
                   "model --draft-model (same tokenizer as the target)")
    p.add_argument("--draft-model", default=None,
                   help="with --draft model: registry name or local dir of the draft")
    p.add_argument("--int4-draft", action="store_true",
                   help="train the draft on the int4 g128 grid and run both drafts as int4 "
                   "(implied by --draft int4)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train rank-r LoRA adapters on the draft's *_proj linears instead of "
                   "its weights (0: full training)")
    p.add_argument("--keep", default=None,
                   help="with --draft layers: target layers the draft keeps, comma-separated "
                   "(default: the first six and the last)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--loss", default="forward_kl")
    p.add_argument("--lmbda", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="training autocast dtype (bf16: AMX / tensor-core matmuls; sampling "
                   "and the measurement stay fp32)")
    p.add_argument("--trainable", default=None,
                   help="full training only: comma-separated glob patterns of the draft "
                   "parameters to train (default: all but the embeddings), e.g. "
                   "'*o_proj*,*down_proj*' to fit the optimizer state of a large draft in memory")
    p.add_argument("--draft-data", type=int, default=0,
                   help="train on N sequences the undistilled draft samples once, up front, "
                   "from training prompts (its fast inference weights; --lmbda then applies "
                   "to those) instead of on the training text (0: off)")
    p.add_argument("--teacher-data", type=int, default=0,
                   help="train on N sequences the target writes greedily from distinct "
                   "training prompts (through the batching engine) instead of on the training "
                   "text: the contexts greedy speculation conditions the draft on (0: off)")
    p.add_argument("--chunk-size", type=int, default=64,
                   help="positions per chunk of the loss: at most [batch, chunk, vocab] logits "
                   "exist at once (Qwen's vocabulary is 152k)")
    p.add_argument("--eval-tokens", type=int, default=1024,
                   help="quality of both drafts against the target (KL, top-1, perplexity) on "
                   "the first N tokens of the prose, code and chat domains; prose is held-out "
                   "news, code and chat are outside the training text (0: skip)")
    p.add_argument("--accept-prompts", type=int, default=40,
                   help="replayed greedy acceptance (greedy_acceptance) of both drafts on the "
                   "target's continuations of N held-out prompts: a larger sample than the "
                   "timed --prompts (0: skip)")
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None, help="save the distilled draft here (load_model)")
    args = p.parse_args(argv)
    if (args.draft == "model") != (args.draft_model is not None):
        p.error("--draft-model NAME is required with --draft model and accepted only with it")
    if args.keep is not None and args.draft != "layers":
        p.error(f"--keep applies to --draft layers only, got --draft {args.draft}")
    if args.lora_rank < 0:
        p.error(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.draft_data < 0:
        p.error(f"--draft-data must be >= 0, got {args.draft_data}")
    if args.teacher_data < 0:
        p.error(f"--teacher-data must be >= 0, got {args.teacher_data}")
    if args.teacher_data and args.draft_data:
        p.error("--teacher-data and --draft-data each replace the training text; give one")
    if args.trainable is not None and args.lora_rank:
        p.error("--trainable selects weights for full training; with --lora-rank the adapters "
                "are what trains")
    if not 0 <= args.accept_prompts <= N_HELDOUT:
        p.error(f"--accept-prompts must be in [0, {N_HELDOUT}] (one per held-out article), "
                f"got {args.accept_prompts}")
    if args.eval_tokens < 0:
        p.error(f"--eval-tokens must be >= 0, got {args.eval_tokens}")
    int4 = args.draft == "int4" or args.int4_draft

    target, tok = load_model(args.model, dtype=torch.float32)
    if args.eval_tokens > (limit := heldout_prose_tokens(tok)):
        p.error(f"--eval-tokens must be <= {limit} (the held-out articles' length in this "
                f"model's tokens), got {args.eval_tokens}")
    cfg = DistillConfig(loss=args.loss, steps=args.steps, batch_size=args.batch_size,
                        lmbda=args.lmbda, prompt_len=args.prompt_len, lr=args.lr,
                        warmup_steps=max(1, args.steps // 10), frozen=("*embed_tokens*",),
                        log_every=10, fake_quant="int4" if int4 else None,
                        lora_rank=args.lora_rank, dtype=args.dtype, chunk_size=args.chunk_size,
                        trainable=(tuple(x for x in args.trainable.split(",") if x)
                                   if args.trainable else ("*",)))
    keep = None
    if args.draft == "model":
        base, _ = load_model(args.draft_model, dtype=torch.float32)
    elif args.draft == "layers":
        from ..speculative.drafts import find_decoder_layers

        n = len(find_decoder_layers(target)[2])
        keep = ([int(x) for x in args.keep.split(",")] if args.keep
                else sorted({*range(min(6, n)), n - 1}))
        base = layer_truncated(target, keep)
    else:  # int4: the target itself
        base = target
    # With int4 the undistilled draft is plain RTN of the starting point (the grid the student
    # starts from), converted before the student is copied: at most two fp32 copies at once.
    if int4 and base is target:
        base = int4_draft(copy.deepcopy(target), cfg.group_size)
        student = copy.deepcopy(target)
    else:
        student = copy.deepcopy(base)
        if int4:
            int4_draft(base, cfg.group_size)
    gen_s = 0.0
    if args.teacher_data:
        t0 = time.perf_counter()
        data = target_samples(target, tok, args.teacher_data, args.prompt_len, args.seq_len)
        gen_s = time.perf_counter() - t0
        print(f"target-generated data: {args.teacher_data} x {args.seq_len} tokens in "
              f"{gen_s:.0f} s", flush=True)
    else:  # the training text itself (and the prompts --draft-data continues)
        data = token_windows(tok, training_text(), args.seq_len)
    if args.draft_data:
        t0 = time.perf_counter()
        data = draft_samples(base, data, args.draft_data, args.prompt_len,
                             temperature=cfg.gen_temperature, seed=cfg.seed)
        gen_s = time.perf_counter() - t0
        print(f"draft-generated data: {args.draft_data} x {args.seq_len} tokens in {gen_s:.0f} s",
              flush=True)
    teacher = target
    if args.dtype == "bf16":
        # Autocast would cast the teacher's fp32 weights to bf16 on every forward; a bf16 copy
        # computes the same bf16 matmuls once cast. The fp32 target is dropped while training
        # (memory: a 1.5B target, its student and the optimizer state) and reloaded to measure.
        teacher = target.to(torch.bfloat16)  # in place: no second copy of the target
        del target
    t0 = time.perf_counter()
    res = distill(student, teacher, data, cfg)
    train_s = time.perf_counter() - t0
    if args.dtype == "bf16":
        del teacher
        target, _ = load_model(args.model, dtype=torch.float32)
    if int4:
        # Both drafts on the grid the student trained on: RTN int4 g128 (the undistilled draft
        # is plain RTN of its starting point), run with int8 activations and an int8 head.
        int4_draft(student, cfg.group_size)
    if args.out and int4:
        from ..quant import save_quantized

        save_quantized(student, args.out)  # load_quantized(out)
        tok.save_pretrained(args.out)
    elif args.out:
        from .trainer import export_student

        export_student(student, tok, args.out)
    prompts = heldout_prompts(tok, args.prompts)
    drafts = {"undistilled": base, "distilled": student}
    rows = measure_speculative(target, drafts, prompts, args.new_tokens, args.draft_tokens)
    quality = (draft_quality(target, drafts, tok, args.eval_tokens) if args.eval_tokens
               else None)
    ks = sorted({1, 2, 3, 4, 6, args.draft_tokens})
    replay = (greedy_acceptance(target, drafts, tok, args.accept_prompts, args.new_tokens, ks)
              if args.accept_prompts else None)
    out = {"model": args.model, "draft": args.draft, "draft_model": args.draft_model,
           "int4": int4, "keep": keep, "config": cfg.to_dict(),
           "train_seconds": train_s, "draft_data": args.draft_data,
           "teacher_data": args.teacher_data, "data_seconds": gen_s,
           "history": res.history, "threads": torch.get_num_threads(), "rows": rows,
           "quality": quality, "replayed_acceptance": replay}
    for name, r in rows.items():
        extra = "" if name == "target" else (
            f"  acceptance {r['acceptance_rate']:.3f}  mean accepted "
            f"{r['mean_accepted_length']:.2f}  identical {r['identical']}")
        print(f"{name:<12} {r['seconds']:7.2f} s  speedup {r['speedup']:.3f}{extra}")
    for name, doms in (quality or {}).items():
        print(f"{name:<12} vs target: " + "  ".join(
            f"{d} KL {q['kl']:.4f} top-1 {q['top1']:.3f} ppl {q['ppl_draft']:.2f}"
            for d, q in doms.items()))
    for name, r in (replay or {}).items():
        print(f"{name:<12} replayed on {args.accept_prompts} prompts: agreement "
              f"{r['agreement']:.3f}, accepted per step " + "  ".join(
                  f"k={k}: {v:.2f}" for k, v in r["accepted_per_step"].items()))
    if replay:
        k = args.draft_tokens
        gain = ((1 + replay["distilled"]["accepted_per_step"][k])
                / (1 + replay["undistilled"]["accepted_per_step"][k]))
        print(f"replayed tokens per target step at k={k}, distilled / undistilled: {gain:.3f}")
    print(f"trained {train_s:.0f} s; distilled / undistilled speedup "
          f"{rows['distilled']['speedup'] / rows['undistilled']['speedup']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
