"""Greedy token identity of ``wrap_model(model, kv="paged")`` vs the unwrapped HF model.

Batch 1 compares against HF's own ``generate`` (DynamicCache + sdpa) prompt by prompt; the batch
test left-pads all prompts into one ``generate`` call and compares every row with HF at batch 1
(the paged kernels never see the padding, so each row must match its unpadded run). Max logit
differences are printed (``pytest -s``). The full sweeps are ``slow`` (run by hand, see
docs/kvcache.md for the last numbers).
"""

from __future__ import annotations

import copy

import pytest
import torch

import infopt
import infopt.kvcache  # noqa: F401  (registers kv=)
from infopt.eval.texts import eval_prompts

NEW_TOKENS = 10
PROMPT_WORDS = (8, 40)  # ~10 and ~50 tokens: short prompts and ones crossing several blocks


def _greedy(model, ids, n, **kw):
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=n,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **kw,
        )
    return out.sequences, torch.stack(out.scores, 1)  # [B, T + n], [B, n, V]


def identity_sweep(name: str, n_prompts: int, batch: bool, block_size: int = 16) -> dict:
    torch.set_num_threads(1)
    model, tok = infopt.load_model(name)
    model.eval()
    paged = infopt.wrap_model(
        copy.deepcopy(model), kv=infopt.kvcache.KVConfig(block_size=block_size)
    )
    prompts = [p for w in PROMPT_WORDS for p in eval_prompts(n_prompts, n_words=w)]
    stats = {"prompts": len(prompts), "mismatches": [], "max_logit_diff": 0.0}
    refs = []
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt").input_ids
        ref, ref_scores = _greedy(model, ids, NEW_TOKENS)
        refs.append((ref[0, ids.shape[1] :], ref_scores[0]))
        out, scores = _greedy(paged, ids, NEW_TOKENS)
        if not torch.equal(out, ref):
            stats["mismatches"].append(("batch1", i))
        else:
            diff = (scores - ref_scores).abs().max().item()
            stats["max_logit_diff"] = max(stats["max_logit_diff"], diff)
    if batch:
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(prompts, return_tensors="pt", padding=True)
        out, scores = _greedy(
            paged,
            enc.input_ids,
            NEW_TOKENS,
            attention_mask=enc.attention_mask,
            pad_token_id=tok.pad_token_id,
        )
        new = out[:, enc.input_ids.shape[1] :]
        for i, (ref_new, ref_scores) in enumerate(refs):
            if not torch.equal(new[i, : len(ref_new)], ref_new):
                stats["mismatches"].append(("batch", i))
            else:
                diff = (scores[i, : len(ref_new)] - ref_scores).abs().max().item()
                stats["max_logit_diff"] = max(stats["max_logit_diff"], diff)
    print(f"\n{name}: {stats}")
    return stats


@pytest.mark.model
def test_smollm2_identity_batch1_and_padded_batch():
    stats = identity_sweep("smollm2-135m", n_prompts=4, batch=True)
    assert stats["mismatches"] == []
    assert stats["max_logit_diff"] < 1e-3


@pytest.mark.slow
def test_smollm2_identity_full_sweep():
    stats = identity_sweep("smollm2-135m", n_prompts=24, batch=True)
    assert stats["mismatches"] == []


@pytest.mark.slow
def test_qwen_coder_identity():
    stats = identity_sweep("qwen2.5-coder-0.5b", n_prompts=10, batch=True)
    assert stats["mismatches"] == []
