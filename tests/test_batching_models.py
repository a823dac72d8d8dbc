"""The engine on architectures whose layers differ: sliding windows on every layer (Mistral:
blocks behind the window are freed), hybrid sliding/full layers (Gemma 3, Qwen2 with
``use_sliding_window``), attention soft-capping (Gemma 2), quantized linears. Tiny random-weight
configs built locally; greedy outputs compared with HF ``generate`` alone (sdpa)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import infopt
from infopt.batching import Engine, EngineConfig, SamplingParams, layer_windows

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2,
             bos_token_id=1)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def build(kind: str):
    torch.manual_seed(0)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(num_hidden_layers=2, sliding_window=7, **SMALL))
    if kind == "gemma3":
        cfg = Gemma3TextConfig(num_hidden_layers=4, head_dim=16, sliding_window=6,
                               sliding_window_pattern=2, **SMALL)
        return Gemma3ForCausalLM(cfg)
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=6,
                                              attn_logit_softcapping=5.0, **SMALL))
    if kind == "qwen2-hybrid":
        cfg = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=5,
                          max_window_layers=2, **SMALL)
        return Qwen2ForCausalLM(cfg)
    raise ValueError(kind)


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return out[0, len(prompt):].tolist()


def _pair(kind):
    model, ref = build(kind).eval(), build(kind).eval()
    # HF's own reference kernel: sdpa, or eager where sdpa cannot soft-cap (Gemma 2).
    ref.set_attn_implementation("eager" if kind == "gemma2" else "sdpa")
    return model, ref


PROMPTS_LENS = [3, 9, 22, 41]


def _prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in PROMPTS_LENS]


@pytest.mark.parametrize("kind", ["mistral", "gemma3", "qwen2-hybrid", "gemma2"])
@pytest.mark.parametrize("budget", [5, 256])
def test_windowed_models_greedy_equal_hf(kind, budget):
    model, ref = _pair(kind)
    windows = layer_windows(model)
    assert any(w is not None for w in windows)
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=128,
                                              max_num_batched_tokens=budget))
    n = 24
    outs = engine.generate(_prompts(), SamplingParams(max_tokens=n, min_tokens=n, temperature=0),
                           use_tqdm=False)
    for p, o in zip(_prompts(), outs):
        assert list(o.token_ids) == hf_greedy(ref, p, n), f"{kind}: prompt of {len(p)}"
    assert engine.runner.pool.allocator.num_free == 128


def test_all_windowed_layers_free_blocks_behind_the_window():
    model, ref = _pair("mistral")  # window 7 on every layer
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64))
    prompt = _prompts()[3]  # 41 tokens
    rid = engine.add_request(prompt, SamplingParams(max_tokens=60, min_tokens=60, temperature=0))
    peak_per_step = []
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
        peak_per_step.append(engine.stats().blocks_used)
    assert out.request_id == rid and list(out.token_ids) == hf_greedy(ref, prompt, 60)
    # 101 tokens need 26 blocks without eviction; a 7-token window keeps at most 3-4 of them.
    assert max(peak_per_step[1:]) <= 4
    assert engine.runner.pool.allocator.num_free == 64


def test_hybrid_model_keeps_all_blocks():
    model, _ = _pair("gemma3")
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64))
    assert engine.scheduler.evict_window is None  # full layers still read every block
    engine.add_request(_prompts()[2], SamplingParams(max_tokens=10, ignore_eos=True))
    engine.step()
    assert engine.stats().blocks_used == 6  # 22 prompt tokens + 1 slot, nothing freed


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_model_runs_unchanged_in_engine(quant):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny():
        torch.manual_seed(0)
        cfg = LlamaConfig(num_hidden_layers=2, **{**SMALL, "hidden_size": 128,
                                                   "intermediate_size": 256})
        return infopt.wrap_model(LlamaForCausalLM(cfg).eval(), quant=quant)

    model, ref = tiny(), tiny()
    engine = Engine(model, None, EngineConfig(block_size=8, num_blocks=64,
                                              max_num_batched_tokens=16))
    outs = engine.generate(_prompts(), SamplingParams(max_tokens=12, min_tokens=12,
                                                      temperature=0), use_tqdm=False)
    for p, o in zip(_prompts(), outs):
        assert list(o.token_ids) == hf_greedy(ref, p, 12)


def test_unsupported_layer_kinds_are_refused():
    model = build("gemma3").eval()
    model.config.layer_types = ["sliding_attention", "chunked_attention"] * 2
    with pytest.raises(NotImplementedError, match="chunked_attention"):
        Engine(model, None, EngineConfig(num_blocks=8))


@pytest.mark.model
def test_default_model_greedy_batch_equals_hf_generate_alone():
    """SmolLM2-135M fp32: a chunked, mixed batch on the engine gives each prompt exactly what HF
    generate gives it alone."""
    torch.set_num_threads(2)
    model, tok = infopt.load_model("smollm2-135m", dtype=torch.float32)
    ref, _ = infopt.load_model("smollm2-135m", dtype=torch.float32)
    texts = ["The capital of France is", "def fibonacci(n):",
             "Once upon a time, in a land far away,", "Q: What is 2+2?\nA:"]
    prompts = [tok(t)["input_ids"] for t in texts]
    engine = Engine(model, tok, EngineConfig(max_num_batched_tokens=16, num_blocks=64))
    n = 24
    outs = engine.generate(prompts, SamplingParams(max_tokens=n, min_tokens=n, temperature=0),
                           use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert list(o.token_ids) == hf_greedy(ref, p, n)
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
