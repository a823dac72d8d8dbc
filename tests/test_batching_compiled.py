"""The compiled decode step (``EngineConfig(compile=...)``, ``wrap_model(compile=...)``): greedy
output identical to the eager engine and to HF ``generate`` on tiny random models (padded
buckets, sliding windows, soft-capping, quantized linears), eager fallback for prefills, and
clear errors. Speed is measured by ``infopt bench``, not here."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import infopt
from infopt.batching import CompileConfig, Engine, EngineConfig, SamplingParams

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2,
             bos_token_id=1)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **SMALL)).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(num_hidden_layers=2, sliding_window=7,
                                                **SMALL)).eval()
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=6,
                                              attn_logit_softcapping=5.0, **SMALL)).eval()
    if kind == "llama-int4":
        cfg = LlamaConfig(num_hidden_layers=2, **{**SMALL, "hidden_size": 128,
                                                   "intermediate_size": 256})
        return infopt.wrap_model(LlamaForCausalLM(cfg).eval(), quant="int4")
    raise ValueError(kind)


def prompts(lengths=(3, 11, 27), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


def run(model, config, ps, n=16):
    engine = Engine(model, None, config)
    outs = engine.generate(ps, SamplingParams(max_tokens=n, min_tokens=n, temperature=0),
                           use_tqdm=False)
    return engine, [list(o.token_ids) for o in outs]


def test_compiled_decode_equals_eager_with_padded_buckets():
    model = build("llama")
    cfg = dict(block_size=4, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64)
    _, eager = run(model, EngineConfig(**cfg), prompts())
    cc = CompileConfig(batch_buckets=(1, 2, 4))
    engine, compiled = run(model, EngineConfig(**cfg, compile=cc), prompts())
    assert compiled == eager
    c = engine.runner.compiled
    assert c.num_compiled_steps > 0  # the decodes ran compiled ...
    assert c.num_eager_steps > 0  # ... the prefills eager
    assert set(c.compile_seconds) <= {1, 2, 4} and 4 in c.compile_seconds  # 3 rows -> bucket 4
    # The scratch block stays reserved; every request's blocks came back.
    assert engine.runner.pool.allocator.num_free == 64 - 1
    # A second batch of another composition reuses the graphs.
    before = dict(c.compile_seconds)
    _, again = (engine, [list(o.token_ids) for o in engine.generate(
        prompts((5, 8)), SamplingParams(max_tokens=6, min_tokens=6, temperature=0),
        use_tqdm=False)])  # fmt: skip
    _, ref = run(model, EngineConfig(**cfg), prompts((5, 8)), n=6)
    assert again == ref
    assert set(c.compile_seconds) - set(before) <= {2}


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "llama-int4"])
def test_compiled_decode_on_windowed_softcapped_and_quantized_models(kind):
    model = build(kind)
    cfg = dict(block_size=4, num_blocks=96, max_num_seqs=4)
    _, eager = run(model, EngineConfig(**cfg), prompts((3, 9, 22)), n=20)
    engine, compiled = run(model, EngineConfig(**cfg, compile=CompileConfig(batch_buckets=(4,))),
                           prompts((3, 9, 22)), n=20)
    assert compiled == eager
    assert engine.runner.compiled.num_compiled_steps >= 19


def test_batches_beyond_the_largest_bucket_run_eager():
    model = build("llama")
    cc = CompileConfig(batch_buckets=(1,), backend="eager")
    engine, outs = run(model, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=3,
                                           compile=cc), prompts(), n=5)
    _, ref = run(model, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=3), prompts(), n=5)
    assert outs == ref
    c = engine.runner.compiled
    assert c.buckets == (1,)
    assert c.num_compiled_steps == 0 and c.num_eager_steps == engine.num_steps
    # Buckets above max_num_seqs give way to a bucket of exactly max_num_seqs.
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=3,
                                              compile=CompileConfig(batch_buckets=(1, 2, 4))))
    assert engine.runner.compiled.buckets == (1, 2, 3)


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kv", [None, "paged-prefix"])
def test_wrap_model_compile_generate_equals_hf(kv):
    ref = build("llama")
    model = infopt.wrap_model(build("llama"), kv=kv, compile=True)
    engine = infopt.batching.model_engine(model)
    assert engine.runner.compiled is not None
    p = prompts((7,))[0]
    out = model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12,
                         do_sample=False)
    assert out[0, len(p):].tolist() == hf_greedy(ref, p, 12)
    assert engine.runner.compiled.num_compiled_steps >= 11
    applied = [a["option"] for a in infopt.applied_configs(model)]
    assert applied[-1] == "compile"


def test_compile_config_errors_name_the_field():
    with pytest.raises(ValueError, match="backend"):
        CompileConfig(backend="tvm")
    with pytest.raises(ValueError, match="mode"):
        CompileConfig(mode="fast")
    with pytest.raises(ValueError, match="batch_buckets"):
        CompileConfig(batch_buckets=(4, 2))
    with pytest.raises(ValueError, match="batch_buckets"):
        CompileConfig(batch_buckets=())
    with pytest.raises(ValueError, match="dynamic"):
        CompileConfig(dynamic="yes")
    with pytest.raises(ValueError, match="compile"):
        EngineConfig(compile="inductor")
    with pytest.raises(ValueError, match="inductor"):
        infopt.wrap_model(build("llama"), compile="turbo")
    with pytest.raises(TypeError, match="compile="):
        infopt.wrap_model(build("llama"), compile=1)
    plain = build("llama")
    assert infopt.wrap_model(plain, compile=False) is plain and not infopt.applied_configs(plain)
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        Engine(build("llama"), None, EngineConfig(block_size=4, num_blocks=1,
                                                   compile=CompileConfig()))
    assert CompileConfig.from_dict(CompileConfig(batch_buckets=(1, 8)).to_dict()) == \
        CompileConfig(batch_buckets=(1, 8))
    with pytest.raises(ValueError, match="lean_guards"):
        CompileConfig(lean_guards=1)
    # A version-1 dict (saved before lean_guards existed) keeps every guard, as it compiled.
    v1 = CompileConfig().to_dict()
    v1 = {**v1, "version": 1, "fields": {k: v for k, v in v1["fields"].items()
                                         if k != "lean_guards"}}
    assert CompileConfig.from_dict(v1) == CompileConfig(lean_guards=False)


@pytest.mark.parametrize("lean", [True, False])
def test_lean_guards_on_and_off_give_the_eager_tokens(lean):
    """lean_guards drops dynamo's module guards and inductor's input asserts: the output must
    not change, and a second generate call must reuse the graph (no recompile)."""
    model = build("llama")
    cfg = dict(block_size=4, num_blocks=64, max_num_seqs=2)
    _, eager = run(model, EngineConfig(**cfg), prompts((4, 13)))
    engine, compiled = run(model, EngineConfig(**cfg, compile=CompileConfig(
        batch_buckets=(2,), lean_guards=lean)), prompts((4, 13)))
    assert compiled == eager
    c = engine.runner.compiled
    steps = c.num_compiled_steps
    from torch._dynamo.utils import counters

    compiled_frames = counters["frames"]["ok"]
    again = engine.generate(prompts((4, 13)), SamplingParams(max_tokens=16, min_tokens=16,
                                                              temperature=0), use_tqdm=False)
    assert [list(o.token_ids) for o in again] == eager
    assert c.num_compiled_steps > steps
    assert counters["frames"]["ok"] == compiled_frames  # nothing was compiled again


def test_compile_composes_with_prompt_lookup_speculation():
    ref = build("llama")
    model = infopt.wrap_model(build("llama"), kv="paged", spec="prompt-lookup", compile=True)
    engine = infopt.batching.model_engine(model)
    assert engine.proposer is not None and engine.runner.compiled is not None
    g = torch.Generator().manual_seed(3)
    motif = torch.randint(4, VOCAB, (6,), generator=g).tolist()
    p = motif * 4  # repeats, so the proposer finds n-gram drafts
    out = model.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20,
                         do_sample=False)
    assert out[0, len(p):].tolist() == hf_greedy(ref, p, 20)


def test_a_model_that_cannot_compile_says_why_and_runs_eager(caplog):
    model = build("llama")
    _, ref = run(model, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=4), prompts(), n=6)
    # A forward hook with a graph break: fullgraph tracing of the decode step fails.
    model.model.layers[0].register_forward_hook(lambda *a: torch._dynamo.graph_break())
    with caplog.at_level("WARNING", logger="infopt.batching.compiled"):
        engine, outs = run(model, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=4,
                                               compile=CompileConfig(backend="eager")),
                           prompts(), n=6)
    assert outs == ref
    c = engine.runner.compiled
    assert c.disabled is not None and c.num_compiled_steps == 0
    assert "could not be compiled" in caplog.text and "running eager" in caplog.text


def test_inductor_cache_goes_to_the_configured_directory(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", torch_default())  # what torch sets itself
    Engine(build("llama"), None, EngineConfig(block_size=4, num_blocks=8, compile=CompileConfig(
        cache_dir=str(tmp_path / "ind"))))  # fmt: skip
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ind")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice
    Engine(build("llama"), None, EngineConfig(block_size=4, num_blocks=8, compile=CompileConfig(
        cache_dir=str(tmp_path / "other"))))  # fmt: skip
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_compiles_when_no_backend_probe_ran_yet():
    """The first compiled step may be the first call of an op in the process (the prefill ran
    sdpa, not the paged kernel): its backend probe loads the extension under a lock that tracing
    cannot enter. The engine primes every probe before compiling, so the step still compiles;
    the float32 linears run the dense_gemv kernel inside the graph. (Probe caches are cleared
    after the prefill, as in a process where nothing has called the ops yet.)"""
    from infopt.ops import registry

    model = build("llama")
    cfg = EngineConfig(block_size=4, num_blocks=64, max_num_seqs=2, max_num_batched_tokens=64,
                       compile=CompileConfig(batch_buckets=(1, 2)))
    saved = {name: dict(e.probe_cache) for name, e in registry._OPS.items()}
    try:
        engine = Engine(model, None, cfg)
        engine.add_request(prompts((5,))[0], SamplingParams(max_tokens=6, min_tokens=6,
                                                            temperature=0))
        engine.step()  # the prefill, eager
        for e in registry._OPS.values():
            e.probe_cache.clear()
        while engine.has_unfinished():
            engine.step()
    finally:
        for name, e in registry._OPS.items():
            e.probe_cache.clear()
            e.probe_cache.update(saved[name])
    c = engine.runner.compiled
    assert c.disabled is None, c.disabled
    assert c.num_compiled_steps > 0 and c.dense_gemv_layers > 0


def test_lean_guards_keep_two_engines_graphs_apart():
    """Without module guards, dynamo could hand one engine's graph to another engine's frame of
    the same method (its entries live on the shared code object): a float32 model compiled
    first, then the same architecture in int8, whose layers have no ``weight``, must still
    compile its own."""
    cfg = dict(block_size=4, num_blocks=64, max_num_seqs=2)
    for kind in ("float32", "int8"):
        model = build("llama") if kind == "float32" else infopt.wrap_model(build("llama"),
                                                                           quant="int8")
        _, eager = run(model, EngineConfig(**cfg), prompts((4, 13)))
        engine, compiled = run(model, EngineConfig(**cfg, compile=CompileConfig(
            batch_buckets=(2,))), prompts((4, 13)))
        assert compiled == eager, kind
        c = engine.runner.compiled
        assert c.disabled is None and c.num_compiled_steps > 0, (kind, c.disabled)
