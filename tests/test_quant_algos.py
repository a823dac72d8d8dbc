"""GPTQ, AWQ, SmoothQuant and the structure helpers; real-model quality (``-m model``)."""

import copy
import os

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import infopt.quant as q
from infopt.quant import formats as F
from infopt.quant.awq import (
    _clip_search,
    awq_clip_ratios,
    awq_search_scale,
    damp_cov,
    smoothquant_scale,
)
from infopt.quant.blockwise import InputStats, collect_stats
from infopt.quant.structure import (
    capture_block_inputs,
    find_blocks,
    find_fold,
    input_groups,
    run_block,
)


def _layer_error(w, w_hat, x):
    """Mean squared output error of using ``w_hat`` for ``w`` on inputs ``x [T, K]``."""
    return float(((x @ (w_hat - w).t()) ** 2).mean())


def _correlated_inputs(t, k, seed=0):
    # Low-rank + noise: strongly correlated channels, the setting where GPTQ's error
    # compensation (through the off-diagonal Hessian) pays off.
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, k, generator=g)
    return torch.randn(t, 16, generator=g) @ basis + 0.1 * torch.randn(t, k, generator=g)


# ------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("gs,act_order", [(128, False), (64, False), (32, True), (128, True)])
def test_gptq_beats_rtn_on_correlated_inputs(gs, act_order):
    k, n = 320, 48  # K not a multiple of 128: ragged last group
    x = _correlated_inputs(2048, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    h = 2 * x.t() @ x / x.shape[0]
    qweight, scale, zero = q.gptq_quantize(w, h, gs, act_order=act_order)
    assert qweight.shape == (n, (k + 1) // 2) and scale.shape == (n, F.num_groups(k, gs))
    gptq_err = _layer_error(w, F.dequantize_int4(qweight, scale, zero, gs, k), x)
    rtn_err = _layer_error(w, F.fake_quantize_int4(w, gs), x)
    # Measured: GPTQ's error is ~10-30x lower here; require at least 3x.
    assert gptq_err < rtn_err / 3, (gptq_err, rtn_err)


def test_gptq_handles_dead_inputs_and_validates():
    x = _correlated_inputs(512, 64)
    x[:, 5] = 0  # a dead input channel: zero Hessian row
    w = torch.randn(8, 64) * 0.05
    h = 2 * x.t() @ x / 512
    qweight, scale, zero = q.gptq_quantize(w, h, 32)
    deq = F.dequantize_int4(qweight, scale, zero, 32, 64)
    assert torch.isfinite(deq).all()
    assert torch.all(deq[:, 5] == 0)
    with pytest.raises(ValueError, match="hessian must be"):
        q.gptq_quantize(w, h[:10, :10], 32)
    with pytest.raises(ValueError, match="block_size"):
        q.gptq_quantize(w, h, 64, block_size=96)
    with pytest.raises(ValueError, match="group_size"):
        q.gptq_quantize(w, h, 100)


# -------------------------------------------------------------------------------- AWQ


def _outlier_inputs(t, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :: k // 8] *= 30.0  # a few salient channels, as in LLM activations
    return x


def _stats(x):
    return InputStats(cov=x.t() @ x / x.shape[0], mean_abs=x.abs().mean(0),
                      abs_max=x.abs().amax(0), tokens=x.shape[0])


def test_awq_scale_beats_rtn_on_outlier_channels():
    k, n, gs = 256, 64, 128
    x = _outlier_inputs(4096, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.05
    s, alpha = awq_search_scale([w], _stats(x), gs, grid=20)
    assert alpha > 0 and s.shape == (k,)
    awq_err = _layer_error(w, F.fake_quantize_int4(w * s, gs) / s, x)
    rtn_err = _layer_error(w, F.fake_quantize_int4(w, gs), x)
    # Measured ~3x lower; require 1.5x.
    assert awq_err < rtn_err / 1.5, (awq_err, rtn_err)


def test_awq_clip_never_worse_than_no_clip():
    k, n, gs = 192, 32, 64
    x = _outlier_inputs(2048, k, seed=3)
    w = torch.randn(n, k) * 0.05
    w[0, 3] = 1.0  # one outlier weight: clipping its group should help
    ratio = awq_clip_ratios(w, x.t() @ x / x.shape[0], gs)
    assert ratio.shape == (n, 3) and float(ratio.min()) >= 0.5 and float(ratio.max()) <= 1.0
    clip_err = _layer_error(w, F.fake_quantize_int4(w, gs, clip_ratio=ratio), x)
    rtn_err = _layer_error(w, F.fake_quantize_int4(w, gs), x)
    assert clip_err <= rtn_err


@pytest.mark.parametrize("gs", [32, 64])
def test_awq_clip_sweep_counts_cross_group_terms(gs):
    """Correlated channels in different groups: the clip search scores each group by the whole
    output error (cross terms included). Its result is never worse than no clipping (a
    guarantee: each step keeps the current choice as a candidate), and on these strongly
    correlated inputs no worse than picking each group's ratio by its diagonal block alone."""
    k, n = 192, 24
    x = _correlated_inputs(4096, k, seed=5)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    cov = x.t() @ x / x.shape[0]
    ratio = awq_clip_ratios(w, cov, gs)
    err = _layer_error(w, F.fake_quantize_int4(w, gs, clip_ratio=ratio), x)
    assert err <= _layer_error(w, F.fake_quantize_int4(w, gs), x)
    # Diagonal-only choice, by brute force per (row, group).
    g = k // gs
    ratios = torch.tensor([1.0 - 0.05 * i for i in range(10)])
    d_all = torch.stack([(F.fake_quantize_int4(w, gs, clip_ratio=float(r)) - w) for r in ratios])
    diag = torch.empty(n, g)
    for gi in range(g):
        sl = slice(gi * gs, (gi + 1) * gs)
        e = torch.einsum("rni,ij,rnj->rn", d_all[:, :, sl], cov[sl, sl], d_all[:, :, sl])
        diag[:, gi] = ratios[e.argmin(0)]
    assert err <= _layer_error(w, F.fake_quantize_int4(w, gs, clip_ratio=diag), x) * (1 + 1e-5)


def test_clip_search_reports_the_error_of_its_ratios():
    """The error the clip search returns (kept up to date incrementally) is the true
    ``tr(D C D^T)`` of the weights it picked, ragged last group included."""
    k, n, gs = 200, 16, 64
    x = _outlier_inputs(1024, k, seed=7)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05
    cov = x.t() @ x / x.shape[0]
    ratio, err = _clip_search(w, cov, gs)
    d = F.fake_quantize_int4(w, gs, clip_ratio=ratio) - w
    assert torch.allclose(err, ((d @ cov) * d).sum(), rtol=1e-4)


def _post_clip_error(w, s, x, gs, cov):
    ratio = awq_clip_ratios(w * s, cov / (s[:, None] * s[None, :]), gs)
    return _layer_error(w, F.fake_quantize_int4(w * s, gs, clip_ratio=ratio) / s, x)


def test_awq_clip_aware_search_never_worse_after_clipping():
    """With ``clip=True`` each alpha is scored after its own clip search, so (rows <= 256:
    no subsampling) the chosen scale's clipped error is the minimum over the grid, hence no
    worse than that of the scale a clip-unaware search picks."""
    k, n, gs = 256, 48, 64
    x = _outlier_inputs(4096, k, seed=4)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6)) * 0.05
    w[:, 5] *= 8  # a weight-outlier column, so clipping and scaling interact
    st = _stats(x)
    s_joint, _ = awq_search_scale([w], st, gs, clip=True)
    s_plain, _ = awq_search_scale([w], st, gs, clip=False)
    joint = _post_clip_error(w, s_joint, x, gs, st.cov)
    plain = _post_clip_error(w, s_plain, x, gs, st.cov)
    assert joint <= plain * (1 + 1e-5), (joint, plain)
    for a in range(20):  # and no worse than any grid point (brute force)
        sa = st.mean_abs.clamp_min(1e-4).pow(a / 20)
        sa = sa / (sa.max() * sa.min()).sqrt()
        assert joint <= _post_clip_error(w, sa, x, gs, st.cov) * (1 + 1e-5), a


def test_damp_cov():
    c = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    assert damp_cov(c, 0.0) is c
    assert torch.equal(damp_cov(c, 0.1), torch.tensor([[2.3, 1.0], [1.0, 4.3]]))
    with pytest.raises(ValueError, match="awq_damp"):
        q.Int4WeightOnlyConfig(method="awq", awq_damp=-0.1)


def test_smoothquant_scale_formula():
    act = torch.tensor([4.0, 1.0, 9.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5]])
    w2 = torch.tensor([[-3.0, 1.0, 0.25]])
    s = smoothquant_scale([w1, w2], act, alpha=0.5)
    w_max = torch.tensor([3.0, 2.0, 0.5])
    assert torch.allclose(s, act.sqrt() / w_max.sqrt())


# -------------------------------------------------------------------------- structure


def _tiny(seed=0, heads=4, kv=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


CALIB = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(7))
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_groups_and_folds_found_by_structure():
    model = _tiny()
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    chunks = capture_block_inputs(model, blocks, CALIB, batch_size=2)
    assert len(chunks) == 2 and chunks[0][0].shape == (2, 16, 64)
    groups = input_groups(blocks[0], TARGETS, *chunks[0])
    assert groups == [TARGETS[:3], [TARGETS[3]], TARGETS[4:6], [TARGETS[6]]]
    folds = [find_fold(blocks[0], g, *chunks[0]) for g in groups]
    # GQA (4 heads, 2 kv heads): v_proj's output is narrower than o_proj's input -> no fold.
    assert folds == ["input_layernorm", None, "post_attention_layernorm", "mlp.up_proj"]


def test_o_proj_folds_into_v_proj_without_gqa():
    model = _tiny(heads=4, kv=4)
    _, blocks = find_blocks(model)
    chunks = capture_block_inputs(model, blocks, CALIB)
    assert find_fold(blocks[0], ["self_attn.o_proj"], *chunks[0]) == "self_attn.v_proj"


def test_collect_stats_matches_direct_computation():
    model = _tiny()
    _, blocks = find_blocks(model)
    chunks = capture_block_inputs(model, blocks, CALIB, batch_size=3)
    (st,) = collect_stats(blocks[0], [TARGETS[:3]], chunks)
    xs = torch.cat([blocks[0].input_layernorm(h).reshape(-1, 64) for h, _ in chunks])
    assert st.tokens == 64
    assert torch.allclose(st.cov, xs.t() @ xs / 64, atol=1e-5)
    assert torch.allclose(st.abs_max, xs.abs().amax(0))
    out = blocks[0](chunks[0][0], **chunks[0][1])
    out = out[0] if isinstance(out, tuple) else out
    assert torch.equal(run_block(blocks[0], *chunks[0]), out)


def test_collect_stats_first_token_weight():
    """first_token_weight counts each sequence's position 0 w times in the covariance only."""
    model = _tiny()
    _, blocks = find_blocks(model)
    chunks = capture_block_inputs(model, blocks, CALIB, batch_size=3)
    (st,) = collect_stats(blocks[0], [TARGETS[:3]], chunks, first_token_weight=5.0)
    hs = [blocks[0].input_layernorm(h) for h, _ in chunks]  # [B, T, 64] each
    xs = torch.cat([h.reshape(-1, 64) for h in hs])
    x0 = torch.cat([h[:, 0] for h in hs])
    assert st.tokens == 64
    want = (xs.t() @ xs + 4.0 * x0.t() @ x0) / 64
    assert torch.allclose(st.cov, want, atol=1e-5)
    assert torch.allclose(st.mean_abs, xs.abs().mean(0), atol=1e-6)


@pytest.mark.parametrize("method,field", [("awq", "awq_sink_weight"), ("gptq", "gptq_sink_weight")])
def test_sink_weight_reaches_the_calibration_statistics(monkeypatch, method, field):
    """Each method's sink weight is what its blocks' statistics count position 0 with, and it
    changes the quantized weights (on a random model the first token is no outlier, so the
    change is small but not zero)."""
    import infopt.quant.awq as awq_mod
    import infopt.quant.handlers as handlers_mod

    seen = []
    real = collect_stats

    def spy(*args, **kwargs):
        seen.append(kwargs.get("first_token_weight", 1.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(awq_mod if method == "awq" else handlers_mod, "collect_stats", spy)
    weights = {}
    for w in (1.0, 7.0):
        seen.clear()
        cfg = q.Int4WeightOnlyConfig(method=method, group_size=32, **{field: w})
        m = q.quantize_model(_tiny(), cfg, calib_input_ids=CALIB, progress=False,
                             calib_cache=False)
        assert seen == [w, w]  # one call per block, both with the configured weight
        weights[w] = m.model.layers[0].mlp.down_proj.qweight.clone()
    assert not torch.equal(weights[1.0], weights[7.0])


@pytest.mark.parametrize("tile", [7, 16, 64])
def test_collect_stats_tiled_gram_matches_full(monkeypatch, tile):
    # Tiles of 7 over the MLP's K = 96 (ragged last tile) and its K = 64 inputs; 64: one tile.
    import infopt.quant.blockwise as cal

    model = _tiny()
    _, blocks = find_blocks(model)
    chunks = capture_block_inputs(model, blocks, CALIB, batch_size=3)
    groups = [TARGETS[:3], TARGETS[6:]]
    full = collect_stats(blocks[0], groups, chunks)
    monkeypatch.setattr(cal, "_GRAM_TILE", tile)
    assert (len(cal._gram_tiles(96)) > 1) == (tile < 48)
    tiled = collect_stats(blocks[0], groups, chunks)
    for a, b in zip(full, tiled):
        assert torch.allclose(a.cov, b.cov, rtol=1e-5, atol=1e-6)
        assert torch.equal(b.cov, b.cov.t())


@pytest.mark.parametrize("alias", ["int4-awq", "w8a8"])
def test_folding_keeps_fp_function(alias):
    # Folding alone (before quantization) must not change the model: check by comparing the
    # quantized model against the same quantization applied without any smoothing/folding.
    model = _tiny()
    ref = model(CALIB).logits
    q.quantize_model(model, alias, calib_input_ids=CALIB, progress=False)
    norm_w = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm_w, torch.ones_like(norm_w))  # the scale was folded here
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.in_scale is not None  # GQA: explicit multiplier
    cos = nn.functional.cosine_similarity(ref.flatten(), model(CALIB).logits.flatten(), dim=0)
    assert float(cos) > 0.98


def test_calibration_longer_than_context_is_refused():
    # The default windows (32 x 512) exceed this tiny model's 64 positions: a clear error
    # naming calib_seq_len, before any block is touched.
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    long_ids = torch.randint(0, 101, (2, 65), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="calib_seq_len <= 64"):
        q.quantize_model(model, "int4-awq", calib_input_ids=long_ids, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert q.QuantConfig.calib_seq_len > 64  # so the library default would hit this too


def test_calibration_ids_deterministic_and_disjoint_text():
    class CharTok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 101 for c in text[:200000]]}

    tok = CharTok()
    a = q.calibration_ids(tok, 4, 64, seed=0)
    b = q.calibration_ids(tok, 4, 64, seed=0)
    c = q.calibration_ids(tok, 4, 64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="fewer than calib_seq_len"):
        q.calibration_ids(tok, 1, 10**6)
    # Calibration must not overlap the evaluation text (the start of the Lee corpus).
    from infopt.eval import lee_articles
    from infopt.quant.calib_data import calibration_text

    calib_text = calibration_text("lee")
    assert all(a not in calib_text for a in lee_articles()[:30])
    assert len(calibration_text("pydoc")) > 100_000


# --------------------------------------------------------------- real model (slowish)


def _load_default_model():
    """SmolLM2-135M-Instruct fp32 via infopt.models; ``INFOPT_QUANT_MODEL_DIR`` (a local HF
    directory) overrides, for machines where the models package is not available."""
    path = os.environ.get("INFOPT_QUANT_MODEL_DIR")
    if path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    try:
        from infopt.models import load_model
    except ImportError as e:
        pytest.skip(f"infopt.models.load_model unavailable ({e}); set INFOPT_QUANT_MODEL_DIR")
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="module")
def default_model():
    return _load_default_model()


