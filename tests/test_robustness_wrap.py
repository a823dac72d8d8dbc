"""Configs validated at construction, options checked before any is applied, and
``wrap_model`` applying all or nothing (issue 24, item 7). Tiny random models."""

import dataclasses

import pytest
import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import infopt
import infopt.quant as q
import infopt.speculative as sp
from infopt import api, options
from infopt.config import InfoptConfig, register_config
from infopt.kvcache import KVConfig, KVMemoryError, KVPool

IDS = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(3))


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


# --------------------------------------------------------------- configs fail at construction


@pytest.mark.parametrize("make,match", [
    (lambda: q.Int4WeightOnlyConfig(group_size=128.0), r"group_size must be one of .*128\.0"),
    (lambda: q.Int4WeightOnlyConfig(group_size=True), r"group_size must be one of"),
    (lambda: sp.PromptLookupConfig(max_ngram=0), r"max_ngram must be an int >= 1, got 0"),
    (lambda: sp.PromptLookupConfig(max_ngram=2, min_ngram=3), r"min_ngram must be None or an"),
    (lambda: sp.LayerSkipConfig(skip=(-1,)), r"skip must be a tuple of decoder layer indices"),
    (lambda: sp.LayerSkipConfig(skip=(0,)), r"layer 0 is always kept"),
    (lambda: sp.LayerSkipConfig(skip=(2.0,)), r"skip must be a tuple"),
    (lambda: sp.LayerSkipConfig(skip_every=False), r"skip_every must be 0"),
    (lambda: sp.PromptLookupConfig(adaptive="yes"), r"adaptive must be a bool"),
    (lambda: sp.DraftModelConfig(dtype="Tensor"), r"dtype must be None or one of"),
    (lambda: sp.DraftModelConfig(draft_model=""), r"draft_model must be a non-empty string"),
])
def test_bad_configs_fail_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_config_dicts_are_validated_too():
    d = sp.LayerSkipConfig(skip=(1,)).to_dict()
    assert InfoptConfig.from_dict(d) == sp.LayerSkipConfig(skip=(1,))  # list -> tuple
    d["fields"]["skip"] = [-3]
    with pytest.raises(ValueError, match="skip must be"):
        InfoptConfig.from_dict(d)


def test_huge_kv_pool_fails_before_allocation():
    model = tiny_llama()
    with pytest.raises(KVMemoryError, match=r"needs \d+ bytes .* but only \d+ bytes .* available"):
        infopt.wrap_model(model, kv=KVConfig(num_blocks=10**9))
    assert "generate" not in model.__dict__
    # The pool itself refuses too (PagedCache.from_model and the engine build one directly).
    with pytest.raises(MemoryError, match=r"a pool of 1000000000 blocks"):
        KVPool(KVConfig(num_blocks=10**9), num_layers=2, num_kv_heads=2, head_dim=16,
               dtype=torch.float32, device="cpu")


# ------------------------------------------------------------ options checked before applying


def test_spec_on_a_module_without_generate_is_a_type_error_at_wrap_time():
    seq = nn.Sequential(nn.Linear(4, 4))
    for spec in ("prompt_lookup", sp.LayerSkipConfig()):
        with pytest.raises(TypeError, match=r"spec=\.\.\. needs a transformers causal LM"):
            infopt.wrap_model(seq, spec=spec)
    assert "generate" not in seq.__dict__
    with pytest.raises(TypeError, match=r"kv=\.\.\. needs a transformers PreTrainedModel"):
        infopt.wrap_model(seq, kv="paged")


def test_calibrated_quant_without_blocks_fails_before_anything_changes():
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    w = seq[0].weight
    with pytest.raises(ValueError, match="needs a stack of repeated blocks"):
        infopt.wrap_model(seq, quant="w8a8")
    assert seq[0].weight is w and isinstance(seq[0], nn.Linear)


def test_layer_skip_beyond_the_model_fails_at_wrap_time():
    model = tiny_llama(layers=3)
    with pytest.raises(ValueError, match=r"layers \[3, 7\] do not exist; .* 3 decoder layers"):
        infopt.wrap_model(model, quant="int8", spec=sp.LayerSkipConfig(skip=(1, 3, 7)))
    assert not q.is_quantized(model)  # the quant option was not applied either


# ------------------------------------------------------------------------ all or nothing


def _state(model):
    return {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_untouched(model, state, ref_out, attn):
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(state)
    for k, (obj, val) in state.items():
        assert now[k] is obj, k  # the very same tensors ...
        assert torch.equal(now[k], val), k  # ... with the same values
    assert not any(isinstance(m, q.QuantizedLinear) for m in model.modules())
    assert "generate" not in model.__dict__ and infopt.applied_configs(model) == []
    assert model.config._attn_implementation == attn
    out = model.generate(IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref_out)


@pytest.fixture
def failing_spec(monkeypatch):
    def boom(self, target):
        raise RuntimeError("draft build failed")

    monkeypatch.setattr(sp.PromptLookupConfig, "build", boom)
    # After kv=..., spec joins the kv engine as a proposer instead of building a draft source.
    import infopt.batching.hf_generate as hfg

    monkeypatch.setattr(hfg, "build_proposer", lambda cfg, *args: boom(cfg, None))


@pytest.mark.parametrize("options", [
    {"quant": "int8"},
    {"quant": "int4"},
    {"kv": "paged"},
    {"quant": "int4-awq"},  # AWQ folds scales into the norms and linears it keeps
])
def test_failing_last_option_leaves_model_untouched(options, failing_spec, tmp_path):
    model = tiny_llama()
    if options.get("quant") == "int4-awq":
        _give_calibration_tokenizer(model, tmp_path)
        options = {"quant": q.Int4WeightOnlyConfig(method="awq", calib_samples=2,
                                                   calib_seq_len=32)}
    attn = model.config._attn_implementation
    ref_out = model.generate(IDS, max_new_tokens=6, do_sample=False)
    state = _state(model)
    with pytest.raises(RuntimeError, match="draft build failed"):
        infopt.wrap_model(model, spec="prompt_lookup", **options)
    _assert_untouched(model, state, ref_out, attn)
    # ... and the model still wraps fine afterwards.
    infopt.wrap_model(model, **options)
    assert [a["option"] for a in infopt.applied_configs(model)] == list(options)


def _give_calibration_tokenizer(model, tmp_path):
    """A word-level tokenizer saved in the model's name_or_path, so AWQ finds calibration text."""
    words = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "on", "was", "with",
             "he", "it", "as", "at", "by", "said", "from", "his"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    model.config.name_or_path = str(tmp_path)


def test_in_place_write_by_a_failing_handler_is_reported(monkeypatch):
    api.load_builtin_options()
    monkeypatch.setattr(options, "_OPTIONS", dict(options._OPTIONS))
    monkeypatch.setattr(options, "_HANDLERS", dict(options._HANDLERS))

    @register_config
    @dataclasses.dataclass(frozen=True)
    class _ScribbleConfig(InfoptConfig):
        pass

    api.register_option("scribble", _ScribbleConfig, {"on": _ScribbleConfig})

    @api.register_handler(_ScribbleConfig)
    def _apply(model, cfg):
        with torch.no_grad():
            model.model.norm.weight.mul_(2.0)
        raise ValueError("half-way")

    with pytest.raises(RuntimeError, match=r"model\.norm\.weight.*could not be restored"):
        infopt.wrap_model(tiny_llama(), scribble="on")
