"""Quantization where users touch it: non-finite weights, tampered or damaged checkpoints,
configs that disagree with the checkpoint (issue 24, items 3, 5 and 6). Tiny random models."""

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import infopt
import infopt.quant as q
from infopt.quant.serialization import WEIGHTS_NAME, CheckpointError

IDS = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(6))
CALIB = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(5))
DOWN = "model.layers.0.mlp.down_proj"


def tiny_llama(seed: int = 0, tie: bool = True, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    rotary = {k: v.clone() for k, v in model.model.rotary_emb._buffers.items()}
    model.to(dtype)
    # As from_pretrained(dtype=bf16) leaves them: the rotary frequencies stay fp32.
    model.model.rotary_emb._buffers.update(rotary)
    return model.eval()


def _poisoned(value: float) -> LlamaForCausalLM:
    model = tiny_llama()
    with torch.no_grad():
        model.get_submodule(DOWN).weight[3, 5] = value
    return model


# ------------------------------------------------------------------ item 3: non-finite weights


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("alias", ["int8", "int4", "fp8"])
def test_wrap_refuses_non_finite_weights_and_changes_nothing(alias, value):
    model = _poisoned(value)
    # Without the check the fp model's NaN logits become finite after quantization.
    with torch.no_grad():
        assert not torch.isfinite(model(IDS).logits).all()
    with pytest.raises(ValueError, match=rf"{DOWN}\.weight has 1 non-finite value"):
        infopt.wrap_model(model, quant=alias)
    assert not q.is_quantized(model) and infopt.applied_configs(model) == []


@pytest.mark.parametrize("alias", ["int4-awq", "int4-gptq", "w8a8"])
def test_calibrated_methods_refuse_non_finite_weights(alias):
    with pytest.raises(ValueError, match=rf"{DOWN}\.weight has 1 non-finite"):
        q.quantize_model(_poisoned(float("nan")), alias, calib_input_ids=CALIB, progress=False)


def test_non_finite_check_can_be_switched_off():
    model = q.quantize_model(_poisoned(float("inf")), "int8", check_finite=False)
    assert q.is_quantized(model)


def test_lm_head_int8_is_checked_too():
    model = tiny_llama(tie=False)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"lm_head\.weight has 1 non-finite"):
        q.quantize_model(model, q.Int8WeightOnlyConfig(lm_head="int8"))


# --------------------------------------------------------------------- checkpoint tampering


def _saved(tmp_path, alias="int4-head-fp32", tie=True, dtype=torch.float32):
    model = tiny_llama(tie=tie, dtype=dtype)
    q.quantize_model(model, alias, calib_input_ids=CALIB, progress=False)
    q.save_quantized(model, tmp_path)
    return model, tmp_path / WEIGHTS_NAME


def _rewrite(path, tensors=None, meta=None):
    """Re-save ``path`` with its tensors / metadata edited by the given functions."""
    with safe_open(str(path), framework="pt") as f:
        md = dict(f.metadata())
    state = load_file(str(path))
    if tensors is not None:
        tensors(state)
    if meta is not None:
        meta(md)
    save_file(state, str(path), metadata=md)


def _edit_json_field(field, fn):
    def edit(md):
        md[field] = json.dumps(fn(json.loads(md[field])))

    return edit


def _load_error(tmp_path, match, **kw):
    with pytest.raises(CheckpointError, match=match) as info:
        q.load_quantized(tmp_path, **kw)
    return str(info.value)


