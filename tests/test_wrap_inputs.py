"""``wrap_model(..., tokenizer=, calib_data=)``: calibration for a model without a local
tokenizer directory (a GGUF-built or in-memory model), and nothing handed in left unused."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import infopt
import infopt.quant as q
from infopt import options

WORDS = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "on", "was", "with"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.config.name_or_path = ""  # as a model built from a GGUF file: no directory
    return model


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


AWQ = q.Int4WeightOnlyConfig(method="awq", calib_samples=2, calib_seq_len=16)
TEXT = " ".join(WORDS * 30)


def _int4_modules(model):
    return [m for m in model.modules() if isinstance(m, q.Int4Linear)]


def test_without_a_tokenizer_awq_is_refused_before_anything_changes():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"tokenizer=tok"):
        infopt.wrap_model(model, quant=AWQ)
    assert not _int4_modules(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tokenizer_through_wrap_model_calibrates_like_quantize_model():
    tok = word_tokenizer()
    wrapped = infopt.wrap_model(tiny_llama(), quant=AWQ, tokenizer=tok, calib_data=TEXT)
    direct = q.quantize_model(tiny_llama(), AWQ, tokenizer=tok, calib_data=TEXT,
                              calib_cache=False)
    a, b = _int4_modules(wrapped), _int4_modules(direct)
    assert a and len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.qweight, y.qweight) and torch.equal(x.scale, y.scale)
    # the calibration data matters: a different text gives different AWQ weights somewhere
    other = infopt.wrap_model(tiny_llama(), quant=AWQ, tokenizer=tok,
                              calib_data=" ".join(reversed(WORDS)) * 40)
    assert any(not torch.equal(x.scale, y.scale) for x, y in zip(a, _int4_modules(other)))


def test_token_id_calib_data_needs_no_tokenizer():
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    model = infopt.wrap_model(tiny_llama(), quant=AWQ, calib_data=ids)
    assert _int4_modules(model)
    out = model(ids).logits
    assert torch.isfinite(out).all()


def test_calib_data_without_a_calibrated_option_is_refused():
    with pytest.raises(ValueError, match=r"calib_data= is used only by a calibrated quant"):
        infopt.wrap_model(tiny_llama(), quant="int4", calib_data=TEXT)
    with pytest.raises(ValueError, match=r"calib_data= is used only"):
        infopt.wrap_model(tiny_llama(), calib_data=TEXT)


def test_inputs_are_scoped_to_the_call():
    infopt.wrap_model(tiny_llama(), quant=AWQ, tokenizer=word_tokenizer(), calib_data=TEXT)
    assert options.wrap_inputs() == options.WrapInputs()


def test_option_names_cannot_shadow_inputs():
    with pytest.raises(ValueError, match=r"'tokenizer' is a wrap_model input"):
        options.register_option("tokenizer", q.QuantConfig, {})
