"""The composition matrix on the default model (SmolLM2-135M, fp32 weights): {none, int8, int4}
x {none, paged, paged-prefix, paged-int8} x {none, prompt-lookup, layer-skip, draft model}
through one ``wrap_model`` and ``model.generate`` on a left-padded batch of two prompts. Exact
techniques give the tokens of the model without them (with quant: the quant-only model's; with
the lossy int8 KV pool: the same pool without speculation). The tiny-model version of this
matrix is ``test_compose_matrix.py``."""

from __future__ import annotations

import copy

import pytest
import torch

import infopt
from infopt.batching import model_engine
from infopt.speculative.config import DraftModelConfig

pytestmark = pytest.mark.model

MODEL = "smollm2-135m"
NEW = 10
TEXTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The cat sat on the mat. The dog sat on the",
]


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    model, tok = infopt.load_model(MODEL, dtype=torch.float32)
    tok.padding_side = "left"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    return model, tok, enc


@pytest.fixture(scope="module")
def quantized(base):
    """The quant-only models (quantized once; each case wraps a copy)."""
    model = base[0]
    return {q: (copy.deepcopy(model) if q is None
                else infopt.wrap_model(copy.deepcopy(model), quant=q))
            for q in (None, "int8", "int4")}


def generate(model, enc):
    out = model.generate(**enc, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         pad_token_id=enc["input_ids"][0, 0].item())
    return out[:, enc["input_ids"].shape[1]:]


@pytest.fixture(scope="module")
def reference(base, quantized):
    enc = base[2]
    cache = {}

    def get(quant, kv):
        if (quant, kv) not in cache:
            m = copy.deepcopy(quantized[quant])
            if kv is not None:
                infopt.wrap_model(m, kv=kv)
            cache[quant, kv] = generate(m, enc)
        return cache[quant, kv]

    return get


def spec_option(name):
    # the draft: the model itself, loaded again by name (every draft token is accepted)
    return DraftModelConfig(MODEL, num_draft_tokens=3, stop_confidence=None) \
        if name == "draft" else name


@pytest.mark.parametrize("spec", [None, "prompt-lookup", "layer-skip", "draft"])
@pytest.mark.parametrize("kv", [None, "paged", "paged-prefix", "paged-int8"])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_default_model_matrix(quant, kv, spec, base, quantized, reference):
    if kv is None and spec is None:
        pytest.skip("the reference itself")
    enc = base[2]
    want = reference(quant, "paged-int8" if kv == "paged-int8" else None)
    model = copy.deepcopy(quantized[quant])
    infopt.wrap_model(model, kv=kv, spec=spec_option(spec))
    got = generate(model, enc)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    if kv is not None and spec is not None:
        assert model_engine(model).proposer is not None  # one generation loop: the engine's
