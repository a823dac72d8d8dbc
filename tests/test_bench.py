"""Tests for infopt.bench: timing logic, runner plumbing, ratios, report and JSON.

A tiny random LlamaForCausalLM and a byte-level tokenizer stand-in are injected through
``run_bench(loader=...)``, so nothing here needs the real model; the end-to-end run on the
real default model lives in tests/test_cli.py (marked ``model``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infopt.bench import (
    BenchConfig,
    TimingStreamer,
    get_bench_config,
    list_bench_configs,
    model_bytes,
    resolve_configs,
    run_bench,
    timed_generate,
)
from infopt.bench.report import format_table
from infopt.bench.timing import _eos_suppression

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


class ByteTokenizer:
    """Minimal tokenizer stand-in: one id per UTF-8 byte (vocab 256)."""

    pad_token_id = 0
    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)  # every load gives the same weights, like loading a checkpoint
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype).eval()


def offline_compare(*args, **kwargs):
    """The real infopt.eval.compare with prompts cut from TEXT (no corpus download)."""
    from infopt.eval import compare

    if kwargs.get("prompts") is None:
        kwargs["prompts"] = [TEXT[i : i + 24] for i in range(0, 24 * kwargs["n_prompts"], 24)]
    return compare(*args, **kwargs)


def tiny_loader(calls: list | None = None):
    def load(name: str, dtype: torch.dtype, device: str):
        if calls is not None:
            calls.append((name, dtype, device))
        return tiny_llama(dtype).to(device), ByteTokenizer()

    return load


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeModel:
    """``generate`` that streams like HF (prompt first) while advancing a fake clock."""

    def __init__(self, clock: FakeClock, prefill_s: float, step_s: float, chunk: int = 1):
        self.clock, self.prefill_s, self.step_s, self.chunk = clock, prefill_s, step_s, chunk
        self.kwargs: dict = {}

    def generate(self, input_ids, *, max_new_tokens, streamer, **kwargs):
        self.kwargs = kwargs
        streamer.put(input_ids.cpu())
        self.clock.t += self.prefill_s
        streamer.put(torch.tensor([7]))  # the first token comes out of prefill
        done = 1
        while done < max_new_tokens:
            n = min(self.chunk, max_new_tokens - done)
            self.clock.t += self.step_s
            streamer.put(torch.full((1, n), 7))
            done += n
        streamer.end()
        return torch.cat([input_ids, torch.full((1, done), 7)], dim=1)


def test_streamer_timing_is_exact_with_injected_clock():
    clock = FakeClock()
    model = FakeModel(clock, prefill_s=0.25, step_s=0.05)
    t = timed_generate(model, torch.arange(10).unsqueeze(0), 9, pad_token_id=0, clock=clock)
    assert t.n_new == 9
    assert t.ttft_s == pytest.approx(0.25)
    assert t.decode_tok_s == pytest.approx(8 / (8 * 0.05))  # (n - 1) / (t_last - t_first)
    assert t.total_s == pytest.approx(0.25 + 8 * 0.05)
    # exactly-n tokens, greedy, EOS suppressed: what makes every row do the same work
    assert model.kwargs["min_new_tokens"] == 9 and model.kwargs["do_sample"] is False
    assert model.kwargs["pad_token_id"] == 0


def test_streamer_multi_token_chunks():
    """Speculative decoding puts several tokens per step; all count, the first chunk is TTFT."""
    clock = FakeClock()
    model = FakeModel(clock, prefill_s=0.5, step_s=0.1, chunk=3)
    t = timed_generate(model, torch.arange(4).unsqueeze(0), 10, pad_token_id=0, clock=clock)
    assert t.n_new == 10 and t.ttft_s == pytest.approx(0.5)
    assert t.decode_tok_s == pytest.approx(9 / 0.3)  # 3 steps of 3 tokens after the first


def test_streamer_skips_only_the_prompt_echo():
    s = TimingStreamer(torch.tensor([[5, 6, 7]]), clock=FakeClock())
    s.begin()
    s.put(torch.tensor([[5, 6, 7]]))  # prompt echo
    s.put(torch.tensor([5]))
    s.put(torch.tensor([6, 7]))
    assert s.n_new == 3 and [n for _, n in s.chunks] == [1, 2]


def test_wrong_token_count_raises():
    class Short(FakeModel):
        def generate(self, input_ids, *, max_new_tokens, streamer, **kw):
            return super().generate(input_ids, max_new_tokens=max_new_tokens - 1, streamer=streamer)

    clock = FakeClock()
    with pytest.raises(RuntimeError, match="expected exactly 8"):
        timed_generate(
            Short(clock, 0.1, 0.1), torch.arange(3)[None], 8, pad_token_id=0, clock=clock
        )


def test_real_generate_streams_exact_count():
    model = tiny_llama()
    ids = torch.tensor([list(range(3, 19))])
    t = timed_generate(model, ids, 6, pad_token_id=0)
    assert t.n_new == 6 and t.ttft_s > 0 and t.decode_tok_s > 0


def test_registry_and_unknown_names():
    assert list_bench_configs()[:2] == ["baseline", "bf16"]
    assert get_bench_config("bf16").dtype == torch.bfloat16
    assert get_bench_config("baseline").wrap_options == {}
    with pytest.raises(ValueError, match=r"unknown bench config 'nope'; accepted: baseline, bf16"):
        get_bench_config("nope")
    with pytest.raises(ValueError, match="accepted"):
        run_bench("tiny", "baseline,nope", loader=tiny_loader(), progress=False)
    # baseline always first, added when missing, duplicates dropped
    assert [c.name for c in resolve_configs("bf16,bf16")] == ["baseline", "bf16"]
    with pytest.raises(ValueError, match="not both"):
        BenchConfig("x", "x", wrap_options={"quant": "int8"}, apply=lambda m: m)


def test_model_bytes_counts_tied_storage_once():
    m = tiny_llama()
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    by_storage = {p.data_ptr(): p.numel() * p.element_size() for p in m.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    assert model_bytes(m) == sum(by_storage.values()) + buffers
    assert model_bytes(m.to(torch.bfloat16)) * 2 == model_bytes(tiny_llama())


class FakeCompare:
    """Stand-in for infopt.eval.compare: KL grows with the candidate's element size gap."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, ref, cand, tok, **kw):
        self.calls.append(kw)
        bf16 = next(cand.parameters()).dtype == torch.bfloat16

        class R:
            def to_dict(self):
                return {
                    "ppl_ref": 10.0, "ppl_cand": 10.5 if bf16 else 10.0,
                    "ppl_rel_increase": 0.05 if bf16 else 0.0, "kl_mean": 0.01 if bf16 else 0.0,
                    "kl_max": 0.2 if bf16 else 0.0, "top1_agreement": 0.9 if bf16 else 1.0,
                    "greedy_prefix_match": 0.75 if bf16 else 1.0, "n_tokens": 99,
                    "n_prompts": 2,
                }  # fmt: skip

        return R()


