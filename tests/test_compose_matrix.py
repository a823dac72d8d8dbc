"""Every option composes in one ``wrap_model``: {none, int8, int4} x {none, paged, paged-prefix,
paged-int8} x {none, prompt-lookup, layer-skip, draft model}, plus the compiled decode step on
top, on a tiny random Llama with a padded batch. Exact techniques (paged, paged-prefix, every
speculation source, compile) give output token-identical to the model without them: with quant,
to the quant-only model; with the lossy int8 KV pool, to the same kv without speculation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import infopt
from infopt.batching import model_engine
from infopt.speculative.config import DraftModelConfig

VOCAB = 64


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, eos_token_id=None,
                      bos_token_id=1)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A tiny draft (other weights, same vocabulary) saved with a word-level tokenizer, so
    ``DraftModelConfig(path)`` loads it like any local checkpoint."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("draft")
    tiny(seed=11, layers=1).save_pretrained(d)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0").save_pretrained(d)
    return str(d)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    unit = torch.randint(2, VOCAB, (5,), generator=g).tolist()
    rows = [unit * 4, [0, 0, 0] + unit[::-1] * 3 + unit[:2]]  # the second row left-padded
    ids = torch.tensor(rows)
    return ids, (ids != 0).long()


def generate(model, n=12):
    ids, mask = batch()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return out[:, ids.shape[1]:]


def spec_option(name, draft_dir):
    return DraftModelConfig(draft_dir, stop_confidence=None, num_draft_tokens=3) \
        if name == "draft" else name


@pytest.mark.parametrize("spec", [None, "prompt-lookup", "layer-skip", "draft"])
@pytest.mark.parametrize("kv", [None, "paged", "paged-prefix", "paged-int8"])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_every_combination_matches_the_model_without_the_exact_options(quant, kv, spec,
                                                                        draft_dir):
    # The reference keeps what changes the numbers (quant; the int8 KV pool) and drops
    # what must not (paged layout, prefix reuse, speculation).
    ref_kv = "paged-int8" if kv == "paged-int8" else None
    want = generate(infopt.wrap_model(tiny(), quant=quant, kv=ref_kv))
    model = infopt.wrap_model(tiny(), quant=quant, kv=kv, spec=spec_option(spec, draft_dir))
    assert torch.equal(generate(model), want)
    applied = [a["option"] for a in infopt.applied_configs(model)]
    assert applied == [o for o, v in (("quant", quant), ("kv", kv), ("spec", spec)) if v]
    if kv is not None and spec is not None:  # one generation loop: the engine's
        assert model_engine(model).proposer is not None


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_the_full_stack_with_the_compiled_decode_step(quant, draft_dir):
    want = generate(infopt.wrap_model(tiny(), quant=quant))
    for spec in ("prompt-lookup", spec_option("draft", draft_dir)):
        model = infopt.wrap_model(tiny(), quant=quant, kv="paged-prefix", spec=spec,
                                  compile=True)
        assert torch.equal(generate(model), want)
        assert model_engine(model).runner.compiled.num_compiled_steps > 0


@pytest.mark.parametrize("kv", [None, "paged"])
def test_layer_skip_on_a_hybrid_sliding_window_model(kv):
    """Gemma 3 (sliding and full layers): the skipped-layer draft keeps each kept layer's own
    index, in the engine's draft pool and in the non-engine draft cache alike."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    def build():
        torch.manual_seed(0)
        cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, sliding_window=6, sliding_window_pattern=2,
                               max_position_embeddings=256, pad_token_id=0, eos_token_id=None,
                               bos_token_id=1)  # fmt: skip
        m = Gemma3ForCausalLM(cfg).eval()
        m.generation_config.pad_token_id = 0
        m.generation_config.eos_token_id = None
        return m

    ids = torch.tensor([list(range(2, 12)) * 3])
    want = build().generate(ids, max_new_tokens=14, min_new_tokens=14, do_sample=False)
    model = infopt.wrap_model(build(), kv=kv, spec="layer-skip")
    got = model.generate(ids, max_new_tokens=14, min_new_tokens=14, do_sample=False)
    assert torch.equal(got, want)