def test_nan_scale_and_weight_detected_on_load(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite(path, tensors=lambda s: s[f"{DOWN}.scale"].__setitem__((0, 0), float("nan")))
    msg = _load_error(tmp_path, rf"tensor '{DOWN}\.scale'")
    assert str(path) in msg


def test_inf_in_unquantized_parameter_detected_and_opt_out(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite(path, tensors=lambda s: s["model.norm.weight"].__setitem__(0, float("inf")))
    _load_error(tmp_path, r"'model\.norm\.weight' has 1 non-finite value")
    loaded = q.load_quantized(tmp_path, check_finite=False)
    assert torch.isinf(loaded.model.norm.weight).any()


def test_serialization_version_must_be_an_integer(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite(path, meta=lambda md: md.__setitem__("infopt_serialization_version", "abc"))
    msg = _load_error(tmp_path, r"'infopt_serialization_version' must be a positive integer")
    assert str(path) in msg and "'abc'" in msg


def test_non_json_metadata_names_the_field(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite(path, meta=lambda md: md.__setitem__("infopt_quant_modules", "{not json"))
    _load_error(tmp_path, r"field 'infopt_quant_modules' is not valid JSON")


def test_non_json_config_names_the_file(tmp_path):
    _saved(tmp_path)
    (tmp_path / "config.json").write_text("{ this is not json")
    msg = _load_error(tmp_path, r"config\.json: not a readable JSON file")
    assert str(tmp_path / "config.json") in msg


def test_alias_to_missing_tensor(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite(path, meta=_edit_json_field(
        "infopt_aliases", lambda a: {**a, "lm_head.weight": "model.nonexistent.weight"}))
    _load_error(tmp_path, r"'infopt_aliases' maps 'lm_head\.weight' to 'model\.nonexistent")


def test_alias_may_not_overwrite_a_stored_tensor(tmp_path):
    _, path = _saved(tmp_path)
    # Same shape as the target, so only the alias rule can catch it (wrong logits otherwise).
    bad = {"model.layers.0.input_layernorm.weight": "model.norm.weight"}
    _rewrite(path, meta=_edit_json_field("infopt_aliases", lambda a: {**a, **bad}))
    _load_error(tmp_path, r"'infopt_aliases' maps 'model\.layers\.0\.input_layernorm\.weight'")


@pytest.mark.parametrize("dtype", ["torch.Tensor", "float32", "torch.int8", 3])
def test_bias_dtype_comes_from_a_fixed_table(tmp_path, dtype):
    _, path = _saved(tmp_path)

    def edit(mods):
        mods[DOWN]["bias_dtype"] = dtype
        return mods

    _rewrite(path, meta=_edit_json_field("infopt_quant_modules", edit))
    msg = _load_error(tmp_path, rf"'infopt_quant_modules'\['{DOWN}'\]\.bias_dtype: must be one")
    assert "torch.bfloat16" in msg  # the accepted values are listed


@pytest.mark.parametrize("field,value", [("in_features", 64.0), ("group_size", 48),
                                         ("act_dtype", "fp4"), ("has_in_scale", "yes"),
                                         ("format", "int3"), ("extra", 1)])
def test_module_spec_fields_are_validated(tmp_path, field, value):
    _, path = _saved(tmp_path)

    def edit(mods):
        mods[DOWN][field] = value
        return mods

    _rewrite(path, meta=_edit_json_field("infopt_quant_modules", edit))
    _load_error(tmp_path, rf"'infopt_quant_modules'\['{DOWN}'\]\.")


def test_int4_zero_points_out_of_range(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite(path, tensors=lambda s: s[f"{DOWN}.zero"].__setitem__((0, 0), 200))
    _load_error(tmp_path, rf"tensor '{DOWN}\.zero' has int4 zero points above 15 \(max 200\)")


def test_negative_scale_and_fp8_nan_codes(tmp_path):
    _, path = _saved(tmp_path / "a")
    _rewrite(path, tensors=lambda s: s[f"{DOWN}.scale"].__setitem__((0, 0), -1.0))
    _load_error(tmp_path / "a", r"scales <= 0")
    _, path = _saved(tmp_path / "b", alias="fp8")
    _rewrite(path, tensors=lambda s: s[f"{DOWN}.weight_fp8"].__setitem__((0, 0), 0x7F))
    _load_error(tmp_path / "b", r"weight_fp8' holds fp8 NaN codes")


def test_quantized_buffer_dtype_is_checked(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite(path, tensors=lambda s: s.__setitem__(f"{DOWN}.zero", s[f"{DOWN}.zero"].int()))
    _load_error(tmp_path, rf"'{DOWN}\.zero' is stored as I32, expected U8")


def test_corrupt_header_names_the_file(tmp_path):
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    path.write_bytes(bytes(data))
    msg = _load_error(tmp_path, r"not a readable safetensors file")
    assert str(path) in msg


# ------------------------------------------------------------- item 5: meta-device loading


def test_huge_vocab_in_config_fails_before_allocating(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab_size"] = 10**9  # 256 GB of fp32 embeddings if anything allocated it
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    msg = _load_error(tmp_path, r"'model\.embed_tokens\.weight' has shape \[101, 64\], but the "
                                r"model built from the config expects \[1000000000, 64\]")
    assert time.perf_counter() - t0 < 30
    assert "vocab_size" in msg


def test_extra_layer_in_config_is_named(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _load_error(tmp_path, r"missing tensors \['model\.layers\.2\.")


@pytest.mark.parametrize("alias", ["int8", "int4-head-fp32", "fp8"])
def test_meta_load_materialises_only_stored_tensors(tmp_path, alias):
    # A bf16 model: tensors keep their stored dtype (an fp32 skeleton filled by copy, as
    # before, would compute in fp32 and change the logits).
    model, _ = _saved(tmp_path, alias=alias, dtype=torch.bfloat16)
    loaded = q.load_quantized(tmp_path)
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert not [n for n, t in tensors.items() if t.is_meta]
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    fresh = tiny_llama()
    assert torch.equal(loaded.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


# ------------------------------------------------- item 2: save_pretrained of a quantized model


@pytest.mark.parametrize("via", ["wrap", "load"])
def test_save_pretrained_refuses_and_points_at_save_quantized(tmp_path, via):
    model = tiny_llama()
    if via == "wrap":
        infopt.wrap_model(model, quant="int8")
    else:
        q.quantize_model(model, "int8")
        q.save_quantized(model, tmp_path / "q")
        model = q.load_quantized(tmp_path / "q")
    out = tmp_path / "hf"
    with pytest.raises(NotImplementedError, match=r"infopt\.save_quantized\(model, directory\)"):
        model.save_pretrained(out)
    assert not out.exists()  # nothing half-written that would load as garbage
    # The float model keeps its own save_pretrained (the class is not patched).
    tiny_llama().save_pretrained(out)
    assert (out / "model.safetensors").is_file()
