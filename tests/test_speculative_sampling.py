"""Speculative sampling is exact: emitted tokens follow the target's processed distribution.

Statistical tests use a fixed seed and a chi-square goodness-of-fit test at significance 1e-3
(cells with expected count < 5 are pooled). Each test also checks the test has power: the
draft's own distribution, or a biased sampler, is rejected by the same statistic.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from infopt import speculative as sp
from infopt.speculative.sampling import Sampling, emitted_tokens, rejection_accept

ALPHA = 1e-3


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def chi2_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of integer ``samples`` to ``probs [C]`` (pooled cells, exact sf)."""
    probs = probs.double()
    counts = torch.bincount(samples.reshape(-1), minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "sampled a token of probability 0"
    if int((probs > 0).sum()) == 1:
        return 1.0  # a point mass: the line above already checked every sample
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_c = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp_c = torch.cat([exp[big], exp[~big].sum().reshape(1)])
    keep = exp_c > 0
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    assert obs_c.numel() >= 2, "too few samples for a chi-square test"
    stat = ((obs_c - exp_c) ** 2 / exp_c).sum()
    df = torch.tensor((obs_c.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def _dists(gen, rows, v, sharp=2.0):
    return torch.softmax(torch.randn(rows, v, generator=gen, dtype=torch.float64) * sharp, -1)


# --- the acceptance rule on synthetic p, q ---------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_accept_marginals_match_p(deterministic):
    gen = torch.Generator().manual_seed(0)
    v, k, n = 6, 3, 200_000
    p1 = _dists(gen, k + 1, v).float()  # [k+1, V], context-free target
    q1 = _dists(gen, k, v).float()
    p = p1.expand(n, -1, -1)
    if deterministic:  # a fixed proposal per position (q one-hot): p's mode, then its 2nd
        draft = torch.stack([p1[0].argmax(), p1[1].argsort()[-2], p1[2].argmax()]).expand(n, -1)
        q = None
    else:
        q = q1.expand(n, -1, -1)
        draft = torch.multinomial(q1, n, replacement=True, generator=gen).T  # [n, k]
    acc, tok = rejection_accept(draft, q, p, gen)
    out = emitted_tokens(draft, acc, tok)
    # Position j's token, over the rows that reached it, must follow p[j] (p ignores context).
    for j in range(k + 1):
        reached = acc >= j
        assert reached.sum() > 2000  # enough rows reach position j for the test to mean much
        assert chi2_pvalue(out[reached, j], p1[j]) > ALPHA, j
    # Acceptance probability of the first draft token is sum_x min(p, q).
    q0 = torch.nn.functional.one_hot(draft[0, 0], v).float() if deterministic else q1[0]
    rate = (acc >= 1).double().mean().item()
    assert abs(rate - torch.minimum(p1[0], q0).sum().item()) < 4e-3
    # Power: the raw draft tokens do not pass as samples of p.
    if not deterministic:
        assert chi2_pvalue(draft[:, 0], p1[0]) < 1e-6


def test_rejection_accept_with_processed_distributions():
    gen = torch.Generator().manual_seed(1)
    v, k, n = 12, 2, 200_000
    tgt = Sampling(do_sample=True, temperature=0.7, top_k=6, top_p=0.8)
    drf = Sampling(do_sample=True, temperature=1.3, top_k=9)
    p1 = tgt.probs(torch.randn(k + 1, v, generator=gen), None)
    q1 = drf.probs(torch.randn(k, v, generator=gen), None)
    assert ((p1 > 0).sum(-1) > 2).all()
    assert (p1 == 0).any() and ((q1 > 0) & (p1[:k] == 0)).any()  # draft may leave p's support
    draft = torch.multinomial(q1, n, replacement=True, generator=gen).T
    acc, tok = rejection_accept(draft, q1.expand(n, -1, -1), p1.expand(n, -1, -1), gen)
    out = emitted_tokens(draft, acc, tok)
    for j in range(k + 1):
        assert chi2_pvalue(out[acc >= j, j], p1[j]) > ALPHA, j


def test_no_proposal_samples_from_p():
    gen = torch.Generator().manual_seed(2)
    p1 = _dists(gen, 2, 5).float()
    draft = torch.full((50_000, 1), -1)
    acc, tok = rejection_accept(draft, None, p1.expand(50_000, -1, -1), gen)
    assert (acc == 0).all()
    assert chi2_pvalue(tok, p1[0]) > ALPHA


# --- logits processing -----------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 0.9), (1.3, None, 0.5),
                                                     (1.0, 3, None), (0.5, 0, 1.0)])
def test_processing_matches_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 50) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None and top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = Sampling(True, temperature, top_k, top_p).process(logits, None)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[~torch.isinf(got)], ref[~torch.isinf(ref)])


