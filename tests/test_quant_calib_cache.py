"""The calibration cache (infopt.quant.calib_cache), the progress switch over calibration and
calibration's notices going to ``logging`` (tiny random models, no download)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import infopt
import infopt.quant as q
import infopt.quant.quantize as quantize_mod
from infopt.quant.calib_cache import CalibrationEntry, calib_cache_dir, calib_cache_enabled

CALIB = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(7))
IDS = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache root, the cache switched on, and a counter of real calibrations."""
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path))
    monkeypatch.delenv("INFOPT_CALIB_CACHE", raising=False)
    calls = []
    real = quantize_mod.run_sequential

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize_mod, "run_sequential", counted)
    return calls


def _quantize(model, config, ids=CALIB, **kw):
    return q.quantize_model(model, config, calib_input_ids=ids, progress=False, **kw)


def _entries():
    d = calib_cache_dir()
    return sorted(d.glob("*.json")) if d.exists() else []


@pytest.mark.parametrize("alias", ["int4-awq", "int4-gptq", "w8a8"])
def test_second_wrap_loads_instead_of_calibrating(cache, alias, caplog):
    cold = _quantize(tiny_llama(), alias)
    assert len(cache) == 1 and len(_entries()) == 1
    with caplog.at_level(logging.INFO, logger="infopt.quant.calib_cache"):
        warm = _quantize(tiny_llama(), alias)
    assert len(cache) == 1, "the second wrap must not calibrate again"
    assert "calibration loaded from the cache" in caplog.text
    # The cached result is the calibrated model, bit for bit (folded norms included).
    torch.testing.assert_close(warm(IDS).logits, cold(IDS).logits, rtol=0, atol=0)
    assert q.quant_config_of(warm) == q.quant_config_of(cold)
    for (n1, t1), (n2, t2) in zip(cold.state_dict().items(), warm.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    side = json.loads(_entries()[0].read_text())
    assert side["calib_ids_shape"] == [4, 16] and len(side["modules"]) == 2 * 7
    if alias != "int4-gptq":
        # AWQ / SmoothQuant folded their scales into the norms: those are stored too.
        assert any("layernorm" in n for n in side["changed"]), side["changed"]


def test_changed_config_data_or_weights_recalibrate(cache):
    _quantize(tiny_llama(), "int4-awq")
    _quantize(tiny_llama(), q.Int4WeightOnlyConfig(method="awq", awq_grid=10))  # config
    _quantize(tiny_llama(), "int4-awq", ids=(CALIB + 1) % 101)  # data
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # weights
    _quantize(model, "int4-awq")
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3  # a tensor outside the calibrated linears
    _quantize(model, "int4-awq")
    assert len(cache) == 5 and len(_entries()) == 5
    _quantize(tiny_llama(), "int4-awq")  # the first one again: cached
    assert len(cache) == 5


def test_switched_off_by_env_or_argument(cache, monkeypatch):
    _quantize(tiny_llama(), "int4-gptq", calib_cache=False)
    _quantize(tiny_llama(), "int4-gptq", calib_cache=False)
    assert len(cache) == 2 and _entries() == []
    monkeypatch.setenv("INFOPT_CALIB_CACHE", "0")
    assert not calib_cache_enabled()
    _quantize(tiny_llama(), "int4-gptq")
    assert len(cache) == 3 and _entries() == []
    _quantize(tiny_llama(), "int4-gptq", calib_cache=True)  # the argument wins
    assert len(_entries()) == 1
    with pytest.raises(TypeError, match="calib_cache"):
        calib_cache_enabled("yes")


def _corrupt_file(side):
    path = side.with_suffix(".safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_sidecar(field, value):
    def edit(side):
        d = json.loads(side.read_text())
        d[field] = value
        side.write_text(json.dumps(d))
    return edit


@pytest.mark.parametrize("damage", [
    _corrupt_file,
    lambda side: side.with_suffix(".safetensors").write_bytes(b"not safetensors"),
    lambda side: side.write_text("{not json"),
    _edit_sidecar("rest", ["model.layers.0.mlp.up_proj"]),
    _edit_sidecar("quant_config", {"type": "Int8WeightOnlyConfig"}),
    _edit_sidecar("changed", ["model.no_such.weight"]),
], ids=["flipped-byte", "not-safetensors", "bad-json", "wrong-rest", "wrong-config",
        "unknown-tensor"])
def test_damaged_entry_is_ignored_logged_and_rewritten(cache, damage, caplog):
    cold = _quantize(tiny_llama(), "int4-awq")
    side = _entries()[0]
    damage(side)
    with caplog.at_level(logging.WARNING, logger="infopt.quant.calib_cache"):
        again = _quantize(tiny_llama(), "int4-awq")
    assert len(cache) == 2, "a damaged entry is recomputed"
    assert "ignoring calibration cache entry" in caplog.text and "calibrating again" in caplog.text
    torch.testing.assert_close(again(IDS).logits, cold(IDS).logits, rtol=0, atol=0)
    caplog.clear()
    _quantize(tiny_llama(), "int4-awq")  # rewritten: a clean hit now
    assert len(cache) == 2 and "ignoring" not in caplog.text


def test_entry_shape_mismatch_changes_nothing(cache):
    """A sidecar that passes its key check but whose tensors do not fit is refused before the
    model is touched (apply is all or nothing)."""
    _quantize(tiny_llama(), "int4-awq")
    model = tiny_llama()
    entry = CalibrationEntry.for_model(model, q.ALIASES["int4-awq"](), CALIB)
    d = json.loads(entry.sidecar.read_text())
    name = next(iter(d["modules"]))
    d["modules"][name]["in_features"] = 32
    entry.sidecar.write_text(json.dumps(d))
    before = model.state_dict(keep_vars=True)
    targets = q.select_targets(model, q.ALIASES["int4-awq"]())
    assert entry.apply(model, targets) is None
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)


def test_cache_is_keyed_not_on_the_meta_device(cache):
    with torch.device("meta"):
        model = tiny_llama()
    assert CalibrationEntry.for_model(model, q.ALIASES["int4-awq"](), CALIB) is None


@pytest.mark.parametrize("switch", ["set_progress", "env", "argument"])
def test_progress_off_prints_no_bar(cache, switch, capsys, monkeypatch):
    kwargs = {}
    if switch == "set_progress":
        monkeypatch.setattr("infopt.logs._PROGRESS", None)  # restored after the test
        infopt.set_progress(False)
    elif switch == "env":
        monkeypatch.setenv("INFOPT_PROGRESS", "0")
    else:
        kwargs["progress"] = False
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    q.quantize_model(tiny_llama(), "int4-gptq", calib_input_ids=CALIB, calib_cache=False,
                     **kwargs)
    out = capsys.readouterr()
    assert "GPTQ" not in out.err + out.out and "it/s" not in out.err, out.err


def test_progress_on_shows_the_bar(cache, capsys, monkeypatch):
    """The check above is meaningful: with progress on, the bar is on stderr."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("INFOPT_PROGRESS", raising=False)
    q.quantize_model(tiny_llama(), "int4-gptq", calib_input_ids=CALIB, calib_cache=False,
                     progress=True)
    assert "GPTQ" in capsys.readouterr().err


def test_calibration_emits_no_python_warnings(cache, recwarn):
    """Calibration's notices are log records; nothing reaches ``warnings``."""
    _quantize(tiny_llama(), "int4-awq")
    _quantize(tiny_llama(), "int4-awq")
    assert [str(w.message) for w in recwarn] == []