def test_run_bench_rows_ratios_json_table(tmp_path):
    calls: list = []
    applied: list = []
    peer = BenchConfig("peer", "a peer hook", apply=lambda m: applied.append(m) or m)
    fake = FakeCompare()
    res = run_bench(
        "tiny", ["bf16", peer], loader=tiny_loader(calls), text=TEXT, compare_fn=fake,
        prompt_tokens=12, new_tokens=5, repeats=2, warmup=1, eval_tokens=64, eval_prompts=2,
        threads=1, progress=False,
    )  # fmt: skip
    assert [r.name for r in res.rows] == ["baseline", "bf16", "peer"]
    assert [c[1] for c in calls] == [torch.float32, torch.bfloat16, torch.float32]
    assert len(applied) == 1 and res.threads == 1

    base, bf16, _ = res.rows
    # every ratio of the baseline is exactly 1; others are against the baseline row
    assert all(v == 1.0 for v in base.ratios.values())
    assert (
        bf16.ratios["decode_speedup"] == bf16.decode_tok_s["median"] / base.decode_tok_s["median"]
    )
    assert bf16.ratios["ttft_speedup"] == base.ttft_ms["median"] / bf16.ttft_ms["median"]
    assert bf16.ratios["model_bytes"] == pytest.approx(0.5, rel=0.01)
    for r in res.rows:
        assert len(r.raw["ttft_ms"]) == 2 and len(r.raw["decode_tok_s"]) == 2
        assert r.ttft_ms["min"] <= r.ttft_ms["median"] <= r.ttft_ms["max"]
        assert r.peak_mem_bytes > 0 and r.model_bytes > 0

    # compare runs once per non-baseline row; the baseline row is the identity
    assert len(fake.calls) == 2 and fake.calls[0]["max_tokens"] == 64
    assert fake.calls[0]["texts"] == [TEXT] and fake.calls[0]["n_prompts"] == 2
    assert base.eval["source"] == "identity" and base.eval["kl_mean"] == 0.0
    assert base.eval["ppl_cand"] == 10.0 and base.eval["greedy_prefix_match"] == 1.0
    assert bf16.eval["kl_mean"] == 0.01

    table = res.format_table()
    for name in ("baseline", "bf16", "peer", "decode tok/s", "TTFT ms", "batch 1", "threads 1"):
        assert name in table
    assert "1.00x" in table and "+5.00" in table  # bf16's dppl % from the fake compare

    path = res.write_json(tmp_path / "out" / "bench.json")
    d = json.loads(path.read_text())
    for key in ("date", "machine", "versions", "model", "device", "batch_size", "baseline",
                "threads", "settings", "rows", "backend_report_text", "wall_s"):  # fmt: skip
        assert key in d
    assert d["date"].endswith("+00:00") and d["batch_size"] == 1
    assert {"torch", "transformers", "infopt"} <= set(d["versions"])
    row = d["rows"][1]
    assert row["config"]["dtype"] == "bfloat16" and row["raw"]["ttft_ms"]
    assert d["rows"][2]["config"]["apply"].endswith("<lambda>")


