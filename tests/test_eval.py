"""Tests for infopt.eval: evaluation texts, perplexity and compare.

The fast tests use a tiny randomly initialised Llama and pre-tokenized ids (no tokenizer);
tests marked ``model`` need the package registry (Lee corpus) or the default model.
"""

import copy
import hashlib
import json
import math
import subprocess
import zipfile

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infopt.eval import (
    CODE_PROMPTS,
    LEE_SHA256,
    compare,
    eval_prompts,
    fetch_lee,
    generate_greedy,
    get_text,
    greedy_agreement,
    lee_articles,
    perplexity,
    pydoc_paragraphs,
    tokenize_text,
    window_spans,
)
from infopt.eval import texts as texts_mod

VOCAB = 97


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    # The default init (std 0.02) gives near-uniform logits; sharpen them so argmax/greedy
    # decisions are well separated and the metrics have something to measure.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return other


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g)


class _Bigram(torch.nn.Module):
    """Logits depend only on the current token: ``logits[b, l] = table[ids[b, l]]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, **kwargs):
        return self.table[input_ids]  # [B, L, V]


class _CharTok:
    """Minimal tokenizer: one token per character."""

    def __call__(self, text):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def _bigram_nll(table: torch.Tensor, ids: torch.Tensor, targets: list[int]) -> float:
    """Mean NLL of ids[t] given ids[t-1] for t in targets, computed in float64 by hand."""
    t64 = table.double()
    total = 0.0
    for t in targets:
        row = t64[ids[t - 1]]
        total += math.log(row.exp().sum().item()) - row[ids[t]].item()
    return total / len(targets)


# ---------------------------------------------------------------------------- windowing


@pytest.mark.parametrize(
    "n,window,stride", [(100, 16, None), (100, 16, 5), (17, 16, 16), (5, 8, 3)]
)
def test_window_spans_score_each_token_once(n, window, stride):
    spans = window_spans(n, window, stride)
    scored = [t for _, s, e in spans for t in range(s, e)]
    assert len(scored) == len(set(scored))
    assert all(e - b <= window and b < s for b, s, e in spans)
    if stride is None or stride == window:
        # non-overlapping: the first token of every window has no context, so it is skipped
        assert spans[0][0] == 0 and all(e - b == window for b, _, e in spans[:-1])
        # (a trailing 1-token window would score nothing, so it is not even run)
        assert len(scored) == n - math.ceil(n / window)
        assert len(spans) == math.ceil((n - 1) / window)
        assert sorted(scored) == [t for t in range(1, n) if t % window]
    else:
        assert sorted(scored) == list(range(1, n))
        # after the first window, each scored token sees >= window - stride tokens of context
        assert all(s - b >= window - stride for b, s, _ in spans[1:])


def test_window_spans_rejects_bad_args():
    with pytest.raises(ValueError):
        window_spans(10, 8, 9)
    with pytest.raises(ValueError):
        window_spans(10, 1)


# ---------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("window,stride", [(8, None), (8, 3), (64, None)])
def test_perplexity_matches_hand_computation(window, stride):
    torch.manual_seed(0)
    table = torch.randn(VOCAB, VOCAB) * 3
    ids = _ids(40)
    res = perplexity(_Bigram(table), None, ids, window=window, stride=stride, max_tokens=None)
    # A bigram model gives each target the same probability whatever its context, so the
    # expected value is the hand-computed NLL over exactly the targets the spans score.
    targets = [t for _, s, e in window_spans(40, window, stride) for t in range(s, e)]
    expected = _bigram_nll(table, ids, targets)
    assert res.n_tokens == len(targets)
    assert res.n_windows == len(window_spans(40, window, stride))
    assert res.nll == pytest.approx(expected, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(expected), rel=1e-6)


def test_perplexity_matches_hf_loss_and_counts():
    model = _tiny_llama()
    ids = _ids(200)
    res = perplexity(model, None, ids, window=256, max_tokens=None)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert res.n_tokens == 199 and res.n_windows == 1
    assert res.nll == pytest.approx(loss, rel=1e-5)

    strided = perplexity(model, None, ids, window=64, stride=16, max_tokens=None)
    assert strided.n_tokens == 199  # each token but the first scored exactly once
    chunks = perplexity(model, None, ids, window=64, max_tokens=None)
    assert chunks.n_tokens == 200 - chunks.n_windows == 196
    # more context per scored token can only help a model this size so much; just check
    # that the three schemes genuinely differ (i.e. the windows are really cut)
    assert len({round(r.nll, 6) for r in (res, strided, chunks)}) == 3


def test_perplexity_truncation_batching_and_determinism():
    model = _tiny_llama()
    ids = _ids(300)
    a = perplexity(model, None, ids, max_tokens=150, window=32)
    b = perplexity(model, None, ids[:150], max_tokens=None, window=32)
    assert a == b  # truncation == passing the prefix, and reruns are bit-identical
    batched = perplexity(model, None, ids, max_tokens=150, window=32, batch_size=3)
    assert batched.n_tokens == a.n_tokens and batched.n_windows == a.n_windows == 5
    assert batched.nll == pytest.approx(a.nll, rel=1e-5)
    assert model.training is False


def test_perplexity_of_string_uses_tokenizer():
    model = _tiny_llama()
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = _CharTok()(text)["input_ids"]
    assert perplexity(model, _CharTok(), text, window=32) == perplexity(model, None, ids, window=32)


def test_perplexity_restores_training_mode():
    model = _tiny_llama().train()
    perplexity(model, None, _ids(20), window=8)
    assert model.training is True


def test_tokenize_text_validates():
    assert tokenize_text(None, torch.arange(10)[None], 4).tolist() == [0, 1, 2, 3]
    assert tokenize_text(None, [5, 6, 7]).dtype == torch.long
    with pytest.raises(ValueError, match="tokenizer"):
        tokenize_text(None, "some text")
    assert tokenize_text(_CharTok(), "abcdef", 3).tolist() == [97 % VOCAB, 98 % VOCAB, 99 % VOCAB]
    with pytest.raises(ValueError, match="at least 2"):
        tokenize_text(None, [5])


# ---------------------------------------------------------------------------- compare


def test_compare_model_with_copy_of_itself_is_exactly_zero():
    model = _tiny_llama()
    prompts = [_ids(6, seed=s).tolist() for s in range(3)]
    res = compare(
        model, copy.deepcopy(model), None, _ids(150), prompts, window=64, max_new_tokens=8
    )
    assert res.kl_mean == 0.0 and res.kl_max == 0.0 and res.kl_p99 == 0.0
    assert res.top1_agreement == 1.0
    assert res.ppl_rel_increase == 0.0 and res.ppl_ref == res.ppl_cand
    assert res.greedy_prefix_match == 1.0 and res.greedy_exact_match == 1.0
    assert res.n_tokens == 150 - 3 and res.n_windows == 3 and res.n_prompts == 3
    # ppl_ref is the same measurement perplexity() makes
    assert res.ppl_ref == pytest.approx(perplexity(model, None, _ids(150), window=64).ppl)


def test_compare_perturbed_model_matches_direct_kl():
    ref = _tiny_llama()
    cand = _perturbed(ref)
    ids = _ids(120)
    res = compare(ref, cand, None, ids, prompts=[], window=128, max_tokens=None)
    with torch.no_grad():
        lr = ref(input_ids=ids[None]).logits[0, :-1].double().log_softmax(-1)
        lc = cand(input_ids=ids[None]).logits[0, :-1].double().log_softmax(-1)
    kl = (lr.exp() * (lr - lc)).sum(-1)
    assert res.kl_mean > 0
    assert res.kl_mean == pytest.approx(kl.mean().item(), rel=1e-4)
    assert res.kl_max == pytest.approx(kl.max().item(), rel=1e-4)
    assert res.kl_mean <= res.kl_p99 <= res.kl_max
    top1 = (lr.argmax(-1) == lc.argmax(-1)).double().mean().item()
    assert res.top1_agreement == pytest.approx(top1)
    assert res.ppl_cand != res.ppl_ref
    assert res.ppl_rel_increase == pytest.approx(res.ppl_cand / res.ppl_ref - 1)
    assert res.greedy_prefix_match is None and res.greedy_exact_match is None
    d = json.loads(json.dumps(res.to_dict()))
    assert d["kl_mean"] == res.kl_mean and d["n_tokens"] == 119


def test_compare_across_dtypes():
    ref = _tiny_llama()
    cand = copy.deepcopy(ref).to(torch.bfloat16)
    res = compare(ref, cand, None, [_ids(100)], prompts=[], window=50)
    # bf16 rounding of the weights perturbs the distribution a little, not a lot
    # (measured: KL 1.6e-4, top-1 1.0, ppl change -0.02 %)
    assert 0 < res.kl_mean < 5e-3
    assert res.top1_agreement > 0.9
    assert abs(res.ppl_rel_increase) < 0.01


def test_generate_greedy_and_agreement():
    model = _tiny_llama()
    prompts = [_ids(5, seed=s) for s in range(2)]
    out = generate_greedy(model, None, prompts, max_new_tokens=6)
    assert len(out) == 2 and all(1 <= len(o) <= 6 for o in out)
    for p, o in zip(prompts, out):
        # greedy = repeated argmax of the full-sequence logits
        seq = p.tolist()
        for tok in o:
            with torch.no_grad():
                nxt = model(input_ids=torch.tensor([seq])).logits[0, -1].argmax().item()
            assert tok == nxt
            seq.append(tok)
    assert generate_greedy(model, None, prompts, max_new_tokens=6) == out
    # string prompts go through the tokenizer and give the same result as their ids
    text = "greedy"
    assert generate_greedy(model, _CharTok(), [text], 4) == generate_greedy(
        model, None, [_CharTok()(text)["input_ids"]], 4
    )


def test_greedy_agreement_definition():
    assert greedy_agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]]) == (
        pytest.approx((2 / 3 + 1) / 2),
        0.5,
    )
    assert greedy_agreement([[1, 2]], [[1, 2, 3]]) == (pytest.approx(2 / 3), 0.0)
    assert greedy_agreement([[]], [[]]) == (1.0, 1.0)
    assert greedy_agreement([[7, 1]], [[8, 1]]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        greedy_agreement([[1]], [])


# ---------------------------------------------------------------------------- texts


def test_pydoc_text_is_english_prose():
    text = get_text("pydoc")
    assert len(text) > 100_000
    words = text.split()
    for w in ("the", "of", "and", "is", "function", "object"):
        assert words.count(w) > 50, w
    assert ">>>" not in text and "::=" not in text
    assert text == get_text("pydoc")  # deterministic
    assert all("  " not in p and "\n" not in p for p in pydoc_paragraphs())


def test_prompts_and_code_prompts():
    prompts = eval_prompts(6, "pydoc")
    assert prompts == eval_prompts(6, "pydoc") and len(set(prompts)) == 6
    assert all(1 <= len(p.split()) <= 12 and p == p.strip() for p in prompts)
    with pytest.raises(ValueError):
        eval_prompts(0, "pydoc")
    with pytest.raises(ValueError):
        get_text("nope")
    assert len(CODE_PROMPTS) >= 12 and len(set(CODE_PROMPTS)) == len(CODE_PROMPTS)
    for p in CODE_PROMPTS:
        # each prompt is the head of valid Python: it compiles once given a body
        last = p.rstrip("\n").split("\n")[-1]
        indent = len(last) - len(last.lstrip()) + (4 if last.endswith(":") else 0)
        compile(p + " " * indent + "pass\n", "<prompt>", "exec")


def test_fetch_lee_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path))

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(texts_mod.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"gensim==4\.4\.0.*(?s:.*)retry"):
        fetch_lee()
    assert not (tmp_path / "data" / "lee_background.cor").exists()


def test_fetch_lee_rejects_wrong_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "gensim-4.4.0-fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(texts_mod.LEE_MEMBER, "not the lee corpus\n")
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_lee(wheel=wheel)
    assert not (tmp_path / "cache" / "data" / "lee_background.cor").exists()


@pytest.mark.model
def test_lee_fetch_and_cache(tmp_path, monkeypatch):
    path = fetch_lee()  # downloads ~28 MB once into the user cache, then reuses it
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == LEE_SHA256
    arts = lee_articles()
    assert len(arts) == 300 and arts[0].startswith("Hundreds of people have been forced")
    assert len(get_text("lee")) > 300_000 and len(eval_prompts(8)) == 8

    # offline path: extract from a local wheel into a fresh cache, replacing a corrupt file
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "gensim-4.4.0-local.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(texts_mod.LEE_MEMBER, data)
    target = tmp_path / "cache" / "data" / "lee_background.cor"
    target.parent.mkdir(parents=True)
    target.write_text("corrupt")
    assert fetch_lee(wheel=wheel) == target
    assert target.read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["lee_background.cor"]  # no temps


# ---------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2():
    models = pytest.importorskip("infopt.models", reason="infopt.models not available yet")
    if not hasattr(models, "load_model"):
        pytest.skip("infopt.models.load_model not available yet")
    return models.load_model("smollm2-135m")


@pytest.mark.model
def test_smollm2_perplexity_and_self_compare(smollm2):
    model, tok = smollm2
    res = perplexity(model, tok, max_tokens=2048, window=512)
    # measured 30.9 on the Lee text (2048 tokens, 512-token windows, fp32 from Q4_1 GGUF);
    # 33.3 with 4096 tokens, 17.9 on the pydoc text
    assert res.n_tokens == 2048 - 4 and res.n_windows == 4
    assert 22 < res.ppl < 42
    cmp = compare(model, model, tok, max_tokens=512, window=256, n_prompts=2, max_new_tokens=8)
    assert cmp.kl_mean == 0.0 and cmp.kl_max == 0.0 and cmp.top1_agreement == 1.0
    assert cmp.greedy_exact_match == 1.0
    assert cmp.ppl_ref == pytest.approx(perplexity(model, tok, max_tokens=512, window=256).ppl)
