"""Named benchmark configurations.

A bench config says how to turn a freshly loaded model into the thing being measured: the
dtype to load it in, and either a dict of :func:`infopt.wrap_model` options or, for "peer"
configs that measure someone else's optimization (e.g. torchao), an ``apply(model) -> model``
callable. ``baseline`` (fp32, untouched HF model) is the row every ratio is computed against.

Other modules add their own rows with :func:`register_bench_config`, e.g.::

    register_bench_config(
        BenchConfig("int8", "int8 weight-only linears", wrap_options={"quant": "int8"})
    )
"""

from __future__ import annotations

import dataclasses
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
            reads the cache (``infopt.kvcache.quality``).
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
    # The technique packages (quant, kvcache, speculative) register their rows on import.
    from ..api import load_builtin_options

    load_builtin_options()
    return list(_REGISTRY)


def get_bench_config(name: str) -> BenchConfig:
    """Look up one config; unknown names raise ``ValueError`` listing the accepted ones."""
    if name not in _REGISTRY:
        list_bench_configs()  # imports the technique packages, which register their rows
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


# --- builtins -------------------------------------------------------------------------------

register_bench_config(
    BenchConfig(BASELINE, "HF model as loaded, fp32, no infopt options (the reference row)")
)
register_bench_config(
    BenchConfig("bf16", "HF model loaded in bfloat16, no infopt options", dtype=torch.bfloat16)
)

# Technique rows: plain wrap_model options on an fp32 model, so each row is "what a user gets
# from wrap_model(model, <option>)" measured against the unwrapped baseline.
for _name, _desc, _opts in (
    ("int8", "quant: int8 weight-only, per-channel (C++ GEMV on CPU)", {"quant": "int8"}),
    ("int4", "quant: int4 weight-only RTN, group 128", {"quant": "int4"}),
    ("int4-awq", "quant: int4 AWQ, group 128 (calibrated)", {"quant": "int4-awq"}),
    ("int4-gptq", "quant: int4 GPTQ + act_order, group 128 (calibrated)", {"quant": "int4-gptq"}),
    ("w8a8", "quant: SmoothQuant W8A8, dynamic per-token int8 activations", {"quant": "w8a8"}),
    ("fp8", "quant: fp8 e4m3 weights + activations (emulated on CPU)", {"quant": "fp8"}),
):
    register_bench_config(BenchConfig(_name, _desc, wrap_options=_opts))


def _register_full_quant_rows() -> None:
    # lm_head is skipped by default (QuantConfig.skip). On a large-vocabulary model it is a big
    # share of the weights read per token (Qwen2.5-1.5B: 151936 x 1536, 0.93 GB in fp32, 13 %
    # of the model) and caps the decode speedup, so these rows quantize it int8 as well. An int4
    # head costs quality on small models (SmolLM2-135M: +55 % ppl vs +29 % with an fp32 head).
    from ..quant.config import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    for name, desc, cfg in (
        ("int8-head8", "quant: int8 weight-only, lm_head int8 too",
         Int8WeightOnlyConfig(lm_head="int8")),
        ("int4-head8", "quant: int4 RTN g128, lm_head int8",
         Int4WeightOnlyConfig(lm_head="int8")),
        ("int4-a8-head8", "quant: int4 RTN g128 x int8 activations per 32-block, lm_head int8",
         Int4WeightOnlyConfig(lm_head="int8", act_dtype="int8")),
        ("int4-awq-head8", "quant: int4 AWQ g128, lm_head int8",
         Int4WeightOnlyConfig(method="awq", lm_head="int8")),
        # torchao's / gpt-fast's int4 scope: every nn.Linear, the head too.
        ("int4-all", "quant: int4 RTN g128 on every nn.Linear incl. lm_head",
         Int4WeightOnlyConfig(skip=())),
    ):  # fmt: skip
        register_bench_config(BenchConfig(name, desc, wrap_options={"quant": cfg}))


_register_full_quant_rows()


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


# Peer row, only offered where torchao is installed (find_spec does not import it).
if importlib.util.find_spec("torchao") is not None:
    register_bench_config(
        BenchConfig(
            "torchao-int8",
            "peer: torchao int8 weight-only (quantize_), fp32 activations",
            apply=_torchao_int8_weight_only,
        )
    )
