"""Quantized modules, configs, wrap_model integration and save/load (tiny random models)."""

import copy
import json
import logging

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import infopt
import infopt.quant as q
from infopt.config import InfoptConfig
from infopt.quant import formats as F


def tiny_llama(seed: int = 0, hidden: int = 64, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


CALIB = torch.randint(0, 101, (8, 32), generator=torch.Generator().manual_seed(5))
IDS = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(6))

# alias -> minimum logits cosine vs the fp32 model (measured: int8/w8a8 > 0.9999,
# int4 ~0.995, fp8 ~0.999 on this tiny random model).
ALIAS_COSINE = {
    "int8": 0.999, "int4": 0.98, "int4-head-fp32": 0.98, "int4-a8": 0.98, "int4-awq": 0.98,
    "int4-gptq": 0.98,
    "w8a8": 0.999, "fp8": 0.995,
}


def _cos(a, b):
    return float(nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


# ------------------------------------------------------------------------------ modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["int8", "int4", "int4-a8", "w8a8", "fp8"])
def test_module_matches_linear_and_keeps_dtype(kind, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True).to(dtype)
    x = torch.randn(2, 5, 96).to(dtype)
    ref = lin(x).float()
    mod = {
        "int8": lambda: q.Int8Linear.from_linear(lin),
        "int4": lambda: q.Int4Linear.from_linear(lin, 32),
        "int4-a8": lambda: q.Int4Linear.from_linear(lin, 32),
        "w8a8": lambda: q.W8A8Linear.from_linear(lin),
        "fp8": lambda: q.FP8Linear.from_linear(lin),
    }[kind]()
    if kind == "int4-a8":
        mod.act_dtype = "int8"
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, 5, 40)
    assert torch.equal(mod.bias, lin.bias.detach())
    assert F.sqnr_db(ref, y.float()) > (15 if kind.startswith("int4") else 22)
    assert f"format={kind.split('-')[0]}" in repr(mod)


def test_int4_act_dtype_selects_the_op():
    torch.manual_seed(0)
    lin = nn.Linear(200, 24)
    mod = q.Int4Linear.from_linear(lin, 64)
    x = torch.randn(3, 200)
    args = (mod.qweight, mod.scale, mod.zero, 64, mod.bias)
    assert mod.act_dtype is None and "int8 activations" not in repr(mod)
    exact = infopt.ops.int4_weight_only_linear(x, *args)
    assert F.sqnr_db(exact, mod(x)) > 100
    mod.act_dtype = "int8"
    assert "int8 activations per 32-block" in repr(mod) and mod.spec()["act_dtype"] == "int8"
    dyn = infopt.ops.int4_dynamic_linear(x, *args)
    assert F.sqnr_db(dyn, mod(x)) > 100 and not torch.equal(dyn, exact)
    with pytest.raises(ValueError, match=r"act_dtype must be one of \(None, 'int8'\)"):
        mod.act_dtype = "fp8"
    with pytest.raises(ValueError, match="act_dtype must be one of"):
        q.Int4Linear(200, 24, act_dtype="int4")
    # the checked-once fast path still rejects a bad activation with the op's message
    with pytest.raises(ValueError, match=r"qweight must have shape \[N, ceil\(K/2\)\]"):
        mod(torch.randn(3, 100))
    with pytest.raises(ValueError, match="x must have a floating dtype"):
        mod(torch.ones(3, 200, dtype=torch.int64))


def test_int4_module_ragged_and_odd_k():
    torch.manual_seed(0)
    lin = nn.Linear(129, 8, bias=False)
    mod = q.Int4Linear.from_linear(lin, 128)
    assert mod.qweight.shape == (8, 65) and mod.scale.shape == (8, 2)
    x = torch.randn(3, 129)
    deq = F.dequantize_int4(mod.qweight, mod.scale, mod.zero, 128, 129)
    assert torch.allclose(mod(x), x @ deq.t(), atol=1e-5)


