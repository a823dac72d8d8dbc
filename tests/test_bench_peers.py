"""The llama.cpp peer row (``infopt.bench.peers``): refused clearly where it cannot run; where
llama-cpp-python is installed and the default model is cached, its logits and greedy tokens
match the fp32 HF model converted from the same GGUF (Q4_1 weights in both; llama.cpp rounds
activations to 8 bits, so agreement is high but not exact)."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from infopt.bench.peers import gguf_for

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def test_gguf_for_refuses_a_model_that_is_not_embedded(tmp_path):
    model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=str(tmp_path)))
    with pytest.raises(ValueError, match="infopt_model.json"):
        gguf_for(model)


@pytest.fixture(scope="module")
def smollm2():
    if not HAVE_LLAMA:
        pytest.skip("llama-cpp-python (an optional peer) is not installed")
    from infopt.models.disk_cache import model_dir

    if not (model_dir("smollm2-135m") / "infopt_model.json").is_file():
        pytest.skip("smollm2-135m is not in the model cache")
    import infopt

    model, tok = infopt.load_model("smollm2-135m", dtype=torch.float32)
    try:
        _, path = gguf_for(model)
    except Exception as e:  # the GGUF comes from PyPI: offline machines skip
        pytest.skip(f"GGUF unavailable: {e}")
    return model, tok, path


def test_llama_cpp_logits_and_greedy_tokens_match_hf(smollm2):
    from infopt.bench.peers import LlamaCppModel

    model, tok, path = smollm2
    peer = LlamaCppModel(path, model, n_threads=2, n_ctx=256)
    ids = tok("The history of Paris begins with a small settlement on an island in the Seine. "
              "Over the centuries it grew into", return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
    got = peer(input_ids=ids).logits
    assert got.shape == ref.shape
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert top1 >= 0.9, top1
    out = peer.generate(ids, max_new_tokens=8, min_new_tokens=8)
    assert out.shape == (1, ids.shape[1] + 8)
    hf = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert (out[0, -8:] == hf[0, -8:]).float().mean().item() >= 0.5


def test_llama_cpp_refuses_a_different_vocabulary(smollm2):
    from infopt.bench.peers import LlamaCppModel

    model, _, path = smollm2
    fake = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=1000),
                                 generation_config=model.generation_config)
    with pytest.raises(ValueError, match="vocabulary"):
        LlamaCppModel(path, fake, n_threads=1, n_ctx=64)