def test_run_bench_with_real_compare():
    """Plumbing into the real infopt.eval.compare (its field names reach the table)."""
    res = run_bench(
        "tiny", "baseline,bf16", loader=tiny_loader(), text=TEXT, prompt_tokens=8,
        new_tokens=3, repeats=1, warmup=0, eval_tokens=48, eval_prompts=2, progress=False,
        compare_fn=offline_compare,
    )  # fmt: skip
    base, bf16 = res.rows
    assert bf16.eval["source"] == "compare" and bf16.eval["n_tokens"] > 0
    assert math.isfinite(bf16.eval["kl_mean"]) and bf16.eval["kl_mean"] >= 0
    assert base.eval["ppl_cand"] == bf16.eval["ppl_ref"]
    last = format_table(res.rows).splitlines()[-1].split()
    assert last[0] == "bf16" and "-" not in last[-4:]  # KL, top1, greedy columns filled


def test_quality_hook_overrides_compare_figures():
    seen = []

    def through_cache(ref, cand, tok, text, max_tokens):
        seen.append((ref is not cand, text == TEXT, max_tokens))
        return {"ppl_cand": 11.0, "ppl_ref": 10.5, "kl_mean": 0.02, "source": "compare + kvcache"}

    hooked = BenchConfig("hooked", "quality hook", dtype=torch.bfloat16, quality=through_cache)
    res = run_bench(
        "tiny", ["bf16", hooked], loader=tiny_loader(), text=TEXT, compare_fn=FakeCompare(),
        prompt_tokens=8, new_tokens=3, repeats=1, warmup=0, eval_tokens=64, eval_prompts=2,
        progress=False,
    )  # fmt: skip
    base, bf16, row = res.rows
    assert seen == [(True, True, 64)]
    assert row.eval["ppl_cand"] == 11.0 and row.eval["kl_mean"] == 0.02
    assert row.eval["top1_agreement"] == bf16.eval["top1_agreement"]  # compare's, kept
    assert bf16.eval["kl_mean"] == 0.01  # rows without a hook are untouched
    # the baseline's identity row takes its ppl from a compare-only row, not the hooked one
    assert base.eval["ppl_cand"] == bf16.eval["ppl_ref"] != 10.5
    assert "hooked: ppl/KL/top1 decoded through the KV cache" in res.format_table()
    assert row.config["quality"].endswith("through_cache")


def test_kv_rows_score_quality_through_the_cache():
    pytest.importorskip("infopt.kvcache")
    for name in ("paged", "paged-int8", "paged-fp8", "paged-prefix"):
        assert get_bench_config(name).quality is not None, name


def test_eval_skipped_and_baseline_alone():
    res = run_bench(
        "tiny", "baseline", loader=tiny_loader(), text=TEXT, prompt_tokens=8, new_tokens=3,
        repeats=1, warmup=0, eval_tokens=0, progress=False,
    )  # fmt: skip
    assert [r.name for r in res.rows] == ["baseline"] and res.rows[0].eval is None
    assert res.rows[0].ratios["decode_speedup"] == 1.0
    assert "eval skipped" in res.format_table()


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="new_tokens must be an integer >= 2"):
        run_bench("tiny", "baseline", loader=tiny_loader(), new_tokens=1, progress=False)
    with pytest.raises(ValueError, match="prompt must be one of"):
        run_bench("tiny", "baseline", loader=tiny_loader(), prompt="poem", progress=False)