def _ppl(model, tok):
    from infopt.eval import perplexity

    # First 1024 tokens of the Lee news corpus; calibration (the mix) never overlaps it.
    return perplexity(model, tok, max_tokens=1024, window=512).ppl


@pytest.mark.model
def test_real_model_int8_ppl_within_half_percent(default_model):
    model, tok = default_model
    base = _ppl(model, tok)
    qm = q.quantize_model(copy.deepcopy(model), "int8")
    assert _ppl(qm, tok) / base - 1 <= 0.005


@pytest.mark.model
def test_real_model_awq_and_gptq_beat_rtn_at_g128(default_model):
    from infopt.eval import compare

    model, tok = default_model
    calib = q.calibration_ids(tok, 16, 256, seed=0)  # the default mix: chat, code, prose
    res = {}
    for method, act_order in (("rtn", False), ("awq", False), ("gptq", True)):
        cfg = q.Int4WeightOnlyConfig(group_size=128, method=method, act_order=act_order)
        qm = q.quantize_model(copy.deepcopy(model), cfg, calib_input_ids=calib, progress=False)
        res[method] = compare(model, qm, tok, max_tokens=1024, window=512, prompts=[])
    inc = {m: r.ppl_rel_increase for m, r in res.items()}
    kl = {m: r.kl_mean for m, r in res.items()}
    assert inc["rtn"] > 0.02, inc  # the comparison means something only if RTN hurts
    for m in ("awq", "gptq"):
        assert inc[m] < inc["rtn"], inc
        assert kl[m] < kl["rtn"], kl
