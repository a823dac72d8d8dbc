"""``wrap_model``: strings or config objects in, an optimized model out.

Shape (after torchao's quantize_ API): each keyword option (``quant=``, ``kv=``, ``spec=``...)
is registered once with the config base class it accepts and the string aliases that build a
default config. Every config *type* has one handler that applies it to a model. ``wrap_model``
parses every option first (so a bad option changes nothing), then applies them in registration
order, and records what it applied on the model so it can be saved and reported.
"""

from __future__ import annotations

import dataclasses
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
    return {name: sorted(spec.aliases) for name, spec in _OPTIONS.items()}


def parse_option(name: str, value: Any) -> InfoptConfig:
    """Turn one ``wrap_model`` keyword value (alias string, config, or config dict) into a config."""
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
        raise TypeError(f"wrap_model expects a torch.nn.Module as model, got {type(model).__name__}")
    # Parse everything before touching the model, so one bad option applies nothing.
    parsed = {name: parse_option(name, v) for name, v in options.items() if v is not None}
    for name in _OPTIONS:  # registration order = application order (quant before kv ...)
        if name not in parsed:
            continue
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
