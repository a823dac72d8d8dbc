"""``wrap_model``: strings or config objects in, an optimized model out.

Shape (after torchao's quantize_ API): each keyword option (``quant=``, ``kv=``, ``spec=``...)
is registered once with the config base class it accepts and the string aliases that build a
default config. Every config *type* has one handler that applies it to a model, and may have a
check that says, without changing anything, whether the model supports it. ``wrap_model`` parses
every option and runs every check first (so a bad option changes nothing), then applies them
(quant, kv, spec, then the others in registration order) all or nothing: if one raises, the
model is put back as it was (see :class:`_Snapshot`). It records what it applied on the model
so it can be saved and reported.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from .config import InfoptConfig

Handler = Callable[[nn.Module, InfoptConfig], "nn.Module | None"]
Check = Callable[[nn.Module, InfoptConfig], None]

# Attribute set on a wrapped model: list of config dicts in the order they were applied.
APPLIED_ATTR = "_infopt_applied"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One ``wrap_model`` keyword: the configs it takes and the strings that name them."""

    name: str
    config_type: type[InfoptConfig]
    aliases: Mapping[str, Callable[[], InfoptConfig]]
    description: str = ""
    #: old spelling -> current alias; still accepted, with a DeprecationWarning
    deprecated: Mapping[str, str] = dataclasses.field(default_factory=dict)


_OPTIONS: dict[str, OptionSpec] = {}
_HANDLERS: dict[type[InfoptConfig], Handler] = {}
_CHECKS: dict[type[InfoptConfig], Check] = {}

# The technique packages register their options on import. They are imported on first use of
# the registry, not by ``import infopt``, which keeps the top-level import cheap.
# infopt.batching registers the kv handler: generate on a kv-wrapped model runs on the engine.
_BUILTIN_OPTION_MODULES = (
    "infopt.quant", "infopt.kvcache", "infopt.batching", "infopt.speculative"
)
_builtins_loaded = False
_APPLY_ORDER = ("quant", "kv", "spec")


def load_builtin_options() -> None:
    """Import the technique packages so their options (and bench rows) are registered."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in _BUILTIN_OPTION_MODULES:
        importlib.import_module(mod)


def register_option(
    name: str,
    config_type: type[InfoptConfig],
    aliases: Mapping[str, Callable[[], InfoptConfig]],
    description: str = "",
    deprecated: Mapping[str, str] | None = None,
) -> OptionSpec:
    """Declare a ``wrap_model`` keyword, e.g. ``register_option("quant", QuantConfig, {...})``.

    Aliases are spelled with hyphens (``"int4-awq"``, ``"paged-int8"``, ``"prompt-lookup"``);
    ``deprecated`` maps old spellings to current aliases, accepted with a DeprecationWarning.
    """
    if name in _OPTIONS:
        raise ValueError(f"wrap_model option {name!r} is already registered")
    deprecated = dict(deprecated or {})
    bad = {old: new for old, new in deprecated.items() if new not in aliases or old in aliases}
    if bad:
        raise ValueError(f"deprecated spellings {bad} must map new names to existing aliases")
    spec = OptionSpec(name, config_type, dict(aliases), description, deprecated)
    _OPTIONS[name] = spec
    return spec


def register_handler(config_type: type[InfoptConfig]) -> Callable[[Handler], Handler]:
    """Decorator: ``fn(model, config)`` applies ``config`` (and its subclasses) in place."""

    def deco(fn: Handler) -> Handler:
        if config_type in _HANDLERS:
            raise ValueError(f"a handler for {config_type.__name__} is already registered")
        _HANDLERS[config_type] = fn
        return fn

    return deco


def register_check(config_type: type[InfoptConfig]) -> Callable[[Check], Check]:
    """Decorator: ``fn(model, config)`` raises (``TypeError`` for an unsupported kind of model,
    ``ValueError`` / ``NotImplementedError`` naming the cause otherwise) when ``config`` (or a
    subclass) cannot be applied to ``model``. It must not change the model: ``wrap_model``
    runs the checks of every option before applying any."""

    def deco(fn: Check) -> Check:
        if config_type in _CHECKS:
            raise ValueError(f"a check for {config_type.__name__} is already registered")
        _CHECKS[config_type] = fn
        return fn

    return deco


def accepted_options() -> dict[str, list[str]]:
    """``{option name: [accepted string aliases]}`` for error messages and the CLI."""
    load_builtin_options()
    return {name: sorted(spec.aliases) for name, spec in _OPTIONS.items()}


def parse_option(name: str, value: Any) -> InfoptConfig:
    """One ``wrap_model`` keyword value (alias string, config or config dict) -> a config."""
    load_builtin_options()
    spec = _OPTIONS.get(name)
    if spec is None:
        accepted = ", ".join(sorted(_OPTIONS)) or "none are registered"
        raise ValueError(f"wrap_model got an unknown option {name!r}; accepted options: {accepted}")
    if isinstance(value, str):
        if value in spec.deprecated:
            new = spec.deprecated[value]
            warnings.warn(
                f"wrap_model option {name}={value!r} is deprecated; use {name}={new!r}",
                DeprecationWarning, stacklevel=3,
            )
            value = new
        factory = spec.aliases.get(value)
        if factory is None:
            raise ValueError(
                f"wrap_model option {name}={value!r} is not recognised; accepted values: "
                f"{', '.join(sorted(spec.aliases))} (or a {spec.config_type.__name__} object)"
            )
        return factory()
    if isinstance(value, dict):
        value = InfoptConfig.from_dict(value)
    if isinstance(value, spec.config_type):
        return value
    raise TypeError(
        f"wrap_model option {name}= takes a string ({', '.join(sorted(spec.aliases))}), a "
        f"{spec.config_type.__name__} or its to_dict(); got {type(value).__name__}"
    )


def _handler_for(config: InfoptConfig) -> Handler:
    # Walk the MRO so a subclass of a registered config reuses its parent's handler.
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    raise TypeError(f"no handler is registered for config type {type(config).__name__}")


def _check_for(config: InfoptConfig) -> Check | None:
    for klass in type(config).__mro__:
        if klass in _CHECKS:
            return _CHECKS[klass]
    return None


def _tensor_version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


class _Snapshot:
    """What applying options may change on a model, kept by reference (no tensor is copied):
    every module's attribute dicts (so replaced submodules, parameters, buffers, instance
    attributes such as a wrapped ``generate`` and the ``training`` flags come back), the
    attribute dicts of its transformers configs (the attention implementation), and each
    tensor's version counter. Handlers never write into the model's existing tensors (the
    quantizers give folded weights new tensors), so putting the old objects back restores the
    model exactly; an in-place write, which a reference cannot undo, is reported instead.

    Cost: the replaced modules (e.g. the float linears a quantizer swaps out) stay alive until
    ``wrap_model`` returns, instead of being freed one by one.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            (m, dict(m.__dict__), dict(m._modules), dict(m._parameters), dict(m._buffers))
            for m in model.modules()
        ]
        self.configs = [(c, dict(c.__dict__)) for c in _configs_of(model)]
        self.versions = [
            (name, t, _tensor_version(t))
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        ]

    def restore(self) -> list[str]:
        """Put everything back; returns the tensors that were written in place (then the
        model could not be fully restored)."""
        for m, d, modules, params, buffers in self.modules:
            m.__dict__.clear()
            m.__dict__.update(d)
            for live, saved in ((m._modules, modules), (m._parameters, params),
                                (m._buffers, buffers)):
                live.clear()
                live.update(saved)
        for c, d in self.configs:
            c.__dict__.clear()
            c.__dict__.update(d)
        return [name for name, t, v in self.versions if _tensor_version(t) != v]


