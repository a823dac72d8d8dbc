"""Tests for infopt.bench.serve and ``infopt bench-serve``: the metrics maths against hand-computed
values, the seeded Poisson schedule, every row end to end on a tiny random LlamaForCausalLM
(injected through ``loader=``, with synthetic requests), the table / JSON and the CLI errors.
No speed assertions.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infopt import cli
from infopt.batching.workload import SampledRequest
from infopt.bench import serve
from infopt.bench.serve import (
    COLUMNS,
    DEFAULT_ROWS,
    ROWS,
    RequestRecord,
    percentile,
    poisson_arrivals,
    run_serve_bench,
    summarize_records,
)


def tiny_llama(name: str = "tiny", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    torch.manual_seed(0)  # every row loads the same weights, like a checkpoint
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype).to(device).eval(), None


def synthetic_requests(n: int = 6) -> list[SampledRequest]:
    # a shared 8-token "system prompt" so prefix caching has something to hit at block size 16
    head = tuple(range(3, 11))
    return [
        SampledRequest(head + tuple(range(20 + i, 30 + 3 * i)), "", 3 + i % 4, f"c{i}")
        for i in range(n)
    ]


# --- metrics ----------------------------------------------------------------------------------


def test_percentile_hand_computed():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 99) == pytest.approx(3.97)  # rank 2.97: 3 + 0.97 * (4 - 3)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q must be in"):
        percentile(xs, 101)
    np = pytest.importorskip("numpy")
    ys = [0.3, 9.1, 2.2, 5.5, 5.5, 1.0, 7.25]
    for q in (1, 25, 50, 90, 99):
        assert percentile(ys, q) == pytest.approx(float(np.percentile(ys, q)))


def test_request_record_ttft_tpot():
    r = RequestRecord(prompt_len=10, num_generated=5, arrival=1.0, first_token=1.5, finished=2.3)
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.2)  # 0.8 s over the 4 tokens after the first
    assert RequestRecord(10, 1, 0.0, 0.4, 0.4).tpot is None


def test_summarize_records_hand_computed():
    recs = [
        RequestRecord(100, 11, 0.0, 0.5, 1.5),  # ttft 500 ms, tpot 100 ms, e2e 1500 ms
        RequestRecord(50, 5, 0.5, 0.7, 1.1),  # ttft 200 ms, tpot 100 ms, e2e 600 ms
        RequestRecord(30, 1, 1.0, 1.9, 1.9),  # ttft 900 ms, no tpot, e2e 900 ms
    ]
    m = summarize_records(recs, duration_s=2.0)
    assert m["num_requests"] == 3 and m["prompt_tokens"] == 180 and m["output_tokens"] == 17
    assert m["output_tok_s"] == pytest.approx(8.5)
    assert m["total_tok_s"] == pytest.approx(98.5)
    assert m["requests_s"] == pytest.approx(1.5)
    assert m["ttft_ms"]["mean"] == pytest.approx(1600 / 3)
    assert m["ttft_ms"]["p50"] == pytest.approx(500)
    assert m["ttft_ms"]["p99"] == pytest.approx(500 + 0.98 * 400)  # rank 1.98 of [200, 500, 900]
    assert m["tpot_ms"] == pytest.approx({"mean": 100.0, "p50": 100.0, "p99": 100.0})
    assert m["e2e_ms"]["p50"] == pytest.approx(900)
    empty = summarize_records([], 0.0)
    assert math.isnan(empty["output_tok_s"]) and math.isnan(empty["ttft_ms"]["p50"])


def test_poisson_arrivals_seeded_with_the_right_mean():
    a = poisson_arrivals(20_000, 4.0, seed=1)
    assert a == poisson_arrivals(20_000, 4.0, seed=1)
    assert a != poisson_arrivals(20_000, 4.0, seed=2)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd = mean
    assert poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="request rate must be > 0"):
            poisson_arrivals(3, bad)


# --- end to end on a tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_result():
    reqs = synthetic_requests()
    return reqs, run_serve_bench(
        "tiny", num_requests=len(reqs), hf_sample=3, loader=tiny_llama, requests=reqs,
        max_num_seqs=4, max_num_batched_tokens=32, progress=False,
    )  # fmt: skip


def test_offline_every_row_produces_the_same_tokens(offline_result):
    reqs, res = offline_result
    assert [r.name for r in res.rows] == list(DEFAULT_ROWS)
    assert res.mode == "offline" and res.reference == "hf-generate-batch"
    want = [r.output_len for r in reqs]
    for row in res.rows:
        assert row.error is None, row.error
        got = row.raw["num_generated"]
        assert got == (want[:3] if row.name == "hf-generate" else want), row.name
        m = row.metrics
        assert m["output_tokens"] == sum(got) and m["duration_s"] > 0
        assert m["prompt_tokens"] == sum(r.prompt_len for r in reqs[: len(got)])
        assert all(t >= 0 for t in row.raw["ttft_s"])
        assert row.peak_mem_bytes > 0 and row.mem_method
        assert row.same_tokens is not None and 0 <= row.same_tokens <= 1
    assert res.row("hf-generate-batch").ratios["output_tok_s"] == 1.0
    # fp32 rows decode the same greedy tokens as HF's batched run on this model
    for name in ("hf-generate", "engine", "engine-prefix"):
        assert res.row(name).same_tokens == 1.0, name
    eng = res.row("engine")
    assert eng.kv_blocks_total == -(-res.settings["kv_budget_tokens"] // 16)
    assert 0 < eng.kv_blocks_peak <= eng.kv_blocks_total and eng.preemptions == 0
    assert eng.prefix_hit_rate == 0.0 and res.row("hf-generate-batch").kv_blocks_total is None
    assert res.settings["kv_budget_tokens"] == 4 * max(r.prompt_len + r.output_len for r in reqs)


def test_speculative_row_gives_the_engines_tokens():
    reqs = synthetic_requests()
    res = run_serve_bench(
        "tiny", ["engine", "engine-spec"], num_requests=len(reqs), loader=tiny_llama,
        requests=reqs, max_num_seqs=2, max_num_batched_tokens=32, progress=False,
    )  # fmt: skip
    eng, spec = res.row("engine"), res.row("engine-spec")
    assert eng.error is None and spec.error is None, (eng.error, spec.error)
    # prompt lookup is exact under greedy
    assert [r.token_ids for r in spec.records] == [r.token_ids for r in eng.records]
    assert spec.metrics["output_tokens"] == eng.metrics["output_tokens"]


def test_opt_in_rows_build_their_engine_configs():
    from infopt.batching import EngineConfig
    from infopt.bench.serve import _ENGINE_OPTIONS, engine_fields

    assert set(ROWS) - set(DEFAULT_ROWS) <= set(_ENGINE_OPTIONS)
    for name in _ENGINE_OPTIONS:
        EngineConfig(**engine_fields(name))  # validates every field


def test_table_and_json_have_every_column(offline_result, tmp_path):
    _, res = offline_result
    text = res.format_table()
    header = next(ln for ln in text.splitlines() if ln.startswith("| row"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    for name in DEFAULT_ROWS:
        assert f"| {name} |" in text
    assert "offline" in text and "torch " in text and "threads" in text and "6 ShareGPT" in text
    assert "hf-generate: the first 3 requests" in text
    d = json.loads(res.write_json(tmp_path / "serve.json").read_text())
    assert d["mode"] == "offline" and d["reference"] == "hf-generate-batch"
    assert d["settings"]["request_rate"] is None and d["request_rate"] is None  # inf -> null
    for row in d["rows"]:
        assert "records" not in row
        for key in ("output_tok_s", "total_tok_s", "requests_s", "ttft_ms", "tpot_ms",
                    "duration_s"):
            assert key in row["metrics"]
        for key in ("peak_mem_bytes", "kv_blocks_peak", "preemptions", "prefix_hit_rate",
                    "same_tokens", "ratios", "raw"):
            assert key in row
        assert set(row["metrics"]["ttft_ms"]) == {"mean", "p50", "p99"}


def test_online_engine_rows_follow_the_schedule():
    reqs = synthetic_requests(5)
    res = run_serve_bench(
        "tiny", ["engine", "engine-prefix"], num_requests=5, request_rate=50.0, seed=3,
        loader=tiny_llama, requests=reqs, max_num_seqs=4, max_num_batched_tokens=32,
        progress=False,
    )  # fmt: skip
    assert res.mode == "online" and res.reference == "engine"
    want = poisson_arrivals(5, 50.0, seed=3)
    for row in res.rows:
        assert row.error is None, row.error
        assert row.raw["arrival_s"] == pytest.approx(want)
        assert row.raw["num_generated"] == [r.output_len for r in reqs]
        assert all(t >= 0 for t in row.raw["ttft_s"])
    assert res.row("engine-prefix").prefix_hit_rate >= 0.0
    assert "Poisson arrivals at 50 req/s" in res.format_table()


def test_run_serve_bench_argument_errors():
    kw = {"loader": tiny_llama, "requests": synthetic_requests(2), "num_requests": 2}
    with pytest.raises(ValueError, match="unknown row.*accepted: hf-generate"):
        run_serve_bench("tiny", ["engine", "vllm"], **kw)
    with pytest.raises(ValueError, match="run offline only"):
        run_serve_bench("tiny", ["hf-generate-batch"], request_rate=2.0, **kw)
    with pytest.raises(ValueError, match="hf_sample must be an integer >= 1"):
        run_serve_bench("tiny", ["engine"], hf_sample=0, **kw)
    with pytest.raises(ValueError, match="2 requests given, num_requests=3"):
        run_serve_bench("tiny", ["engine"], **{**kw, "num_requests": 3}, progress=False)


def test_a_failing_row_keeps_the_others(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaputt")

    monkeypatch.setattr(serve, "_run_hf_batch", boom)
    res = run_serve_bench("tiny", ["hf-generate-batch", "engine"], num_requests=3,
                          loader=tiny_llama, requests=synthetic_requests(3), progress=False)
    assert res.row("hf-generate-batch").error == "RuntimeError: kaputt"
    assert res.row("engine").error is None and res.reference == "engine"
    assert "| hf-generate-batch | error: RuntimeError: kaputt |" in res.format_table()


def test_requests_sampled_from_conversations_with_a_hf_tokenizer(caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": 3 + i for i in range(200)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<s>",
                                  eos_token="</s>")
    words = lambda a, b: " ".join(f"w{i}" for i in range(a, b))
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": words(i, i + 6)},
                                                {"from": "gpt", "value": words(0, 5 + i)}]}
             for i in range(10)]

    def loader(name, dtype, device):
        return tiny_llama()[0], tok

    with caplog.at_level("WARNING", logger="infopt.batching.workload"):
        res = run_serve_bench("tiny", ["engine"], num_requests=4, max_output_tokens=6,
                              loader=loader, conversations=convs, progress=False)
    assert "no chat template" in caplog.text
    row = res.row("engine")
    assert row.error is None and res.settings["chat_template"] is False
    assert all(1 <= n <= 6 for n in row.raw["num_generated"])
    assert "raw text (no template)" in res.format_table()


# --- CLI --------------------------------------------------------------------------------------


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--rows", "engine,vllm"], "argument --rows: unknown row(s) 'vllm'; accepted: "
                                    "hf-generate, hf-generate-batch, engine"),
        (["--rows", ","], "argument --rows: unknown row(s) none given"),
        (["--request-rate", "0"], "argument --request-rate: must be > 0 requests/s or 'inf'"),
        (["--request-rate", "fast"], "argument --request-rate: expected a number"),
        (["--num-requests", "0"], "argument --num-requests: must be >= 1"),
        (["--max-output-tokens", "x"], "argument --max-output-tokens: expected an integer"),
        (["--hf-sample", "0"], "argument --hf-sample: must be >= 1"),
        (["--rows", "hf-generate,engine", "--request-rate", "2"],
         "argument --rows: hf-generate run offline only"),
    ],
)
def test_cli_argument_errors_exit_2(capsys, argv, fragment):
    code, _, err = run_main(capsys, "bench-serve", *argv)
    assert code == 2 and fragment in err, err


def test_cli_help_lists_rows(capsys):
    code, out, _ = run_main(capsys, "bench-serve", "--help")
    assert code == 0 and all(n in out for n in ROWS) and "--request-rate" in out
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "bench-serve" in out


def test_cli_runs_and_writes_json(capsys, monkeypatch, tmp_path):
    real = serve.run_serve_bench
    seen = {}

    def fake(model, rows, **kw):
        seen.update(kw, model=model, rows=rows)
        n = kw["num_requests"]
        return real(model, rows, **kw, loader=tiny_llama, requests=synthetic_requests(n))

    monkeypatch.setattr(serve, "run_serve_bench", fake)
    path = tmp_path / "out.json"
    code, out, err = run_main(capsys, "bench-serve", "--rows", "engine", "--num-requests", "3",
                              "--request-rate", "inf", "--json", str(path), "--quiet",
                              "--threads", "1", "--seed", "5")
    assert code == 0, err
    assert seen["rows"] == ["engine"] and seen["seed"] == 5 and seen["threads"] == 1
    assert math.isinf(seen["request_rate"]) and seen["max_output_tokens"] == 128
    assert "| engine |" in out and json.loads(path.read_text())["rows"][0]["name"] == "engine"

    monkeypatch.setattr(serve, "_run_engine", lambda *a, **k: 1 / 0)
    code, out, err = run_main(capsys, "bench-serve", "--rows", "engine", "--num-requests", "2",
                              "--quiet")
    assert code == 1 and "| engine | error: ZeroDivisionError" in out
    assert "infopt bench-serve: error: row engine failed: ZeroDivisionError" in err
