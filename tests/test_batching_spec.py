"""Speculative decoding inside the engine (prompt lookup): greedy output identical to plain
decoding, sampled output distributed exactly as the target's (chi-square inside a continuous
batch), rejected drafts roll back their blocks, speculation off in large batches."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infopt.batching import Engine, EngineConfig, SamplingParams
from infopt.speculative.config import LayerSkipConfig, PromptLookupConfig

VOCAB = 16


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny(seed=0, vocab=VOCAB):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=None)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def repetitive(n, period, seed):
    g = torch.Generator().manual_seed(seed)
    unit = torch.randint(1, VOCAB, (period,), generator=g).tolist()
    return (unit * (n // period + 1))[:n]


SPEC = PromptLookupConfig(num_draft_tokens=4, max_ngram=3)


def test_greedy_with_drafts_equals_plain_engine_and_accepts_some():
    model = tiny()
    prompts = [repetitive(n, p, s) for n, p, s in ((30, 5, 1), (17, 3, 2), (41, 7, 3), (9, 2, 4))]
    sp = SamplingParams(max_tokens=24, temperature=0)
    plain = Engine(model, None, EngineConfig(num_blocks=64, block_size=4)).generate(
        prompts, sp, use_tqdm=False)
    spec = Engine(model, None, EngineConfig(num_blocks=64, block_size=4, speculative=SPEC,
                                            max_num_batched_tokens=12))
    outs = spec.generate(prompts, sp, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert sum(o.metrics.num_draft_tokens for o in outs) > 0
    assert sum(o.metrics.num_accepted_tokens for o in outs) > 0  # repetition is predictable
    assert spec.num_steps < sum(len(o.token_ids) for o in outs)
    assert spec.runner.pool.allocator.num_free == 64  # rejected drafts' blocks came back


def test_drafts_with_preemption_and_tiny_pool_keep_greedy_output():
    model = tiny(seed=3)
    prompts = [repetitive(n, p, s) for n, p, s in ((20, 4, 5), (22, 6, 6), (18, 3, 7))]
    sp = SamplingParams(max_tokens=20, temperature=0)
    plain = Engine(model, None, EngineConfig(num_blocks=64, block_size=4)).generate(
        prompts, sp, use_tqdm=False)
    spec = Engine(model, None, EngineConfig(num_blocks=14, block_size=4, speculative=SPEC))
    outs = spec.generate(prompts, sp, use_tqdm=False)
    assert spec.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert spec.runner.pool.allocator.num_free == 14


@pytest.mark.parametrize("source", ["prompt-lookup", "layer-skip"])
def test_speculative_sampling_is_exact_inside_a_batch(source):
    """The marginal of the 2nd output token (verified against lookup / layer-skip drafts) over
    3000 seeded requests running together matches the target's exact distribution
    (chi-square)."""
    model = tiny(seed=1)
    # Every token but 0 occurs in the prompt, so a 1-gram lookup drafts after almost any t0.
    prompt = torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(2)).add(1).tolist()
    prompt = prompt * 2
    n = 3000
    spec = PromptLookupConfig(num_draft_tokens=4, max_ngram=3, min_ngram=1)
    if source == "layer-skip":
        spec = LayerSkipConfig(num_draft_tokens=2)
    engine = Engine(model, None, EngineConfig(
        num_blocks=3000, block_size=8, max_num_seqs=512, max_num_batched_tokens=4096,
        speculative=spec, spec_disable_batch_size=10**6))  # fmt: skip
    sps = [SamplingParams(max_tokens=3, temperature=1.0, seed=i) for i in range(n)]
    outs = engine.generate([prompt] * n, sps, use_tqdm=False)
    assert sum(o.metrics.num_draft_tokens for o in outs) > n // 2  # drafts were verified
    counts = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=VOCAB)
    with torch.no_grad():
        p0 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1).double()
        nxt = torch.tensor([prompt + [t] for t in range(VOCAB)])
        p1 = model(nxt).logits[:, -1].softmax(-1).double()  # [t0, t1]
    expected = (p0[:, None] * p1).sum(0) * n
    keep = expected >= 5  # pool the rare cells, as the test requires
    obs = torch.cat([counts[keep].double(), counts[~keep].double().sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    # 99.9th percentile of chi-square(dof) by the Wilson-Hilferty approximation
    crit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, crit, dof)


def test_speculation_switches_off_in_large_batches():
    model = tiny()
    prompts = [repetitive(20, 4, s) for s in range(3)]
    sp = SamplingParams(max_tokens=10, temperature=0)
    big = Engine(model, None, EngineConfig(num_blocks=64, speculative=SPEC,
                                           spec_disable_batch_size=2))
    outs = big.generate(prompts, sp, use_tqdm=False)
    assert all(o.metrics.num_draft_tokens == 0 for o in outs)  # 3 running > 2 throughout
    alone = Engine(model, None, EngineConfig(num_blocks=64, speculative=SPEC,
                                             spec_disable_batch_size=2))
    assert alone.generate(prompts[:1], sp, use_tqdm=False)[0].metrics.num_draft_tokens > 0


def test_stop_inside_accepted_drafts_drops_the_rest():
    model = tiny()
    prompt = repetitive(30, 5, 1)
    base = Engine(model, None, EngineConfig(num_blocks=64)).generate(
        [prompt], SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[0]
    stop = base.token_ids[6]
    spec = Engine(model, None, EngineConfig(num_blocks=64, speculative=SPEC))
    out = spec.generate([prompt], SamplingParams(max_tokens=20, temperature=0,
                                                 stop_token_ids=[stop]), use_tqdm=False)[0]
    k = base.token_ids.index(stop)
    assert out.token_ids == base.token_ids[: k + 1] and out.finish_reason == "stop"
    capped = spec.generate([prompt], SamplingParams(max_tokens=7, temperature=0),
                           use_tqdm=False)[0]
    assert capped.token_ids == base.token_ids[:7] and capped.finish_reason == "length"
    assert spec.runner.pool.allocator.num_free == 64


def test_draft_model_proposer_keeps_greedy_output_and_frees_its_pool():
    from infopt.batching.draft import DraftProposer

    model = tiny()
    prompts = [repetitive(n, p, s) for n, p, s in ((30, 5, 1), (17, 3, 2), (41, 7, 3))]
    sp = SamplingParams(max_tokens=24, temperature=0)
    plain = Engine(model, None, EngineConfig(num_blocks=64, block_size=4)).generate(
        prompts, sp, use_tqdm=False)
    for draft, accepts_all in ((tiny(), True), (tiny(seed=7), False)):
        engine = Engine(model, None, EngineConfig(num_blocks=64, block_size=4,
                                                  max_num_batched_tokens=16))
        engine.proposer = DraftProposer(draft, 4, None, block_size=4, max_num_seqs=4,
                                        max_model_len=256)
        outs = engine.generate(prompts, sp, use_tqdm=False)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
        drafted = sum(o.metrics.num_draft_tokens for o in outs)
        accepted = sum(o.metrics.num_accepted_tokens for o in outs)
        assert drafted > 0
        if accepts_all:  # the same weights: every draft is the target's own choice
            assert accepted == drafted
        else:
            assert accepted < drafted  # rejections rolled back both pools
        assert engine.runner.pool.allocator.num_free == 64
        engine.proposer.release(set())
        pool = engine.proposer.runner.pool
        assert pool.allocator.num_free == pool.num_blocks


def test_layer_skip_proposer_in_the_engine_keeps_greedy_output():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=None)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    prompts = [repetitive(n, p, s) for n, p, s in ((20, 4, 5), (26, 6, 6))]
    sp = SamplingParams(max_tokens=20, temperature=0)
    plain = Engine(model, None, EngineConfig(num_blocks=64, block_size=4)).generate(
        prompts, sp, use_tqdm=False)
    spec = Engine(model, None, EngineConfig(num_blocks=64, block_size=4,
                                            speculative=LayerSkipConfig(num_draft_tokens=3)))
    outs = spec.generate(prompts, sp, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert sum(o.metrics.num_draft_tokens for o in outs) > 0
    assert spec.proposer.num_forwards > 0


def test_bad_speculative_configs_are_refused():
    with pytest.raises(ValueError, match="EngineConfig.speculative"):
        EngineConfig(speculative="prompt-lookup")