class RecordingLoader:
    """tiny_loader whose models record the prompt ids every generate call receives."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def __call__(self, name, dtype, device):
        model, tok = tiny_llama(dtype), ByteTokenizer()
        orig = model.generate

        def generate(input_ids, **kw):
            self.seen.append(input_ids[0].tolist())
            return orig(input_ids, **kw)

        model.generate = generate
        return model, tok


@pytest.mark.parametrize("kind", ["code", "grounded"])
def test_prompt_sets_cycle_over_timed_runs(kind):
    from infopt.eval import CODE_PROMPTS, GROUNDED_PROMPTS

    texts = CODE_PROMPTS if kind == "code" else GROUNDED_PROMPTS
    loader = RecordingLoader()
    res = run_bench(
        "tiny", "baseline,bf16", loader=loader, text=TEXT, prompt=kind, new_tokens=2,
        repeats=len(texts) + 1, warmup=1, eval_tokens=0, progress=False,
    )  # fmt: skip
    enc = [list(t.encode()) for t in texts]
    # per config: warmup on prompt 0, then timed run j on prompt j % n
    expect = [enc[0]] + [enc[j % len(enc)] for j in range(len(texts) + 1)]
    assert loader.seen == expect * 2
    assert res.settings["prompt"] == kind and f"set '{kind}'" in res.format_table()
    assert all(r.spec is None for r in res.rows)  # not speculative: no acceptance figures


def test_spec_rows_report_summed_acceptance():
    pytest.importorskip("infopt.speculative")
    from infopt.speculative import PromptLookupConfig

    cfg = BenchConfig("pl", "prompt lookup", wrap_options={"spec": PromptLookupConfig()})
    res = run_bench(
        "tiny", ["baseline", cfg], loader=tiny_loader(), text=TEXT, prompt_tokens=40,
        new_tokens=12, repeats=3, warmup=0, eval_tokens=0, progress=False,
    )  # fmt: skip
    base, pl = res.rows
    assert base.spec is None
    st = pl.spec
    # 3 timed runs of 12 tokens each: the counters are summed over all of them
    assert st["emitted"] == 3 * 12 and st["target_forwards"] >= 3
    assert st["accepted"] <= st["proposed"]
    assert st["acceptance_rate"] == pytest.approx(st["accepted"] / max(st["proposed"], 1))
    assert "speculative acceptance" in res.format_table()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_bench_on_cuda():
    """CUDA path: synced timing, max_memory_allocated peaks, GPU named in the header."""
    calls: list = []
    res = run_bench(
        "tiny", "baseline,bf16", device="cuda", loader=tiny_loader(calls), text=TEXT,
        prompt_tokens=16, new_tokens=6, repeats=2, warmup=1, eval_tokens=64, eval_prompts=2,
        progress=False, compare_fn=offline_compare,
    )  # fmt: skip
    assert all(c[2] == "cuda" for c in calls)
    base, bf16 = res.rows
    assert base.mem_method == "cuda.max_memory_allocated"
    # the peak includes the weights; the delta excludes the baseline kept for eval
    assert base.peak_mem_delta_bytes >= base.model_bytes
    assert bf16.peak_mem_bytes - bf16.peak_mem_delta_bytes >= base.model_bytes
    assert bf16.eval["source"] == "compare" and math.isfinite(bf16.eval["kl_mean"])
    assert res.machine["gpu"] and "GPU:" in res.format_table()


def test_eos_suppression_matches_min_new_tokens():
    """The timed runs' EOS suppression (one index_fill_ per step instead of HF's arange + isin
    min_new_tokens processor) generates exactly what min_new_tokens would, EOS never emitted."""
    model = tiny_llama()
    ids = torch.tensor([list(range(3, 19))])
    free = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 2])  # a token greedy decoding emits: make it the EOS
    model.generation_config.eos_token_id = eos
    ref = model.generate(
        ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )
    kwargs = _eos_suppression(model, 8)
    assert "min_new_tokens" not in kwargs
    got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
    assert torch.equal(got, ref) and eos not in got[0, ids.shape[1]:].tolist()
    assert timed_generate(model, ids, 8, pad_token_id=0).n_new == 8
    # generate functions that implement min_new_tokens themselves keep it
    def native_generate(*args, **kwargs):
        raise AssertionError("not called")

    native_generate.infopt_native_min_new_tokens = True
    model.generate = native_generate
    assert _eos_suppression(model, 8) == {"min_new_tokens": 8}


def test_default_rows_show_the_library():
    from infopt.bench.runner import DEFAULT_CONFIGS

    # int8, int4 (with the int8 head), a paged/prefix KV row and a speculative row
    assert {"int8", "int4", "paged-prefix", "spec-prompt-lookup"} <= set(DEFAULT_CONFIGS)
    assert get_bench_config("int4").wrap_options == {"quant": "int4"}
    for name in DEFAULT_CONFIGS:
        get_bench_config(name)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from infopt.bench.plot import plot_speed_quality

    res = run_bench(
        "tiny", "baseline,bf16", loader=tiny_loader(), text=TEXT, compare_fn=FakeCompare(),
        prompt_tokens=8, new_tokens=3, repeats=1, warmup=0, eval_tokens=64, eval_prompts=2,
        progress=False,
    )  # fmt: skip
    out = plot_speed_quality(res, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.endswith("png")


def test_plot_without_matplotlib_names_the_fix(monkeypatch):
    import importlib.util

    from infopt.bench import plot

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert "pip install matplotlib" in plot.plot_available()
    with pytest.raises(ImportError, match="--plot needs matplotlib"):
        plot.plot_speed_quality(object(), "x.png")