def test_min_new_tokens_suppresses_eos_per_position():
    s = Sampling(eos_token_ids=(2, 3), min_new_tokens=2)
    x = s.process(torch.zeros(1, 3, 5), torch.tensor([[0, 1, 2]]))
    assert torch.isinf(x[0, :2, 2:4]).all() and not torch.isinf(x[0, 2]).any()


# --- end to end: speculative sampling from a model -------------------------------------------


def _tiny(seed, vocab=8, layers=3, sharpen=6.0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)  # random models are near-uniform; make them peaky
    return model


def _exact_joint(model, prompt, n_tokens, sampling):
    """Exact target distribution over all ``V ** n_tokens`` continuations, flattened."""
    v = model.config.vocab_size
    probs = torch.ones(1, dtype=torch.float64)
    seqs = prompt.clone()  # [M, P]
    with torch.inference_mode():
        for j in range(n_tokens):
            logits = model(seqs).logits[:, -1]
            pj = sampling.probs(logits, torch.full((seqs.shape[0],), j)).double()
            probs = (probs.unsqueeze(1) * pj).reshape(-1)
            seqs = torch.cat([seqs.repeat_interleave(v, 0),
                              torch.arange(v).repeat(seqs.shape[0]).unsqueeze(1)], 1)
    return probs


@pytest.mark.parametrize("source", ["other", "other-confidence", "self", "prompt_lookup",
                                    "layer_skip"])  # fmt: skip
def test_speculative_sampling_matches_target_joint(source):
    target = _tiny(0)
    draft = {"other": _tiny(1, layers=1, sharpen=3.0), "self": target,
             # drafts cut where the draft is unsure: lengths vary per row and step
             "other-confidence": sp.ModelDraft(_tiny(1, layers=1, sharpen=3.0), 0.3),
             "prompt_lookup": sp.PromptLookupConfig(max_ngram=1),
             "layer_skip": sp.LayerSkipConfig(skip=(1,))}[source]
    sampling = Sampling(True, 0.9, 6, 0.97, eos_token_ids=(7,), min_new_tokens=2)
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    n_tok, rows = 3, 20_000
    exact = _exact_joint(target, prompt, n_tok, sampling)
    gen = torch.Generator().manual_seed(4)
    out = sp.generate(target, prompt.expand(rows, -1), draft, n_tok, do_sample=True,
                      temperature=0.9, top_k=6, top_p=0.97, eos_token_id=7, min_new_tokens=2,
                      num_draft_tokens=2, generator=gen)
    new = out.sequences[:, prompt.shape[1]:]
    assert new.shape[1] == n_tok
    # Rows that hit EOS at the last token are complete; no row can stop earlier (min_new=2).
    assert (new[:, :2] != 7).all()
    v = target.config.vocab_size
    codes = (new[:, 0] * v + new[:, 1]) * v + new[:, 2]
    assert chi2_pvalue(codes, exact) > ALPHA
    if source != "prompt_lookup":
        assert out.stats.accepted > 0
    # Power: the same statistic rejects a sample from a slightly-off distribution (10% of the
    # mass spread uniformly over the same support).
    support = (exact > 0).double()
    off = 0.9 * exact + 0.1 * support / support.sum()
    fake = torch.multinomial(off.float(), rows, replacement=True, generator=gen)
    assert chi2_pvalue(fake, exact) < ALPHA


def test_sampling_is_reproducible_with_generator():
    target, draft = _tiny(0), _tiny(1, layers=1)
    prompt = torch.tensor([[1, 2, 3]]).expand(4, -1)
    outs = [sp.generate(target, prompt, draft, 10, do_sample=True, eos_token_id=[],
                        generator=torch.Generator().manual_seed(9)).sequences for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