def test_explicit_in_scale_is_applied():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=False)
    s = torch.rand(32) + 0.5
    scaled_w = lin.weight.detach() * s  # W diag(s), so (x / s) W'^T == x W^T
    mod = q.Int8Linear.from_linear(lin, weight=scaled_w, in_scale=1.0 / s)
    x = torch.randn(4, 32)
    assert "in_scale=per-channel" in repr(mod)
    assert F.sqnr_db(lin(x), mod(x)) > 35


def test_fp8_module_says_it_is_emulated(caplog):
    lin = nn.Linear(32, 16)
    mod = q.FP8Linear.from_linear(lin)
    q.FP8Linear._warned = False
    with caplog.at_level(logging.WARNING, logger="infopt"):
        mod(torch.randn(2, 32))
        mod(torch.randn(2, 32))
    msgs = [r.getMessage() for r in caplog.records if r.name == "infopt.quant.qlinear"]
    assert len(msgs) == 1, msgs  # once per process, not per call
    assert "EMULATED" in msgs[0] and "no native fp8 GEMM on cpu" in msgs[0]
    assert mod.emulated is True
    assert "emulated=True" in repr(mod)


def test_fp8_module_survives_dtype_cast():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    mod = q.FP8Linear.from_linear(lin)
    bits = mod.weight_fp8.clone()
    mod = mod.to(torch.bfloat16)
    assert torch.equal(mod.weight_fp8, bits)  # a float8 buffer would have been cast to bf16
    x = torch.randn(3, 32)
    assert F.sqnr_db(lin(x), mod(x.bfloat16()).float()) > 20


# ------------------------------------------------------------------------------ configs


def test_configs_round_trip_and_validate():
    cfgs = [
        q.Int8WeightOnlyConfig(skip=("lm_head", "*.down_proj")),
        q.Int4WeightOnlyConfig(group_size=64, method="gptq", act_order=True),
        q.Int4WeightOnlyConfig(method="awq", awq_clip=False, awq_damp=0.0),
        q.Int4WeightOnlyConfig(act_dtype="int8", lm_head="int8"),
        q.W8A8Config(alpha=0.8),
        q.FP8Config(include=("*.mlp.*",)),
    ]
    for c in cfgs:
        d = json.loads(json.dumps(c.to_dict()))
        assert InfoptConfig.from_dict(d) == c
    # A version-1 int4 dict (as saved before max_tokens was dropped) still loads; a current
    # dict naming max_tokens is rejected like any unknown field.
    v1 = q.Int4WeightOnlyConfig(method="awq").to_dict()
    v1 = {**v1, "version": 1, "fields": {**v1["fields"], "max_tokens": 4096}}
    # (It quantized with the plain GPTQ Hessian and AWQ covariance, so both sink weights
    # upgrade to 1.)
    plain = {"gptq_sink_weight": 1.0, "awq_sink_weight": 1.0}
    v1 = {**v1, "fields": {k: v for k, v in v1["fields"].items() if k not in plain}}
    assert InfoptConfig.from_dict(v1) == q.Int4WeightOnlyConfig(method="awq", **plain)
    v2 = q.Int4WeightOnlyConfig(method="gptq").to_dict()
    v2 = {**v2, "version": 2, "fields": {k: v for k, v in v2["fields"].items()
                                         if k not in plain}}
    assert InfoptConfig.from_dict(v2) == q.Int4WeightOnlyConfig(method="gptq", **plain)
    for field in plain:
        with pytest.raises(ValueError, match=field):
            q.Int4WeightOnlyConfig(**{field: 0.5})
    with pytest.raises(ValueError, match=r"unknown fields \['max_tokens'\]"):
        InfoptConfig.from_dict({**v1, "version": 2})
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\)"):
        q.Int4WeightOnlyConfig(group_size=256)
    with pytest.raises(ValueError, match="method must be one of"):
        q.Int4WeightOnlyConfig(method="hqq")
    with pytest.raises(ValueError, match=r"act_dtype must be one of \(None, 'int8'\)"):
        q.Int4WeightOnlyConfig(act_dtype="fp8")
    with pytest.raises(ValueError, match="act_order"):
        q.Int4WeightOnlyConfig(method="rtn", act_order=True)
    with pytest.raises(ValueError, match="alpha"):
        q.W8A8Config(alpha=1.5)
    with pytest.raises(ValueError, match="calib_samples"):
        q.Int8WeightOnlyConfig(calib_samples=0)
    with pytest.raises(ValueError, match="calib_text"):
        q.Int8WeightOnlyConfig(calib_text="wiki")
    with pytest.raises(ValueError, match="block_size"):
        q.Int4WeightOnlyConfig(group_size=128, block_size=96)
    with pytest.raises(TypeError, match="base class"):
        q.QuantConfig()
    with pytest.raises(TypeError, match="skip"):
        q.Int8WeightOnlyConfig(skip=(1, 2))
    assert q.Int8WeightOnlyConfig(skip="lm_head").skip == ("lm_head",)