def _configs_of(model: nn.Module) -> list[Any]:
    """The transformers config objects the model's modules hold (and their sub-configs)."""
    try:
        from transformers import GenerationConfig, PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    seen: dict[int, Any] = {}
    todo = [v for m in model.modules() for v in m.__dict__.values()
            if isinstance(v, (PretrainedConfig, GenerationConfig))]
    while todo:
        c = todo.pop()
        if id(c) in seen:
            continue
        seen[id(c)] = c
        todo.extend(v for v in c.__dict__.values() if isinstance(v, PretrainedConfig))
    return list(seen.values())


def wrap_model(model: nn.Module, **options: Any) -> nn.Module:
    """Apply optimizations to ``model`` in place and return it.

    Args:
        model: any ``nn.Module``; typically a HuggingFace ``*ForCausalLM``.
        **options: ``option=value`` where value is an alias string, a config dataclass or a
            config dict (``to_dict()`` output). ``None`` means "not this option".

    With no options this is an exact no-op: the same object, untouched parameters.
    The wrapped model keeps working with ``model.generate``.

    All or nothing: every option is parsed and checked against the model (e.g. ``spec=`` on a
    module without ``generate`` is a ``TypeError``) before any is applied, and if applying one
    raises, the model is restored to what it was before the call and the error propagates.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"wrap_model expects a torch.nn.Module as model, got {type(model).__name__}"
        )
    load_builtin_options()
    # Parse everything before touching the model, so one bad option applies nothing.
    parsed = {name: parse_option(name, v) for name, v in options.items() if v is not None}
    # Weights are quantized before the KV cache and speculation are set up, whatever order the
    # technique packages happened to be imported in; other options follow in registration order.
    registered = list(_OPTIONS)
    order = sorted(
        parsed,
        key=lambda n: (_APPLY_ORDER.index(n) if n in _APPLY_ORDER else len(_APPLY_ORDER),
                       registered.index(n)),
    )
    handlers = {name: _handler_for(parsed[name]) for name in order}
    for name in order:
        check = _check_for(parsed[name])
        if check is not None:
            check(model, parsed[name])
    if not order:
        return model
    snapshot = _Snapshot(model)
    applied = list(getattr(model, APPLIED_ATTR, []))
    try:
        for name in order:
            config = parsed[name]
            result = handlers[name](model, config)
            if result is not None and result is not model:
                raise RuntimeError(
                    f"handler for {type(config).__name__} returned a new module; handlers must "
                    "modify the model in place"
                )
            applied.append({"option": name, "config": config.to_dict()})
    except BaseException as e:
        written = snapshot.restore()
        if written:
            raise RuntimeError(
                f"wrap_model: applying {name}= failed ({type(e).__name__}: {e}) after its "
                f"handler wrote into existing tensors ({', '.join(written[:5])}"
                f"{', ...' if len(written) > 5 else ''}); the model could not be restored and "
                "should be reloaded"
            ) from e
        raise
    setattr(model, APPLIED_ATTR, applied)
    return model


def applied_configs(model: nn.Module) -> list[dict[str, Any]]:
    """What ``wrap_model`` applied to ``model``, in order (empty for an unwrapped model)."""
    return list(getattr(model, APPLIED_ATTR, []))
