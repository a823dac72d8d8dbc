"""Rough edges (issue 24, item 8): one alias spelling (hyphens), the old ones deprecated;
progress bars switchable library-wide; no misleading tokenizer warning during calibration;
operational messages through ``logging``."""

import logging
import threading
import time
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import infopt
import infopt.quant as q
import infopt.speculative as sp
from infopt.logs import progress_enabled, set_progress
from infopt.models.disk_cache import file_lock
from infopt.quant.calib_data import calibration_ids

IDS = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(3))
CALIB = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(5))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _default_progress():
    set_progress(None)
    yield
    set_progress(None)


# ---------------------------------------------------------------------------------- aliases


def test_every_alias_is_spelled_with_hyphens():
    for option, names in infopt.accepted_options().items():
        assert not [n for n in names if "_" in n], option


@pytest.mark.parametrize("old,new", [("prompt_lookup", "prompt-lookup"),
                                     ("layer_skip", "layer-skip")])
def test_old_spec_spellings_still_work_with_a_deprecation_warning(old, new):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        ref = infopt.wrap_model(tiny_llama(), spec=new)
    with pytest.warns(DeprecationWarning, match=rf"spec='{old}' is deprecated; use spec='{new}'"):
        model = infopt.wrap_model(tiny_llama(), spec=old)
    assert infopt.applied_configs(model) == infopt.applied_configs(ref)
    assert torch.equal(model.generate(IDS, max_new_tokens=5), ref.generate(IDS, max_new_tokens=5))
    with pytest.warns(DeprecationWarning, match=rf"draft='{old}' is deprecated; use '{new}'"):
        out = sp.generate(tiny_llama(), IDS, old, 5)
    assert torch.equal(out.sequences, sp.generate(tiny_llama(), IDS, new, 5).sequences)


def test_deprecated_spellings_must_point_at_real_aliases(monkeypatch):
    from infopt import api, options

    monkeypatch.setattr(options, "_OPTIONS", dict(options._OPTIONS))
    with pytest.raises(ValueError, match="must map new names to existing aliases"):
        api.register_option("x", infopt.InfoptConfig, {"a-b": dict}, deprecated={"a_b": "a-c"})


# --------------------------------------------------------------------------------- progress


def test_progress_switch_and_environment(monkeypatch):
    monkeypatch.delenv("INFOPT_PROGRESS", raising=False)
    assert progress_enabled() is True
    monkeypatch.setenv("INFOPT_PROGRESS", "0")
    assert progress_enabled() is False
    set_progress(True)
    assert progress_enabled() is True and progress_enabled(False) is False
    with pytest.raises(TypeError, match="set_progress takes True, False or None"):
        set_progress("off")
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        progress_enabled(1)


def test_calibration_progress_follows_the_switch(capfd):
    # calib_cache=False: a cached calibration from an earlier test would show no progress.
    q.quantize_model(tiny_llama(), "int4-awq", calib_input_ids=CALIB, progress=True,
                     calib_cache=False)
    assert "AWQ" in capfd.readouterr().err
    infopt.set_progress(False)
    q.quantize_model(tiny_llama(), "int4-awq", calib_input_ids=CALIB, calib_cache=False)
    assert "AWQ" not in capfd.readouterr().err


def test_calibration_text_does_not_warn_about_sequence_length(capfd, caplog):
    vocab = {"[UNK]": 0, "the": 1, "of": 2, "and": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=64)
    with caplog.at_level(logging.WARNING):
        ids = calibration_ids(fast, 2, 32, text="pydoc")
    assert ids.shape == (2, 32)
    seen = capfd.readouterr().err + caplog.text
    assert "sequence length is longer than" not in seen


# ---------------------------------------------------------------------------------- logging


def test_waiting_for_a_lock_is_logged_not_printed(tmp_path, caplog, capfd):
    lock = tmp_path / "x.lock"
    held = threading.Event()

    def hold():
        with open(lock, "a+b") as f:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            held.set()
            time.sleep(0.3)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    with caplog.at_level(logging.WARNING, logger="infopt.models"), file_lock(lock):
        pass
    t.join()
    assert "waiting for another process holding" in caplog.text
    assert "infopt: waiting" not in capfd.readouterr().err  # no bare print any more
