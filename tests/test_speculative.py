"""Speculative decoding: greedy exactness for every draft source, degenerate cases, bad input,
KV-cache rollback and the ``wrap_model(spec=...)`` / ``model.generate`` integration.

The reference is always the target's own greedy decode (HF ``model.generate(do_sample=False)``),
one row at a time without padding for batched runs.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import infopt
from infopt import speculative as sp
from infopt.speculative.cached_lm import CachedLM, crop_cache
from infopt.speculative.drafts import DraftContext, Proposal
from infopt.speculative.sampling import Sampling, next_draft_length

VOCAB = 101


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: keep timings and load predictable
    yield
    torch.set_num_threads(n)


def tiny_llama(seed: int = 0, layers: int = 4, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def other_draft():
    return tiny_llama(1, layers=2)  # a different random model: low acceptance


def hf_greedy(model, ids, n, **kw):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, **kw)


def drafts(target, other_draft):
    return {
        "self": target,  # draft == target: every draft token is accepted
        "other": other_draft,
        "prompt_lookup": "prompt_lookup",
        "layer_skip": sp.LayerSkipConfig(skip=(2,)),
    }


# --- greedy exactness ------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["self", "other", "prompt_lookup", "layer_skip"])
@pytest.mark.parametrize("k", [0, 1, 3, 6])
@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_identical_to_target_batch1(target, other_draft, source, k, adaptive):
    draft = drafts(target, other_draft)[source]
    g = torch.Generator().manual_seed(k)
    for plen, n in [(1, 9), (5, 33), (17, 20)]:
        ids = torch.randint(1, VOCAB, (1, plen), generator=g)
        ref = hf_greedy(target, ids, n)
        out = sp.generate(target, ids, draft, n, num_draft_tokens=k, adaptive=adaptive)
        assert torch.equal(out.sequences, ref), (source, k, plen, n)
        assert out.stats.emitted == n
        if k == 0:
            assert out.stats.proposed == 0 and out.stats.target_forwards == n


def test_self_draft_accepts_everything(target):
    ids = torch.randint(1, VOCAB, (1, 6))
    out = sp.generate(target, ids, target, 40, num_draft_tokens=4, adaptive=False)
    st = out.stats
    assert st.proposed > 0 and st.accepted == st.proposed and st.acceptance_rate == 1.0
    # 4 drafts + 1 bonus per verification pass
    assert st.target_forwards == 8
    assert st.acceptance_rate_per_position == [1.0] * 4


def test_prompt_lookup_on_repetitive_text_accepts(target):
    # The tiny model, fed a long repeated pattern, continues it; lookup drafts it for free.
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11] * 6])
    ref = hf_greedy(target, ids, 40)
    out = sp.generate(target, ids, "prompt_lookup", 40)
    assert torch.equal(out.sequences, ref)
    assert out.stats.accepted > 0
    assert out.stats.target_forwards < 40


@pytest.mark.parametrize("source", ["self", "other", "prompt_lookup", "layer_skip"])
def test_greedy_batch_left_padded_matches_rows(target, other_draft, source):
    draft = drafts(target, other_draft)[source]
    g = torch.Generator().manual_seed(3)
    lens = [9, 3, 6, 1]
    plen = max(lens)
    ids = torch.zeros(len(lens), plen, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        ids[b, plen - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, plen - n :] = 1
    out = sp.generate(target, ids, draft, 24, attention_mask=mask, num_draft_tokens=3)
    for b, n in enumerate(lens):
        ref = hf_greedy(target, ids[b : b + 1, plen - n :], 24)
        assert out.sequences[b, plen:].tolist() == ref[0, n:].tolist(), (source, b)


def test_greedy_batch_unpadded_matches_rows(target):
    ids = torch.randint(1, VOCAB, (3, 5))
    out = sp.generate(target, ids, "layer_skip", 30, num_draft_tokens=2)
    for b in range(3):
        assert torch.equal(out.sequences[b], hf_greedy(target, ids[b : b + 1], 30)[0])


# --- stopping: EOS, min_new_tokens, max length -----------------------------------------------


def _eos_case(target, ids, n=30):
    """An EOS id the target emits mid-generation (its 6th new token), for these prompts."""
    ref = hf_greedy(target, ids, n)
    return int(ref[0, ids.shape[1] + 5])


@pytest.mark.parametrize("source", ["self", "prompt_lookup", "layer_skip"])
def test_eos_inside_draft_stops_like_target(target, other_draft, source):
    draft = drafts(target, other_draft)[source]
    ids = torch.randint(1, VOCAB, (1, 4))
    eos = _eos_case(target, ids)
    ref = hf_greedy(target, ids, 30, eos_token_id=eos, pad_token_id=0)
    out = sp.generate(target, ids, draft, 30, num_draft_tokens=8, eos_token_id=eos)
    assert torch.equal(out.sequences, ref)
    assert out.sequences[0, -1].item() == eos  # nothing after EOS
    assert out.stats.emitted == ref.shape[1] - ids.shape[1]


def test_eos_batch_rows_finish_at_different_steps(target):
    ids = torch.randint(1, VOCAB, (3, 4))
    eos = _eos_case(target, ids[:1])
    ref = hf_greedy(target, ids, 30, eos_token_id=eos, pad_token_id=0)
    out = sp.generate(target, ids, target, 30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out.sequences, ref)


def test_min_new_tokens_suppresses_eos_in_target_and_draft(target):
    ids = torch.randint(1, VOCAB, (1, 4))
    eos = _eos_case(target, ids)
    ref = hf_greedy(target, ids, 25, eos_token_id=eos, pad_token_id=0, min_new_tokens=20)
    assert (ref[0, 4:24] != eos).all()
    for draft in (target, "prompt_lookup", "layer_skip"):
        out = sp.generate(target, ids, draft, 25, eos_token_id=eos, min_new_tokens=20)
        assert torch.equal(out.sequences, ref), draft


def test_max_new_tokens_reached_mid_draft(target):
    ids = torch.randint(1, VOCAB, (2, 5))
    for n in (1, 2, 3, 7):
        out = sp.generate(target, ids, target, n, num_draft_tokens=8)
        assert out.sequences.shape == (2, 5 + n)
        assert torch.equal(out.sequences, hf_greedy(target, ids, n))


def test_zero_new_tokens_returns_prompt(target):
    ids = torch.randint(1, VOCAB, (2, 5))
    out = sp.generate(target, ids, "prompt_lookup", 0)
    assert torch.equal(out.sequences, ids) and out.stats.target_forwards == 0


class _NoDraft:
    """A draft source that never proposes anything."""

    def begin(self, ctx):
        pass

    def propose(self, ctx, k):
        return Proposal(ctx.tokens.new_full((ctx.tokens.shape[0], 0), -1), None)

    def accept(self, n_kept):
        pass


def test_draft_that_proposes_nothing_is_plain_decoding(target):
    ids = torch.randint(1, VOCAB, (2, 5))
    out = sp.generate(target, ids, _NoDraft(), 12)
    assert torch.equal(out.sequences, hf_greedy(target, ids, 12))
    assert out.stats.proposed == 0 and out.stats.target_forwards == 12


def test_prompt_lookup_no_match_and_match():
    assert sp.lookup_continuation([1, 2, 3, 4], 5, 3) == []
    assert sp.lookup_continuation([1, 2, 3, 9, 1, 2], 5, 3) == [3, 9, 1, 2]
    # The most recent earlier occurrence wins.
    assert sp.lookup_continuation([7, 1, 5, 7, 1, 6, 7, 1], 2, 2) == [6, 7]
    ctx = DraftContext(torch.tensor([[1, 2, 3, 4]]), [4], [True], None, 4, Sampling())
    assert sp.PromptLookupDraft().propose(ctx, 4).tokens.shape == (1, 0)


# --- KV cache rollback -----------------------------------------------------------------------


def test_crop_then_refeed_matches_fresh_forward(target):
    ids = torch.randint(1, VOCAB, (2, 12))
    lm = CachedLM(target)
    with torch.inference_mode():
        lm.forward(ids[:, :10])
        lm.crop(6)
        assert lm.length == 6 and lm.cache.get_seq_length() == 6
        got = lm.forward(ids[:, 6:12])
        ref = target(ids).logits[:, 6:12]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_crop_cache_with_skipped_layers(target):
    draft = sp.LayerSkipDraft(target, skip=(1, 3))
    ids = torch.randint(1, VOCAB, (1, 9))
    with torch.inference_mode(), draft._scope():
        draft.lm.forward(ids)
    cache = draft.lm.cache
    crop_cache(cache, 4)  # layers 1 and 3 were never written
    assert cache.get_seq_length() == 4
    assert cache.layers[2].get_seq_length() == 4 and cache.layers[1].get_seq_length() == 0


def test_default_skip_sets():
    assert sp.drafts.default_skip(30) == (13, 14, 15, 16, 17)
    assert sp.drafts.default_skip(4) == (2,)
    assert sp.drafts.default_skip(8, 2) == (1, 3, 5)


def test_layer_skip_shares_weights_and_restores_layers(target):
    layers = target.model.layers
    n_params = sum(p.numel() for p in target.parameters())
    parent, attr, found = sp.find_decoder_layers(target)
    assert found is layers and parent is target.model and attr == "layers"
    draft = sp.LayerSkipDraft(target)
    assert draft.kept == [0, 1, 3] and all(draft._sub[i] is layers[j]
                                           for i, j in enumerate(draft.kept))
    sp.generate(target, torch.randint(1, VOCAB, (1, 5)), draft, 5)
    assert target.model.layers is layers
    assert sum(p.numel() for p in target.parameters()) == n_params


# --- bad input -------------------------------------------------------------------------------


def test_bad_arguments_are_named(target):
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="vocabulary"):
        sp.generate(target, ids, tiny_llama(2, vocab=57), 4)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        sp.generate(target, ids, "prompt_lookup", 4, num_draft_tokens=-1)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        sp.PromptLookupConfig(num_draft_tokens=-2)
    with pytest.raises(ValueError, match="temperature"):
        sp.generate(target, ids, target, 4, do_sample=True, temperature=0.0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p"):
            sp.generate(target, ids, target, 4, do_sample=True, top_p=bad)
    with pytest.raises(ValueError, match="top_k"):
        sp.generate(target, ids, target, 4, do_sample=True, top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sp.generate(target, ids, target, -1)
    with pytest.raises(ValueError, match="min_new_tokens"):
        sp.generate(target, ids, target, 4, min_new_tokens=-1)
    with pytest.raises(ValueError, match="left-padded"):
        sp.generate(target, ids, target, 4, attention_mask=torch.tensor([[1, 1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="draft="):
        sp.generate(target, ids, "medusa", 4)
    with pytest.raises(ValueError, match="layer 0"):
        sp.LayerSkipDraft(target, skip=(0,))
    with pytest.raises(ValueError, match="skip_every"):
        sp.LayerSkipConfig(skip_every=1)


# --- adaptive length, stats ------------------------------------------------------------------


def test_next_draft_length_rules():
    assert next_draft_length(4, 4, True, 4.0, 8) == 6
    assert next_draft_length(7, 7, True, 7.0, 8) == 8
    assert next_draft_length(4, 4, False, 1.0, 8) == 3
    assert next_draft_length(1, 1, False, 0.0, 8) == 1
    assert next_draft_length(4, 4, False, 3.0, 8) == 4
    assert next_draft_length(4, 0, False, 0.0, 8) == 4


def test_adaptive_grows_with_full_acceptance_and_stats_dict(target):
    ids = torch.randint(1, VOCAB, (1, 5))
    out = sp.generate(target, ids, target, 40, num_draft_tokens=2, max_draft_tokens=6)
    assert out.stats.draft_lengths[:3] == [2, 4, 6]
    d = out.stats.to_dict()
    for key in ("proposed", "accepted", "mean_accepted_length", "acceptance_rate",
                "acceptance_rate_per_position", "target_forwards", "wall_time_s"):
        assert key in d
    assert d["emitted"] == 40 and d["wall_time_s"] > 0


# --- wrap_model / model.generate --------------------------------------------------------------


class _Streamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("spec", ["prompt_lookup", "layer_skip", sp.LayerSkipConfig(skip=(1,))])
def test_wrap_model_generate_speculates_and_streams(spec):
    model = tiny_llama(0)
    ids = torch.randint(1, VOCAB, (1, 6))
    ref = hf_greedy(model, ids, 20, min_new_tokens=20, pad_token_id=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert infopt.wrap_model(model, spec=spec) is model
    assert "generate" in model.__dict__ and type(model).generate is LlamaForCausalLM.generate
    streamer = _Streamer()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                         min_new_tokens=20, do_sample=False, pad_token_id=0, streamer=streamer,
                         num_beams=1)
    assert torch.equal(out, ref)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.ended
    assert sum(len(c) for c in streamer.chunks[1:]) == 20
    assert sp.last_stats(model).emitted == 20
    assert infopt.applied_configs(model)[-1]["option"] == "spec"
    assert model.state_dict().keys() == state.keys()
    sp.detach(model)
    assert "generate" not in model.__dict__


def test_wrapped_generate_rejects_unsupported_kwargs():
    model = infopt.wrap_model(tiny_llama(0), spec="prompt_lookup")
    ids = torch.randint(1, VOCAB, (1, 4))
    with pytest.raises(NotImplementedError, match="num_beams"):
        model.generate(ids, max_new_tokens=4, num_beams=2)
    with pytest.raises(TypeError, match="repetition_penalty"):
        model.generate(ids, max_new_tokens=4, repetition_penalty=1.2)
    with pytest.raises(TypeError, match="output_foo"):
        model.generate(ids, max_new_tokens=4, output_foo=True)
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        model.generate(ids, max_new_tokens=4)


def test_spec_config_round_trip_and_aliases():
    for cfg in (sp.PromptLookupConfig(max_ngram=2, num_draft_tokens=5),
                sp.LayerSkipConfig(skip=(1, 3)), sp.DraftModelConfig("smollm2-135m")):
        assert infopt.InfoptConfig.from_dict(cfg.to_dict()) == cfg
    assert set(infopt.accepted_options()["spec"]) == {"prompt-lookup", "layer-skip"}


def test_attach_draft(target, other_draft):
    model = tiny_llama(0)
    n_keys = len(model.state_dict())
    sp.attach_draft(model, other_draft, num_draft_tokens=3)
    assert len(model.state_dict()) == n_keys  # the draft is not a submodule
    ids = torch.randint(1, VOCAB, (2, 5))
    out = model.generate(ids, max_new_tokens=15, do_sample=False)
    assert torch.equal(out, hf_greedy(target, ids, 15))
    with pytest.raises(ValueError, match="vocabulary"):
        sp.attach_draft(model, tiny_llama(3, vocab=50))


def test_bench_rows_registered_and_parse():
    from infopt.api import parse_option
    from infopt.bench import get_bench_config

    for name in ("spec-prompt-lookup", "spec-layer-skip", "spec-draft-qwen0.5b"):
        cfg = get_bench_config(name)
        assert isinstance(parse_option("spec", cfg.wrap_options["spec"]), sp.SpecConfig)
    assert get_bench_config("hf-prompt-lookup").apply is not None


def test_spec_stats_merge_sums_counters_and_positions():
    a, b = sp.SpecStats(), sp.SpecStats()
    a.record([3, 2], [3, 0])
    a.emitted, a.target_forwards = 6, 1
    b.record([5], [4])
    b.emitted, b.target_forwards, b.draft_lengths = 5, 1, [5]
    a.merge(b)
    assert (a.proposed, a.accepted, a.row_steps, a.emitted, a.target_forwards) == (10, 7, 3, 11, 2)
    assert a.proposed_per_position == [3, 3, 2, 1, 1]
    assert a.accepted_per_position == [2, 2, 2, 1, 0]
    assert a.draft_lengths == [5]


def test_draft_model_config_quant_is_validated():
    from infopt.quant import Int4WeightOnlyConfig

    for quant in ("int4", Int4WeightOnlyConfig(lm_head="int8")):
        cfg = sp.DraftModelConfig("smollm2-135m", quant=quant)
        assert infopt.InfoptConfig.from_dict(cfg.to_dict()) == cfg  # nested configs round-trip
    with pytest.raises(ValueError, match="quant must be None, a QuantConfig or one of"):
        sp.DraftModelConfig("smollm2-135m", quant="int3")


def test_quantized_draft_model_config_is_exact(target, monkeypatch):
    """DraftModelConfig(quant=...) quantizes the draft it loads; the output stays the target's."""
    import infopt.models
    import infopt.quant as q

    # A same-weights copy of the target as the "registry" draft: high acceptance before quant.
    monkeypatch.setattr(infopt.models, "load_model", lambda name, **kw: (tiny_llama(0), None))
    cfg = sp.DraftModelConfig("tiny", quant=q.Int8WeightOnlyConfig(lm_head="int8"))
    draft = cfg.load(target)
    assert isinstance(draft.lm_head, q.Int8Linear)
    assert isinstance(draft.model.layers[0].self_attn.q_proj, q.Int8Linear)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    out = sp.generate(target, ids, cfg, 20)
    assert torch.equal(out.sequences, hf_greedy(target, ids, 20))
    assert out.stats.acceptance_rate > 0.5  # int8 barely moves the draft's argmax


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.5, 0.99])
def test_confidence_stop_is_exact_and_shortens_drafts(target, other_draft, threshold):
    g = torch.Generator().manual_seed(11)
    lens = [7, 2, 5]
    plen = max(lens)
    ids = torch.zeros(len(lens), plen, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        ids[b, plen - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, plen - n :] = 1
    for draft_model in (target, other_draft):
        draft = sp.ModelDraft(draft_model, stop_confidence=threshold)
        out = sp.generate(target, ids, draft, 20, attention_mask=mask, num_draft_tokens=6,
                          adaptive=False)  # fmt: skip
        for b, n in enumerate(lens):
            ref = hf_greedy(target, ids[b : b + 1, plen - n :], 20)
            assert out.sequences[b, plen:].tolist() == ref[0, n:].tolist(), (threshold, b)
        # one batch-1 row: threshold 0 drafts exactly as without a threshold; near 1 drafts
        # stop after their first token (tiny random models are never that sure)
        row = ids[:1, plen - 7 :]
        one = sp.generate(target, row, draft, 20, num_draft_tokens=6, adaptive=False)
        plain = sp.generate(target, row, sp.ModelDraft(draft_model), 20, num_draft_tokens=6,
                            adaptive=False)  # fmt: skip
        if threshold == 0.0:
            assert one.stats.proposed == plain.stats.proposed
        if threshold == 0.99:
            assert max(one.stats.draft_lengths) == 1 and one.stats.proposed < plain.stats.proposed
        if draft_model is target:  # a self-draft is always right, however short
            assert one.stats.accepted == one.stats.proposed > 0


def test_stop_confidence_is_validated():
    with pytest.raises(ValueError, match="stop_confidence must be None or"):
        sp.DraftModelConfig("x", stop_confidence=1.0)
    with pytest.raises(ValueError, match="stop_confidence must be None or"):
        sp.ModelDraft(tiny_llama(0), stop_confidence=-0.1)