def test_aliases_registered():
    assert infopt.accepted_options()["quant"] == sorted(q.ALIASES)
    assert set(q.ALIASES) == {
        "int8", "int4", "int4-head-fp32", "int4-awq", "int4-gptq", "int4-a8", "w8a8", "fp8"
    }
    # int4 is the configuration to pick: the output head int8; int4-head-fp32 keeps it fp32.
    assert q.ALIASES["int4"]() == q.Int4WeightOnlyConfig(lm_head="int8")
    assert q.ALIASES["int4-head-fp32"]() == q.Int4WeightOnlyConfig()


# --------------------------------------------------------------------------- wrap_model


@pytest.mark.parametrize("alias", ["int8", "int4-head-fp32", "int4-a8", "w8a8", "fp8"])
def test_wrap_model_calibration_free(alias, caplog):
    model = tiny_llama()
    ref = model(IDS).logits
    with caplog.at_level(logging.WARNING, logger="infopt.quant.qlinear"):
        q.FP8Linear._warned = False
        if alias == "w8a8":
            q.quantize_model(model, alias, calib_input_ids=CALIB, progress=False)
        else:
            assert infopt.wrap_model(model, quant=alias) is model
        out = model(IDS).logits
    emulated = [r for r in caplog.records if "EMULATED" in r.getMessage()]
    assert len(emulated) == (1 if alias == "fp8" else 0)
    assert _cos(ref, out) > ALIAS_COSINE[alias]
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, q.QuantizedLinear)
    assert type(model.model.embed_tokens) is nn.Embedding
    n_quant = sum(isinstance(m, q.QuantizedLinear) for m in model.modules())
    assert n_quant == 2 * 7
    gen = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 16)


@pytest.mark.parametrize("alias", ["int4-awq", "int4-gptq"])
def test_calibrated_methods_on_tiny_model(alias):
    model = tiny_llama()
    ref = model(IDS).logits
    q.quantize_model(model, alias, calib_input_ids=CALIB, progress=False)
    assert _cos(ref, model(IDS).logits) > ALIAS_COSINE[alias]
    assert q.quant_config_of(model).method == alias.split("-")[1]


def test_wrap_model_calibrated_without_tokenizer_is_clear_error():
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs calibration data"):
        infopt.wrap_model(model, quant="int4-gptq")
    assert not q.is_quantized(model)


def test_quantize_twice_is_value_error():
    model = tiny_llama()
    infopt.wrap_model(model, quant="int8")
    with pytest.raises(ValueError, match="already quantized"):
        infopt.wrap_model(model, quant="int4")
    with pytest.raises(ValueError, match="already quantized"):
        q.quantize_model(model, "int8")


