"""The batching engine on tiny random-weight models: greedy outputs equal HF ``generate`` run
alone on each prompt, whatever the batch composition, chunk size, preemptions and prefix hits;
seeded sampling is per request; the pool always drains; bad input fails one request clearly."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infopt.batching import Engine, EngineConfig, SamplingParams
from infopt.batching.request import Request
from infopt.batching.sampler import apply_top_k_top_p
from infopt.batching.scheduler import Scheduler
from infopt.kvcache.allocator import BlockAllocator

VOCAB = 96
EOS = 2


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class ByteTokenizer:
    """One id per byte, offset past the specials (ids 0-3); decode is the inverse."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [4 + (b % (VOCAB - 4)) for b in text.encode()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + (t - 4) % 95) for t in ids if not (skip_special_tokens and t < 4))


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
        eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt, n):
    """HF generate alone on one prompt, exactly ``n`` new tokens (EOS masked, as min_tokens)."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def models():
    """(engine model, reference model) with equal weights; the engine switches its model's
    attention implementation, so the reference is a separate instance."""
    return tiny_llama(), tiny_llama()


LENGTHS = [5, 17, 33, 2, 40, 9, 64, 1]


@pytest.mark.parametrize(
    "cfg",
    [
        EngineConfig(max_num_batched_tokens=512, block_size=16, num_blocks=64),
        EngineConfig(max_num_batched_tokens=7, block_size=4, num_blocks=128),  # chunked prefill
        EngineConfig(max_num_batched_tokens=64, block_size=8, max_num_seqs=3, num_blocks=64),
        EngineConfig(max_num_batched_tokens=32, block_size=4, num_blocks=24),  # preemptions
        EngineConfig(max_num_batched_tokens=48, block_size=4, num_blocks=40,
                     enable_prefix_caching=True),
    ],
    ids=["one-step-prefill", "chunked", "max3seqs", "tiny-pool", "prefix"],
)
def test_greedy_equals_hf_generate_alone(models, cfg):
    model, ref = models
    prompts = prompts_of(LENGTHS)
    if cfg.enable_prefix_caching:  # shared prefixes: later prompts hit earlier blocks
        prompts += [prompts[6][:40] + p for p in prompts_of([3, 11], seed=5)] + [prompts[6]]
    n = 12
    engine = Engine(model, None, cfg)
    outs = engine.generate(prompts, SamplingParams(max_tokens=n, min_tokens=n, temperature=0),
                           use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.finished and o.finish_reason == "length"
        assert list(o.token_ids) == hf_greedy(ref, p, n), f"prompt of {len(p)} tokens"
    stats = engine.stats()
    assert stats.blocks_used == 0 or cfg.enable_prefix_caching
    assert engine.runner.pool.allocator.num_free == cfg.num_blocks  # every block back
    if cfg.num_blocks == 24:
        assert stats.num_preemptions > 0  # the point of this configuration
    if cfg.enable_prefix_caching:
        assert stats.prefix_hit_rate > 0
        assert sum(o.metrics.num_cached_tokens for o in outs) >= 40 * 2


def test_preemption_recompute_keeps_output_and_order(models):
    model, ref = models
    prompts = prompts_of([30, 30, 30, 30])
    engine = Engine(model, None, EngineConfig(max_num_batched_tokens=128, block_size=4,
                                              num_blocks=30))
    outs = engine.generate(prompts, SamplingParams(max_tokens=20, min_tokens=20, temperature=0),
                           use_tqdm=False)
    assert engine.stats().num_preemptions > 0
    assert any(o.metrics.num_preemptions for o in outs)
    for p, o in zip(prompts, outs):
        assert list(o.token_ids) == hf_greedy(ref, p, 20)


def test_seeded_sampling_is_per_request(models):
    model, _ = models
    p = prompts_of([6])[0]
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    alone = Engine(model, None, EngineConfig(num_blocks=64)).generate([p], sp, use_tqdm=False)
    others = prompts_of([3, 25, 8], seed=9)
    mixed = Engine(model, None, EngineConfig(num_blocks=64, max_num_batched_tokens=9)).generate(
        [others[0], p, others[1], others[2]],
        [SamplingParams(max_tokens=7, temperature=1.0), sp,
         SamplingParams(max_tokens=3, temperature=0), SamplingParams(max_tokens=9, seed=7)],
        use_tqdm=False,
    )  # fmt: skip
    assert alone[0].token_ids == mixed[1].token_ids
    other_seed = Engine(model, None, EngineConfig(num_blocks=64)).generate(
        [p], SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=99),
        use_tqdm=False,
    )
    assert other_seed[0].token_ids != alone[0].token_ids


def test_thousand_requests_small_pool_none_lost(models):
    model, _ = models
    engine = Engine(model, None, EngineConfig(max_num_seqs=32, max_num_batched_tokens=96,
                                              block_size=4, num_blocks=48))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, VOCAB, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 20, (1000,), generator=g)]
    prompts[17] = [5] * 170  # longer than max_model_len 160: fails alone
    sps = [SamplingParams(max_tokens=1 + i % 5, temperature=0, ignore_eos=True)
           for i in range(1000)]
    outs = engine.generate(prompts, sps, use_tqdm=False)
    assert len(outs) == 1000 and len({o.request_id for o in outs}) == 1000
    assert outs[17].finish_reason == "error" and "max_model_len" in outs[17].error
    for i, o in enumerate(outs):
        if i != 17:
            assert o.finished and o.finish_reason == "length" and len(o.token_ids) == 1 + i % 5
            assert list(o.prompt_token_ids) == prompts[i]
    assert engine.runner.pool.allocator.num_free == 48
    assert not engine.has_unfinished() and engine.requests == {}


def test_prompt_larger_than_pool_fails_alone(models):
    model, _ = models
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=8))
    outs = engine.generate(prompts_of([40, 5]), SamplingParams(max_tokens=3, temperature=0),
                           use_tqdm=False)
    assert outs[0].finish_reason == "error" and "KV blocks" in outs[0].error
    assert "num_blocks" in outs[0].error
    assert outs[1].finish_reason in ("length", "stop") and outs[1].error is None


def test_request_outgrowing_the_pool_fails_with_its_own_error(models):
    model, _ = models
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=4))
    outs = engine.generate(prompts_of([10]), SamplingParams(max_tokens=30, ignore_eos=True),
                           use_tqdm=False)
    assert outs[0].finish_reason == "error" and "whole pool" in outs[0].error
    assert engine.runner.pool.allocator.num_free == 4


def test_abort_in_flight_frees_blocks(models):
    model, _ = models
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64))
    rids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True))
            for p in prompts_of([12, 20])]
    for _ in range(3):
        engine.step()
    assert engine.stats().blocks_used > 0
    engine.abort(rids[0])
    outs = {o.request_id: o for o in engine.step()}
    assert outs[rids[0]].finish_reason == "abort" and outs[rids[0]].finished
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id != rids[0]
    assert engine.runner.pool.allocator.num_free == 64


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 3}, "min_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -3}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
        ({"block_size": 12}, "block_size"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"memory_fraction": 1.5}, "memory_fraction"),
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype"),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
    ],
)
def test_bad_engine_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"EngineConfig\.{field} must be"):
        EngineConfig(**kwargs)


def test_bad_prompts_and_ids(models):
    model, _ = models
    engine = Engine(model, None, EngineConfig(num_blocks=16))
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("hello")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([5, VOCAB + 3])
    with pytest.raises(ValueError, match="non-empty list"):
        engine.add_request([])
    rid = engine.add_request([5, 6], request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([5, 6], request_id=rid)
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(tiny_llama(), None, EngineConfig(max_model_len=1000, num_blocks=4))
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        engine.generate([[5]], [SamplingParams(), SamplingParams()])


def test_stop_conditions_and_logprobs(models):
    model, ref = models
    tok = ByteTokenizer()
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    p = prompts_of([9])[0]
    full = hf_greedy(ref, p, 12)
    greedy = dict(temperature=0, ignore_eos=True)
    # stop token id: kept in the output, reason recorded
    sp = SamplingParams(max_tokens=12, stop_token_ids=[full[4]], **greedy)
    out = engine.generate([p], sp, use_tqdm=False)[0]
    k = full.index(full[4])
    assert list(out.token_ids) == full[: k + 1] and out.stop_reason == full[4]
    assert out.finish_reason == "stop"
    # stop string: the text is cut before it
    text = tok.decode(full)
    s = text[5:7]
    out = engine.generate([p], SamplingParams(max_tokens=12, stop=s, **greedy),
                          use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.stop_reason == s
    assert out.text == text[: text.find(s)]
    # EOS ends a request unless ignore_eos / min_tokens; min_tokens masks it
    eos_model = tiny_llama()  # same weights; its EOS is the first greedy token
    eos_model.generation_config.eos_token_id = full[0]
    e2 = Engine(eos_model, None, EngineConfig(num_blocks=64))
    out = e2.generate([p], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
    assert out.token_ids == (full[0],) and out.finish_reason == "stop"
    out = e2.generate([p], SamplingParams(max_tokens=8, min_tokens=5, temperature=0),
                      use_tqdm=False)[0]
    assert len(out.token_ids) >= 5 and full[0] not in out.token_ids[:5]
    # logprobs: the chosen token's log-prob and the top-k of the raw distribution
    out = engine.generate([p], SamplingParams(max_tokens=3, logprobs=2, **greedy),
                          use_tqdm=False)[0]
    with torch.no_grad():
        lp = ref(torch.tensor([p])).logits[0, -1].log_softmax(-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] == int(lp.argmax())
    assert first.logprob == pytest.approx(float(lp.max()), abs=1e-4)
    assert [t for t, _ in first.top] == lp.topk(2).indices.tolist()


def test_top_k_top_p_masks():
    logits = torch.tensor([3.0, 1.0, 2.0, 0.0])
    assert torch.isinf(apply_top_k_top_p(logits, 2, 1.0)).tolist() == [False, True, False, True]
    # probs ~ [0.64, 0.09, 0.24, 0.03]: top_p 0.7 keeps the two most likely
    kept = ~torch.isinf(apply_top_k_top_p(logits, 0, 0.7))
    assert kept.tolist() == [True, False, True, False]
    assert (~torch.isinf(apply_top_k_top_p(logits, 0, 0.01))).sum() == 1


def test_background_loop_threads_and_stream(models):
    model, ref = models
    prompts = prompts_of([7, 13, 21, 4, 30, 11])
    with Engine(model, None, EngineConfig(num_blocks=64, max_num_batched_tokens=16)) as engine:
        engine.start()
        results: dict[int, list[int]] = {}

        def worker(i):
            outs = engine.generate([prompts[i]], SamplingParams(max_tokens=6, min_tokens=6,
                                                                temperature=0), use_tqdm=False)
            results[i] = list(outs[0].token_ids)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        streamed = []
        for out in engine.stream(prompts[0], SamplingParams(max_tokens=5, min_tokens=5,
                                                            temperature=0)):
            streamed.extend(out.new_token_ids)
        assert out.finished
    for i, p in enumerate(prompts):
        assert results[i] == hf_greedy(ref, p, 6)
    assert streamed == hf_greedy(ref, prompts[0], 5)
    assert engine.runner.pool.allocator.num_free == 64


def test_stream_without_loop_and_early_close_aborts(models):
    model, _ = models
    engine = Engine(model, None, EngineConfig(num_blocks=32))
    it = engine.stream(prompts_of([8])[0], SamplingParams(max_tokens=40, ignore_eos=True))
    first = next(it)
    assert first.new_token_ids and not first.finished
    it.close()
    while engine.has_unfinished():
        engine.step()
    assert engine.runner.pool.allocator.num_free == 32


def test_metrics_are_ordered(models):
    model, _ = models
    engine = Engine(model, None, EngineConfig(num_blocks=64))
    (o,) = engine.generate(prompts_of([10]), SamplingParams(max_tokens=5, ignore_eos=True),
                           use_tqdm=False)
    m = o.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.queue_time >= 0 and m.ttft > 0 and m.tpot > 0 and m.num_generated == 5


# --- the scheduler alone (host only) ----------------------------------------------------------


def _req(rid, n_prompt, max_tokens=4):
    return Request(rid, list(range(4, 4 + n_prompt)), SamplingParams(max_tokens=max_tokens))


def test_scheduler_decodes_first_then_prefill_chunks_under_budget():
    s = Scheduler(EngineConfig(max_num_batched_tokens=10, block_size=4),
                  BlockAllocator(64, 4))
    a, b = _req("a", 6), _req("b", 25)
    s.add(a)
    s.add(b)
    plan, _ = s.schedule()
    assert plan.request_ids == ["a", "b"] and plan.num_scheduled == [6, 4]
    assert plan.sample_request_ids == ["a"]  # b's chunk does not reach its end
    s.on_step_done(plan, {"a": a, "b": b})
    a.output_token_ids.append(7)
    plan, _ = s.schedule()
    assert plan.request_ids == ["a", "b"] and plan.num_scheduled == [1, 9]  # decode first
    assert plan.positions[:2] == [6, 4]
    assert plan.slot_mapping[0] == a.blocks[1] * 4 + 2


def test_scheduler_preempts_newest_first():
    s = Scheduler(EngineConfig(max_num_batched_tokens=100, block_size=4), BlockAllocator(6, 4))
    reqs = {r.request_id: r for r in (_req("a", 8), _req("b", 8), _req("c", 4))}
    for r in reqs.values():
        s.add(r)
    plan, _ = s.schedule()
    assert plan.request_ids == ["a", "b", "c"]  # 2 + 2 + 1 blocks of 6
    s.on_step_done(plan, reqs)
    for r in reqs.values():
        r.output_token_ids.append(5)
    plan, _ = s.schedule()  # a and b each need a new block: c (newest), then b go
    assert plan.preempted == ["c"] and plan.request_ids == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"] and reqs["c"].blocks == []


def test_tune_batch_sweeps_and_picks_within_bound(models):
    from infopt.batching.tune import percentile, tune_batch

    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    model, _ = models
    res = tune_batch(model, None, prompts_of([5, 9, 14, 3]), 4, max_num_seqs=(1, 4),
                     max_num_batched_tokens=(8, 32), base=EngineConfig(num_blocks=32))
    assert len(res.rows) == 4 and {r.config["max_num_seqs"] for r in res.rows} == {1, 4}
    assert res.pick is max(res.rows, key=lambda r: r.output_tok_s)
    assert any(r.on_frontier for r in res.rows) and "pick" in res.format()
    tight = tune_batch(model, None, prompts_of([5, 9]), 3, max_num_seqs=(2,),
                       max_num_batched_tokens=(16,), tpot_bound_s=1e-9,
                       base=EngineConfig(num_blocks=32))
    assert tight.pick is None and not tight.rows[0].meets_bound
    with pytest.raises(ValueError, match="tpot_bound_s"):
        tune_batch(model, None, prompts_of([5]), 3, tpot_bound_s=0)


def test_prefix_hit_reuses_all_but_the_last_token_through_a_block_copy(models):
    model, ref = models
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=32,
                                              enable_prefix_caching=True))
    p = prompts_of([16])[0]  # four full blocks
    sp = SamplingParams(max_tokens=6, min_tokens=6, temperature=0)
    first = engine.generate([p], sp, use_tqdm=False)[0]
    again = engine.generate([p, p[:10]], sp, use_tqdm=False)
    assert again[0].metrics.num_cached_tokens == 15  # the last block is shared, then copied
    assert again[1].metrics.num_cached_tokens == 8  # two full blocks of the 10-token prompt
    assert first.token_ids == again[0].token_ids == tuple(hf_greedy(ref, p, 6))
    assert list(again[1].token_ids) == hf_greedy(ref, p[:10], 6)
    alloc = engine.runner.pool.allocator
    assert alloc.num_free == 32 and alloc.stats.hit_tokens == 23


def test_tune_batch_cli_runs_the_sweep_and_rejects_bad_grids(models, capsys, monkeypatch):
    import infopt
    from infopt import cli
    from infopt.batching import workload

    def run(*argv):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = e.code
        return code, *capsys.readouterr()

    code, _, err = run("tune-batch", "--max-num-seqs", "4,0")
    assert code == 2 and "--max-num-seqs" in err and ">= 1" in err
    code, _, err = run("tune-batch", "--tpot-bound", "-1")
    assert code == 2 and "--tpot-bound" in err
    model, _ = models
    reqs = [workload.SampledRequest(p, "", 3, str(i)) for i, p in enumerate(prompts_of([5, 9]))]
    monkeypatch.setattr(infopt, "load_model", lambda name, dtype: (model, None))
    monkeypatch.setattr(workload, "sample_requests", lambda tok, n, **kw: reqs)
    code, out, _ = run("tune-batch", "--max-num-seqs", "1,2", "--max-num-batched-tokens", "16")
    assert code == 0 and out.count("| 16 |") == 2 and "pick" in out
