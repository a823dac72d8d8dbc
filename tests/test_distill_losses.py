"""Distillation losses against direct formulas on random logits: KL(p || p) = 0, JSD symmetric
at beta = 0.5 and equal to forward / reverse KL at its ends, masks, temperature, top-k with
k = V equal to the full loss, the explicit tail for k < V, chunked equal to unchunked, hidden
state matching and the vocabulary checks."""

import math

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from infopt import distill as D

V = 37


def logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, V, generator=g, dtype=torch.float64).float() * scale


def direct(kind, s, t, beta=0.5, temp=1.0):
    """Per-position divergence in float64 from the textbook formulas."""
    p = torch.softmax(t.double() / temp, -1)
    q = torch.softmax(s.double() / temp, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("kind", D.DIVERGENCES)
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_matches_direct_formula(kind, temp):
    s, t = logits(3, 5, seed=1), logits(3, 5, seed=2)
    got = D.divergence(kind, s, t, beta=0.3, temperature=temp, reduction="none")
    want = direct(kind, s, t, beta=0.3, temp=temp)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    mean = D.divergence(kind, s, t, beta=0.3, temperature=temp)
    torch.testing.assert_close(mean.double(), want.mean(), rtol=1e-5, atol=1e-6)
    assert bool((got >= -1e-6).all())


@pytest.mark.parametrize("fn", [D.forward_kl, D.reverse_kl, D.jsd, D.tvd])
def test_named_functions_are_the_divergences(fn):
    s, t = logits(4, seed=3), logits(4, seed=4)
    kind = {"jsd": "jsd"}.get(fn.__name__, fn.__name__)
    torch.testing.assert_close(fn(s, t, temperature=1.7), D.divergence(kind, s, t, temperature=1.7))


@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_zero_against_itself(kind):
    x = logits(6, seed=5)
    assert D.divergence(kind, x, x.clone()).abs().item() < 1e-6


def test_jsd_symmetric_at_half_and_ends_are_kls():
    s, t = logits(8, seed=6), logits(8, seed=7)
    torch.testing.assert_close(D.jsd(s, t, beta=0.5), D.jsd(t, s, beta=0.5))
    assert D.jsd(s, t, beta=0.5) <= math.log(2) + 1e-6
    torch.testing.assert_close(D.jsd(s, t, beta=0.0), D.forward_kl(s, t))
    torch.testing.assert_close(D.jsd(s, t, beta=1.0), D.reverse_kl(s, t))
    # asymmetric beta: swapping the roles swaps beta
    torch.testing.assert_close(D.jsd(s, t, beta=0.2), D.jsd(t, s, beta=0.8))


@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_gradients_finite_and_mask_respected(kind):
    s = logits(2, 6, seed=8).requires_grad_()
    t = logits(2, 6, seed=9)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    t_bad = t.clone()
    t_bad[~mask] = float("nan")  # masked positions may hold garbage
    loss = D.divergence(kind, s, t_bad, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert s.grad[~mask].abs().max() == 0
    want = direct(kind, s.detach(), t)[mask].mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    empty = D.divergence(kind, s, t, mask=torch.zeros(2, 6, dtype=torch.bool))
    assert empty.item() == 0.0


@pytest.mark.parametrize("kind", D.DIVERGENCES)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_topk_with_k_equal_vocab_is_the_full_loss(kind, temp):
    s, t = logits(3, 4, seed=10), logits(3, 4, seed=11)
    tg = D.topk_targets(t, V, temperature=temp)
    assert torch.isneginf(tg.tail).all()
    got = D.sparse_divergence(kind, s, tg, beta=0.4, temperature=temp)
    torch.testing.assert_close(got, D.divergence(kind, s, t, beta=0.4, temperature=temp),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_topk_tail_is_an_explicit_category(kind):
    s, t = logits(5, seed=12), logits(5, seed=13)
    k = 6
    tg = D.topk_targets(t, k)
    p = torch.softmax(t.double(), -1)
    q = torch.softmax(s.double(), -1)
    torch.testing.assert_close(tg.tail.double().exp(), 1 - p.gather(-1, tg.indices).sum(-1))
    # coarsen both distributions to the k teacher tokens + "everything else" by hand
    pc = torch.cat([p.gather(-1, tg.indices), (1 - p.gather(-1, tg.indices).sum(-1))[:, None]], -1)
    qc = torch.cat([q.gather(-1, tg.indices), (1 - q.gather(-1, tg.indices).sum(-1))[:, None]], -1)
    want = D.divergence_from_logprobs(kind, pc.log(), qc.log(), 0.5)
    got = D.sparse_divergence(kind, s, tg, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # a lower bound of the full divergence (data processing inequality)
    assert bool((got <= D.divergence(kind, s, t, reduction="none") + 1e-5).all())
    ss = s.clone().requires_grad_()
    D.sparse_divergence(kind, ss, tg).backward()
    assert torch.isfinite(ss.grad).all()


class Head(nn.Module):
    def __init__(self, h, v, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(h, v, bias=False)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("teacher_kind", ["logits", "hidden", "topk"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_chunked_equals_unchunked(teacher_kind, kind):
    b, n, h = 2, 11, 8
    head, thead = Head(h, V, 0), Head(h, V, 1)
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(b, n, h, generator=g)
    th = torch.randn(b, n, h, generator=g)
    labels = torch.randint(0, V, (b, n), generator=g)
    mask = torch.rand(b, n, generator=g) > 0.2
    with torch.no_grad():
        tl = thead(th)
    teacher = {"logits": tl, "hidden": (th, thead), "topk": D.topk_targets(tl, 5)}[teacher_kind]
    results = []
    for chunk in (None, 3):
        head.zero_grad()
        x = hs.clone().requires_grad_()
        parts = D.chunked_distill_loss(x, head, teacher, labels, kind=kind, alpha=0.3,
                                       temperature=2.0, mask=mask, chunk_size=chunk)
        parts.loss.backward()
        results.append((parts, x.grad.clone(), head.lin.weight.grad.clone()))
    (a, ga, wa), (c, gc, wc) = results
    torch.testing.assert_close(a.loss, c.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wa, wc, rtol=1e-4, atol=1e-6)
    assert a.n_tokens == int(mask.sum())
    # the combination: alpha * CE + (1 - alpha) * T^2 * div
    torch.testing.assert_close(a.loss.item(), 0.3 * a.ce + 0.7 * 4.0 * a.div, rtol=1e-5, atol=1e-6)
    logits_s = head(hs)
    ce = nn.functional.cross_entropy(logits_s[mask], labels[mask])
    assert a.ce == pytest.approx(ce.item(), rel=1e-5)


def test_bad_arguments_are_named():
    s, t = logits(4, seed=1), logits(4, seed=2)
    with pytest.raises(ValueError, match="loss must be one of"):
        D.divergence("kl", s, t)
    with pytest.raises(ValueError, match="temperature"):
        D.forward_kl(s, t, temperature=0)
    with pytest.raises(ValueError, match="beta must be"):
        D.jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="vocabulary size 37 != teacher vocabulary size 40"):
        D.forward_kl(s, torch.randn(4, 40))
    with pytest.raises(ValueError, match="k must be"):
        D.topk_targets(t, 0)
    with pytest.raises(ValueError, match="mask must be"):
        D.forward_kl(s, t, mask=torch.ones(3, dtype=torch.bool))


def tiny(vocab, seed=0, hidden=16):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    ))


def test_vocab_mismatch_refused_unless_mapped():
    s, t = tiny(50), tiny(64, 1)
    with pytest.raises(ValueError, match="student vocabulary size 50 != teacher vocabulary "
                                         "size 64.*token_map"):
        D.check_vocab(s, t)
    m = D.check_vocab(s, t, token_map=torch.arange(50))
    assert torch.equal(m, torch.arange(50))
    with pytest.raises(ValueError, match=r"teacher ids in \[0, 64\)"):
        D.check_vocab(s, t, token_map=torch.arange(50) + 20)
    with pytest.raises(ValueError, match="50"):
        D.check_vocab(s, t, token_map=torch.arange(49))
    tl = torch.randn(2, 64)
    mapped = D.map_teacher_logits(tl, m)
    assert torch.equal(mapped, tl[:, :50])
    assert D.check_vocab(s, tiny(50, 2)) is None


def test_tokenizer_mismatch_refused():
    class Tok:
        def __init__(self, v):
            self.v = v

        def get_vocab(self):
            return self.v

    s, t = tiny(50), tiny(50, 1)
    a = {f"t{i}": i for i in range(50)}
    b = dict(a, t3=4, t4=3)
    with pytest.raises(ValueError, match="tokenizers differ"):
        D.check_vocab(s, t, student_tokenizer=Tok(a), teacher_tokenizer=Tok(b))
    assert D.check_vocab(s, t, student_tokenizer=Tok(a), teacher_tokenizer=Tok(dict(a))) is None


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss(kind):
    g = torch.Generator().manual_seed(0)
    st = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(3))
    tt = tuple(torch.randn(2, 5, 12, generator=g) for _ in range(5))
    loss = D.HiddenStateLoss({1: 2, 2: 4}, 8, 12, kind=kind)
    assert loss.proj is not None and len(loss.proj) == 2
    val = loss(st, tt)
    val.backward()
    assert torch.isfinite(val) and loss.proj[0].weight.grad is not None
    # same width: no projection; matching a tensor to itself costs 0
    same = D.HiddenStateLoss([(1, 1)], 8, 8, kind=kind)
    assert same.proj is None
    assert same(st, st).abs().item() < 1e-6
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 0] = True
    per = (st[1][0, 0] - st[2][0, 0]).pow(2).mean() if kind == "mse" else \
        1 - nn.functional.cosine_similarity(st[1][0, 0], st[2][0, 0], dim=0)
    torch.testing.assert_close(D.HiddenStateLoss([(1, 2)], 8, 8, kind=kind)(st, st, mask), per)
    with pytest.raises(ValueError, match="out of range"):
        same([st[0]], tt)
    with pytest.raises(ValueError, match="kind must be one of"):
        D.HiddenStateLoss({1: 1}, 8, 8, kind="l1")