def test_include_skip_and_explicit_non_linear():
    model = tiny_llama()
    cfg = q.Int8WeightOnlyConfig(include=("*.mlp.*",), skip=("*.down_proj",))
    q.quantize_model(model, cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, q.QuantizedLinear)]
    assert sorted(names) == sorted(
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")
    )
    with pytest.raises(TypeError, match="selects a LlamaRMSNorm"):
        q.quantize_model(tiny_llama(), q.Int8WeightOnlyConfig(include=("model.norm",)))
    with pytest.raises(TypeError, match="selects a Embedding"):
        q.quantize_model(tiny_llama(), q.Int8WeightOnlyConfig(include=("model.embed_tokens",)))
    with pytest.raises(ValueError, match="names no module"):
        q.quantize_model(tiny_llama(), q.Int8WeightOnlyConfig(include=("model.nope",)))
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        q.quantize_model(tiny_llama(), q.Int8WeightOnlyConfig(include=("*.nothing*",)))


def test_lm_head_can_be_included():
    model = tiny_llama()
    ref = model(IDS).logits
    q.quantize_model(model, q.Int4WeightOnlyConfig(skip=(), method="gptq"), calib_input_ids=CALIB,
                     progress=False)
    assert isinstance(model.lm_head, q.Int4Linear)  # outside the blocks: RTN
    assert _cos(ref, model(IDS).logits) > 0.98


@pytest.mark.parametrize("tie", [False, True])
def test_lm_head_int8_option(tmp_path, tie):
    model = tiny_llama(tie=tie)
    ref = model(IDS).logits
    cfg = q.Int4WeightOnlyConfig(group_size=32, lm_head="int8")
    q.quantize_model(model, cfg, progress=False)
    assert isinstance(model.lm_head, q.Int8Linear) and not isinstance(model.lm_head, q.W8A8Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, q.Int4Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # embeddings stay as they were
    with torch.no_grad():
        out = model(IDS).logits
    assert _cos(ref, out) > 0.98
    # mixed formats survive save/load exactly
    q.save_quantized(model, tmp_path)
    loaded = q.load_quantized(tmp_path, tiny_llama(seed=7, tie=tie))
    assert isinstance(loaded.lm_head, q.Int8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, out)
    assert q.quant_config_of(loaded).lm_head == "int8"


def test_lm_head_int8_option_errors():
    with pytest.raises(ValueError, match="lm_head must be one of"):
        q.Int4WeightOnlyConfig(lm_head="int4")
    with pytest.raises(ValueError, match="also selected by include/skip"):
        q.quantize_model(tiny_llama(), q.Int4WeightOnlyConfig(skip=(), lm_head="int8"))


def test_applied_configs_recorded():
    model = tiny_llama()
    infopt.wrap_model(model, quant=q.Int4WeightOnlyConfig(group_size=32))
    applied = infopt.applied_configs(model)
    assert applied[0]["option"] == "quant"
    assert applied[0]["config"]["fields"]["group_size"] == 32


# ---------------------------------------------------------------------------- save/load


@pytest.mark.parametrize("alias", ["int8", "int4-awq", "int4-a8", "w8a8", "fp8"])
def test_save_load_identical_outputs(tmp_path, alias):
    model = tiny_llama(tie=True)
    q.quantize_model(model, alias, calib_input_ids=CALIB, progress=False)
    with torch.no_grad():
        out = model(IDS).logits
    path = q.save_quantized(model, tmp_path)
    assert path.exists() and (tmp_path / "config.json").exists()

    fresh = tiny_llama(seed=123, tie=True)  # different random weights: all must be overwritten
    loaded = q.load_quantized(tmp_path, fresh)
    assert loaded is fresh
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, out)
    int4 = [m for m in loaded.modules() if isinstance(m, q.Int4Linear)]
    assert all(m.act_dtype == ("int8" if alias == "int4-a8" else None) for m in int4)
    assert q.quant_config_of(loaded) == q.quant_config_of(model)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tying survived

    rebuilt = q.load_quantized(tmp_path)  # architecture from config.json
    with torch.no_grad():
        assert torch.equal(rebuilt(IDS).logits, out)


