"""Speculative decoding on real checkpoints: greedy output equals the model's own greedy decode.

``model``-marked tests load the embedded SmolLM2-135M; ``slow`` ones the Qwen2.5-Coder pair.
"""

import pytest
import torch

import infopt
from infopt import speculative as sp


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smollm():
    return infopt.load_model("smollm2-135m")


def _greedy(model, ids, n):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)


@pytest.mark.model
@pytest.mark.parametrize("draft", ["prompt_lookup", "layer_skip"])
def test_smollm_greedy_identical(smollm, draft):
    from infopt.eval import CODE_PROMPTS, eval_prompts

    model, tok = smollm
    for prompt in [*eval_prompts(2), CODE_PROMPTS[0]]:
        ids = tok(prompt, return_tensors="pt").input_ids
        ref = _greedy(model, ids, 24)
        out = sp.generate(model, ids, draft, 24, min_new_tokens=24)
        assert torch.equal(out.sequences, ref), prompt


@pytest.mark.model
def test_smollm_batched_left_padding(smollm):
    from infopt.eval import eval_prompts

    model, tok = smollm
    prompts = eval_prompts(3, n_words=8)
    rows = [tok(p, return_tensors="pt").input_ids for p in prompts]
    plen = max(r.shape[1] for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), plen), pad)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, plen - r.shape[1]:] = r[0]
        mask[b, plen - r.shape[1]:] = 1
    out = sp.generate(model, ids, "prompt_lookup", 16, attention_mask=mask, min_new_tokens=16)
    for b, r in enumerate(rows):
        assert out.sequences[b, plen:].tolist() == _greedy(model, r, 16)[0, r.shape[1]:].tolist()


@pytest.mark.model
def test_smollm_wrap_model_layer_skip(smollm):
    model, tok = smollm
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = _greedy(model, ids, 12)
    infopt.wrap_model(model, spec="layer_skip")
    try:
        assert torch.equal(_greedy(model, ids, 12), ref)
        assert sp.last_stats(model).target_forwards <= 12
    finally:  # the model is shared with the other tests of this module
        sp.detach(model)
        model.__dict__.pop(infopt.api.STATE_ATTR, None)


@pytest.mark.slow
def test_qwen_coder_draft_model_identical():
    from infopt.eval import CODE_PROMPTS

    target, tok = infopt.load_model("qwen2.5-coder-1.5b")
    draft, _ = infopt.load_model("qwen2.5-coder-0.5b")
    ids = tok(CODE_PROMPTS[0], return_tensors="pt").input_ids
    ref = _greedy(target, ids, 24)
    out = sp.generate(target, ids, draft, 24, min_new_tokens=24)
    assert torch.equal(out.sequences, ref)
    assert out.stats.acceptance_rate > 0.3
