"""``wrap_model``: strings or config objects in, an optimized model out.

Shape (after torchao's quantize_ API): each keyword option (``quant=``, ``kv=``, ``spec=``...)
is registered once with the config base class it accepts and the string aliases that build a
default config. Every config *type* has one handler that applies it to a model. ``wrap_model``
parses every option first (so a bad option changes nothing), then applies them in registration
order, and records what it applied on the model so it can be saved and reported.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from .config import InfoptConfig

Handler = Callable[[nn.Module, InfoptConfig], "nn.Module | None"]

# Attribute set on a wrapped model: list of config dicts in the order they were applied.
APPLIED_ATTR = "_infopt_applied"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One ``wrap_model`` keyword: the configs it takes and the strings that name them."""

    name: str
    config_type: type[InfoptConfig]
    aliases: Mapping[str, Callable[[], InfoptConfig]]
    description: str = ""


_OPTIONS: dict[str, OptionSpec] = {}
_HANDLERS: dict[type[InfoptConfig], Handler] = {}

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
) -> OptionSpec:
    """Declare a ``wrap_model`` keyword, e.g. ``register_option("quant", QuantConfig, {...})``."""
    if name in _OPTIONS:
        raise ValueError(f"wrap_model option {name!r} is already registered")
    spec = OptionSpec(name, config_type, dict(aliases), description)
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


def wrap_model(model: nn.Module, **options: Any) -> nn.Module:
    """Apply optimizations to ``model`` in place and return it.

    Args:
        model: any ``nn.Module``; typically a HuggingFace ``*ForCausalLM``.
        **options: ``option=value`` where value is an alias string, a config dataclass or a
            config dict (``to_dict()`` output). ``None`` means "not this option".

    With no options this is an exact no-op: the same object, untouched parameters.
    The wrapped model keeps working with ``model.generate``.
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
    for name in order:
        config = parsed[name]
        handler = _handler_for(config)
        result = handler(model, config)
        if result is not None and result is not model:
            raise RuntimeError(
                f"handler for {type(config).__name__} returned a new module; handlers must "
                "modify the model in place"
            )
        applied = getattr(model, APPLIED_ATTR, [])
        applied.append({"option": name, "config": config.to_dict()})
        setattr(model, APPLIED_ATTR, applied)
    return model


def applied_configs(model: nn.Module) -> list[dict[str, Any]]:
    """What ``wrap_model`` applied to ``model``, in order (empty for an unwrapped model)."""
    return list(getattr(model, APPLIED_ATTR, []))
