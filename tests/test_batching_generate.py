"""``model.generate`` after ``wrap_model(kv=...)`` runs on the engine: HF's output layout
(left padding kept, pad after EOS), greedy identical to the unwrapped model, sampling and
``num_return_sequences``, a streamer, and the logged PagedCache path for what the engine lacks."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import infopt
from infopt.batching import model_engine

VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny(eos=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = eos
    return model


def padded(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, -n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, -n:] = 1
    return ids, mask


@pytest.mark.parametrize("kv", ["paged", "paged-prefix"])
def test_greedy_padded_batch_identical_to_unwrapped(kv):
    ref, model = tiny(), tiny()
    ids, mask = padded([3, 17, 8, 1])
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    infopt.wrap_model(model, kv=kv)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    assert model_engine(model).num_steps > 0  # it ran on the engine
    for i in range(4):  # each row alone, unpadded, as well
        row = ids[i : i + 1, -int(mask[i].sum()):]
        alone = ref.generate(row, max_new_tokens=12, do_sample=False)
        assert torch.equal(got[i, -alone.shape[1]:], alone[0])


def test_eos_rows_are_padded_and_lengths_follow_hf():
    ref = tiny()
    ids, mask = padded([5, 9], seed=3)
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    eos = int(free[0, ids.shape[1] + 2])  # row 0's third new token becomes EOS
    ref, model = tiny(eos=eos), tiny(eos=eos)
    infopt.wrap_model(model, kv="paged")
    for kw in ({"max_new_tokens": 10}, {"max_length": ids.shape[1] + 6},
               {"max_new_tokens": 10, "min_new_tokens": 6}):
        want = ref.generate(ids, attention_mask=mask, do_sample=False, **kw)
        got = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
        assert torch.equal(got, want), kw


def test_sampling_and_num_return_sequences_are_seeded():
    model = tiny()
    infopt.wrap_model(model, kv="paged")
    ids, mask = padded([4, 7])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20,
              num_return_sequences=3)
    torch.manual_seed(5)
    a = model.generate(ids, **kw)
    torch.manual_seed(5)
    b = model.generate(ids, **kw)
    assert a.shape == (6, ids.shape[1] + 8) and torch.equal(a, b)
    assert torch.equal(a[:3, : ids.shape[1]], ids[:1].expand(3, -1))
    assert len({tuple(r) for r in a[:3, ids.shape[1]:].tolist()}) > 1  # the samples differ


def test_streamer_gets_prompt_then_each_token():
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, x):
            self.puts.append(x.tolist())

        def end(self):
            self.ended = True

    ref, model = tiny(), tiny()
    ids = torch.randint(1, VOCAB, (1, 6))
    want = ref.generate(ids, max_new_tokens=5, do_sample=False)
    infopt.wrap_model(model, kv="paged")
    s = Collect()
    got = model.generate(ids, max_new_tokens=5, do_sample=False, streamer=s)
    assert torch.equal(got, want) and s.ended
    assert s.puts[0] == ids.tolist() and [p[0] for p in s.puts[1:]] == want[0, 6:].tolist()
    with pytest.raises(ValueError, match="batch size > 1"):
        model.generate(torch.randint(1, VOCAB, (2, 3)), max_new_tokens=2, streamer=Collect())


def test_features_beyond_the_engine_take_the_logged_paged_cache_path(caplog):
    ref, model = tiny(), tiny()
    ids = torch.randint(1, VOCAB, (2, 5))
    infopt.wrap_model(model, kv="paged")
    engine = model_engine(model)
    with caplog.at_level(logging.INFO, logger="infopt.batching.hf_generate"):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        beams = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
    assert "output_scores" in caplog.text and "num_beams" in caplog.text
    assert engine.num_steps == 0  # neither call ran on the engine
    assert torch.equal(out.sequences, ref.generate(ids, max_new_tokens=4, do_sample=False))
    assert torch.equal(beams, ref.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False))


def test_right_padding_is_refused():
    model = tiny()
    infopt.wrap_model(model, kv="paged")
    ids, mask = padded([3, 5])
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2, do_sample=False)


def test_kv_and_prompt_lookup_compose_in_one_loop():
    ref, model = tiny(), tiny()
    unit = torch.randint(1, VOCAB, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = torch.tensor([unit * 5, (unit[::-1] * 5)])
    want = ref.generate(ids, max_new_tokens=16, do_sample=False)
    infopt.wrap_model(model, kv="paged", spec="prompt-lookup")
    got = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want)
    engine = model_engine(model)
    assert engine.proposer is not None and engine.num_steps < 2 * 16  # drafts were accepted


def test_kv_and_layer_skip_compose_in_one_loop():
    ref, model = tiny(), tiny()
    unit = torch.randint(1, VOCAB, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = torch.tensor([unit * 5, (unit[::-1] * 5)])
    want = ref.generate(ids, max_new_tokens=16, do_sample=False)
    infopt.wrap_model(model, kv="paged-prefix", spec="layer-skip")
    got = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want)
    engine = model_engine(model)
    assert engine.proposer.num_forwards > 0  # the layer-skip draft ran inside the engine


def test_kv_with_a_draft_that_cannot_load_leaves_the_model_as_it_was(tmp_path):
    from infopt.speculative.config import DraftModelConfig

    model = tiny()
    generate_before = model.generate
    with pytest.raises(Exception, match="nope"):
        infopt.wrap_model(model, kv="paged", spec=DraftModelConfig(str(tmp_path / "nope")))
    assert model.generate == generate_before and model_engine(model) is None
