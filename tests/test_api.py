"""wrap_model, the option/handler registry, configs and the module walk."""

import dataclasses

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import infopt
from infopt import api, options
from infopt.config import InfoptConfig, register_config
from infopt.module_walk import iter_modules, matches_any, replace_modules


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@register_config
@dataclasses.dataclass(frozen=True)
class _ScaleConfig(InfoptConfig):
    """Test-only config: multiply every Linear weight by ``factor``."""

    VERSION = 2
    factor: float = 2.0
    skip: tuple[str, ...] = ("lm_head",)


@pytest.fixture
def scale_option(monkeypatch):
    api.load_builtin_options()  # so the copies below hold quant/kv/spec as well
    monkeypatch.setattr(options, "_OPTIONS", dict(options._OPTIONS))
    monkeypatch.setattr(options, "_HANDLERS", dict(options._HANDLERS))
    aliases = {"double": _ScaleConfig, "half": lambda: _ScaleConfig(0.5)}
    api.register_option("scale", _ScaleConfig, aliases)

    @api.register_handler(_ScaleConfig)
    def _apply(model, cfg):
        with torch.no_grad():
            for name, mod in iter_modules(model, lambda m, n: isinstance(m, nn.Linear)):
                if not matches_any(name, cfg.skip):
                    mod.weight.mul_(cfg.factor)

    return _apply


def test_wrap_model_without_options_is_exact_noop():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 101, (2, 9))
    ref = model(ids).logits
    out = infopt.wrap_model(model)
    assert out is model
    assert torch.equal(model(ids).logits, ref)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert infopt.applied_configs(model) == []
    gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 14)


def test_unknown_option_lists_accepted(scale_option):
    with pytest.raises(ValueError, match=r"unknown option 'quantt'.*accepted options: .*scale"):
        infopt.wrap_model(tiny_llama(), quantt="int4")


def test_unknown_alias_lists_values(scale_option):
    with pytest.raises(ValueError, match=r"scale='triple'.*accepted values: double, half"):
        infopt.wrap_model(tiny_llama(), scale="triple")


def test_wrong_type_is_type_error(scale_option):
    with pytest.raises(TypeError, match="scale= takes a string"):
        infopt.wrap_model(tiny_llama(), scale=3)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        infopt.wrap_model("not a model", scale="double")


def test_alias_config_and_dict_are_equivalent(scale_option):
    ids = torch.randint(0, 101, (1, 7))
    outs = []
    for value in ("half", _ScaleConfig(0.5), _ScaleConfig(0.5).to_dict()):
        m = infopt.wrap_model(tiny_llama(), scale=value)
        outs.append(m(ids).logits)
        expected = [{"option": "scale", "config": _ScaleConfig(0.5).to_dict()}]
        assert infopt.applied_configs(m) == expected
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert not torch.equal(outs[0], tiny_llama()(ids).logits)


def test_bad_option_applies_nothing(scale_option):
    model = tiny_llama()
    w = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(ValueError):
        infopt.wrap_model(model, scale="double", bogus=1)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, w)


def test_builtin_options_are_registered():
    opts = infopt.accepted_options()
    assert {"quant", "kv", "spec"} <= set(opts)
    assert "int4" in opts["quant"] and "paged" in opts["kv"] and "prompt-lookup" in opts["spec"]


def test_config_round_trip_and_versioning():
    cfg = _ScaleConfig(1.5, ("lm_head", "*.q_proj"))
    d = cfg.to_dict()
    assert d == {"type": "_ScaleConfig", "version": 2,
                 "fields": {"factor": 1.5, "skip": ["lm_head", "*.q_proj"]}}
    assert InfoptConfig.from_dict(d) == cfg
    assert _ScaleConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="newer than this infopt supports"):
        InfoptConfig.from_dict({**d, "version": 3})
    with pytest.raises(ValueError, match="unknown fields"):
        InfoptConfig.from_dict({**d, "fields": {"factr": 1.0}})
    with pytest.raises(ValueError, match="unknown config type"):
        InfoptConfig.from_dict({"type": "Nope", "fields": {}})


def test_replace_modules_walks_once_with_dotted_names():
    model = tiny_llama()

    class Marked(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    ids = torch.randint(0, 101, (1, 5))
    ref = model(ids).logits
    names = replace_modules(
        model,
        lambda m, n: isinstance(m, nn.Linear) and not matches_any(n, ["lm_head"]),
        lambda m, n: Marked(m),
    )
    # 2 layers x (q,k,v,o,gate,up,down); the wrapped Linear inside Marked is not revisited.
    assert len(names) == 14
    assert names[0] == "model.layers.0.self_attn.q_proj"
    assert "lm_head" not in names
    assert isinstance(model.model.layers[1].mlp.down_proj, Marked)
    assert torch.equal(model(ids).logits, ref)
    with pytest.raises(TypeError, match="replace_fn returned"):
        replace_modules(model, lambda m, n: n == "lm_head", lambda m, n: 3)