def test_save_load_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a model quantized"):
        q.save_quantized(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError):
        q.load_quantized(tmp_path / "missing")
    model = tiny_llama()
    q.quantize_model(model, "int8")
    q.save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match="unquantized base"):
        q.load_quantized(tmp_path, model)
    with pytest.raises(ValueError, match="no nn.Linear there"):
        q.load_quantized(tmp_path, nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="base must be"):
        q.load_quantized(tmp_path, "not a model")


# --------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["int8", "int4", "w8a8", "fp8"])
def test_modules_on_cuda_match_cpu(kind):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    make = {
        "int8": q.Int8Linear.from_linear,
        "int4": lambda m: q.Int4Linear.from_linear(m, 64),
        "w8a8": q.W8A8Linear.from_linear,
        "fp8": q.FP8Linear.from_linear,
    }[kind]
    cpu_mod = make(lin)
    gpu_mod = make(lin.cuda())
    # CUDA divides by a scalar as a multiply by its reciprocal: scales may differ by an ulp,
    # so a code sitting exactly on a rounding tie may differ by one step (fp8: one ulp).
    for name, buf in cpu_mod.named_buffers():
        other = getattr(gpu_mod, name).cpu()
        if kind == "int4" and name == "qweight":
            buf, other = F.unpack_int4(buf, 256), F.unpack_int4(other, 256)
        if buf.is_floating_point():
            assert torch.allclose(buf, other, rtol=1e-6, atol=0), name
        else:
            assert (buf.int() - other.int()).abs().max() <= 1, name
            assert (buf != other).float().mean() < 1e-3, name
    x = torch.randn(4, 7, 256)
    ref = cpu_mod(x)
    out = gpu_mod(x.cuda()).cpu()
    native = kind == "fp8" and q.matmul.fp8_native_available("cuda")
    if kind == "fp8":
        assert gpu_mod.emulated is not native
    # Native fp8 rounds its output to bf16; everything else is fp32 math on both devices.
    tol = 2e-2 if native else 1e-4
    assert torch.allclose(out, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    bf = gpu_mod(x.cuda().bfloat16())
    assert bf.dtype == torch.bfloat16 and F.sqnr_db(ref, bf.float().cpu()) > 15


# ------------------------------------------------------------------------------ huge pages


def test_hugepage_copy(monkeypatch):
    from infopt.quant import hugepages

    big = torch.randint(0, 256, (1024, 5 * 1024), dtype=torch.uint8)  # 5 MiB
    small = torch.ones(16, dtype=torch.uint8)
    assert hugepages.hugepage_copy(small) is small
    if hugepages.status() is not None:
        pytest.skip(f"huge pages unavailable: {hugepages.status()}")
    out = hugepages.hugepage_copy(big)
    assert out is not big and torch.equal(out, big) and out.shape == big.shape
    assert out.data_ptr() % (2 << 20) == 0 and out.is_contiguous()
    ints = torch.arange(2 << 20, dtype=torch.int32).view(1024, -1)  # 8 MiB of int32
    assert torch.equal(hugepages.hugepage_copy(ints), ints)
    monkeypatch.setenv("INFOPT_HUGEPAGES", "0")
    assert hugepages.status() == "disabled by INFOPT_HUGEPAGES=0"
    assert hugepages.hugepage_copy(big) is big


def test_quantized_weights_move_to_hugepages(monkeypatch, tmp_path):
    from infopt.quant import hugepages

    if hugepages.status() is not None:
        pytest.skip(f"huge pages unavailable: {hugepages.status()}")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1024)  # the tiny model's int8 buffers qualify
    model = tiny_llama()
    ref = model(IDS).logits
    q.quantize_model(model, "int8")
    for m in model.modules():
        if isinstance(m, q.Int8Linear):
            assert m.qweight.data_ptr() % (2 << 20) == 0
    out = model(IDS).logits
    assert _cos(ref, out) > ALIAS_COSINE["int8"]
    assert torch.equal(copy.deepcopy(model)(IDS).logits, out)
    q.save_quantized(model, tmp_path)
    assert torch.equal(q.load_quantized(tmp_path, tiny_llama(seed=2))(IDS).logits, out)
