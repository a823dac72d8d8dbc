"""The ``wrap_model`` option registry and the state object on a wrapped model.

This is the bottom layer the technique packages (``quant/``, ``kvcache/``, ``speculative/``) and
the engine (``batching/``) register into, so that none of them imports :mod:`infopt.api` (which
sits above them and imports them to apply their options):

* :func:`register_option` declares a ``wrap_model`` keyword (its config base class and the
  string aliases that build a default config);
* :func:`register_handler` / :func:`register_check` map one config *type* to the function that
  applies it to a model / says, without changing anything, whether it can be applied (after
  torchao's ``register_quantize_module_handler``: one handler per config type, found through
  the config's MRO);
* :class:`WrapState` is the one object a wrapped model carries (``model._infopt``): what
  ``wrap_model`` applied, in order, and each technique's live state under its option name
  (``state.techniques["kv"]`` is the kv cache's, ``["spec"]`` speculative decoding's, ...).
  :mod:`infopt.api` creates and records it; a technique reads and writes only its own entry,
  through :func:`technique_state` / :func:`set_technique_state`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch.nn as nn

from .config import InfoptConfig

__all__ = [
    "STATE_ATTR",
    "Check",
    "Handler",
    "OptionSpec",
    "WrapInputs",
    "WrapState",
    "check_for",
    "clear_technique_state",
    "handler_for",
    "model_state",
    "parse_registered_option",
    "record_applied",
    "register_check",
    "register_handler",
    "register_option",
    "registered_options",
    "set_technique_state",
    "technique_state",
    "wrap_inputs",
    "wrap_inputs_scope",
]

Handler = Callable[[nn.Module, InfoptConfig], "nn.Module | None"]
Check = Callable[[nn.Module, InfoptConfig], None]

#: The one attribute infopt sets on a wrapped model: its :class:`WrapState`.
STATE_ATTR = "_infopt"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One ``wrap_model`` keyword: the configs it takes and the strings that name them."""

    name: str
    config_type: type[InfoptConfig]
    aliases: Mapping[str, Callable[[], InfoptConfig]]
    description: str = ""
    #: old spelling -> current alias; still accepted, with a DeprecationWarning
    deprecated: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: the alias ``option=True`` stands for (``None``: a bool is not accepted)
    true_alias: str | None = None


@dataclasses.dataclass(frozen=True)
class WrapInputs:
    """What ``wrap_model(..., tokenizer=, calib_data=)`` hands to the handlers that need text,
    beside their configs (a tokenizer object is not config data: configs stay serializable).

    ``tokenizer`` encodes calibration text (calibrated quant methods) when the model has no
    local directory to load one from (e.g. a model built from a GGUF file); ``calib_data`` is the
    user's calibration data (text, texts, a file path or token ids, as
    :func:`infopt.quant.quantize_model` takes it).
    """

    tokenizer: Any = None
    calib_data: Any = None


_WRAP_INPUTS: contextvars.ContextVar[WrapInputs | None] = contextvars.ContextVar(
    "infopt_wrap_inputs", default=None
)


def wrap_inputs() -> WrapInputs:
    """The :class:`WrapInputs` of the ``wrap_model`` call being applied (empty outside one)."""
    return _WRAP_INPUTS.get() or WrapInputs()


@contextlib.contextmanager
def wrap_inputs_scope(inputs: WrapInputs) -> Iterator[None]:
    """Make ``inputs`` what :func:`wrap_inputs` returns inside the block (checks and handlers
    run inside it)."""
    token = _WRAP_INPUTS.set(inputs)
    try:
        yield
    finally:
        _WRAP_INPUTS.reset(token)


#: ``wrap_model`` keywords that are inputs, not options.
RESERVED_NAMES = ("model", "tokenizer", "calib_data")

_OPTIONS: dict[str, OptionSpec] = {}
_HANDLERS: dict[type[InfoptConfig], Handler] = {}
_CHECKS: dict[type[InfoptConfig], Check] = {}


def register_option(
    name: str,
    config_type: type[InfoptConfig],
    aliases: Mapping[str, Callable[[], InfoptConfig]],
    description: str = "",
    deprecated: Mapping[str, str] | None = None,
    true_alias: str | None = None,
) -> OptionSpec:
    """Declare a ``wrap_model`` keyword, e.g. ``register_option("quant", QuantConfig, {...})``.

    Aliases are spelled with hyphens (``"int4-awq"``, ``"paged-int8"``, ``"prompt-lookup"``);
    ``deprecated`` maps old spellings to current aliases, accepted with a DeprecationWarning;
    ``true_alias`` is the alias ``option=True`` means (on/off options such as ``compile=``).
    """
    if name in _OPTIONS:
        raise ValueError(f"wrap_model option {name!r} is already registered")
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is a wrap_model input, not an option name; reserved: "
                         f"{', '.join(RESERVED_NAMES)}")
    deprecated = dict(deprecated or {})
    bad = {old: new for old, new in deprecated.items() if new not in aliases or old in aliases}
    if bad:
        raise ValueError(f"deprecated spellings {bad} must map new names to existing aliases")
    if true_alias is not None and true_alias not in aliases:
        raise ValueError(f"true_alias {true_alias!r} is not one of the aliases {sorted(aliases)}")
    spec = OptionSpec(name, config_type, dict(aliases), description, deprecated, true_alias)
    _OPTIONS[name] = spec
    return spec


def registered_options() -> dict[str, OptionSpec]:
    """The options registered so far, in registration order (a copy)."""
    return dict(_OPTIONS)


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


def handler_for(config: InfoptConfig) -> Handler:
    """The handler registered for ``config``'s type (or the nearest base class that has one)."""
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    raise TypeError(f"no handler is registered for config type {type(config).__name__}")


def check_for(config: InfoptConfig) -> Check | None:
    """The check registered for ``config``'s type (or a base class), ``None`` if there is none."""
    for klass in type(config).__mro__:
        if klass in _CHECKS:
            return _CHECKS[klass]
    return None


def parse_registered_option(name: str, value: Any, *, stacklevel: int = 3) -> InfoptConfig:
    """One keyword value (alias string, config or config dict) of an option registered so far
    -> a config. :func:`infopt.api.parse_option` registers the built-in options first."""
    spec = _OPTIONS.get(name)
    if spec is None:
        accepted = ", ".join(sorted(_OPTIONS)) or "none are registered"
        raise ValueError(f"wrap_model got an unknown option {name!r}; accepted options: {accepted}")
    if value is True and spec.true_alias is not None:
        value = spec.true_alias
    if isinstance(value, str):
        if value in spec.deprecated:
            new = spec.deprecated[value]
            warnings.warn(
                f"wrap_model option {name}={value!r} is deprecated; use {name}={new!r}",
                DeprecationWarning, stacklevel=stacklevel,
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


# --- the state object on a wrapped model -----------------------------------------------------


@dataclasses.dataclass
class WrapState:
    """Everything infopt keeps on a model, as one attribute (``model._infopt``).

    Attributes:
        applied: ``[{"option": name, "config": config.to_dict()}, ...]`` in the order the
            options were applied (what :func:`infopt.applied_configs` returns and
            :func:`infopt.save_quantized` records).
        techniques: option name -> that technique's state object (e.g. the kv cache's
            :class:`~infopt.kvcache.hf.KVState`, speculative decoding's ``SpecState``, the
            quantization config). Each technique reads and writes its own entry only.
    """

    applied: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    techniques: dict[str, Any] = dataclasses.field(default_factory=dict)

    def copy(self) -> WrapState:
        """A copy whose lists and dicts are new (the technique states are shared)."""
        return WrapState(list(self.applied), dict(self.techniques))


def model_state(model: nn.Module, *, create: bool = False) -> WrapState | None:
    """``model``'s :class:`WrapState` (``None`` for a model infopt never touched, unless
    ``create``)."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = WrapState()
        model.__dict__[STATE_ATTR] = state
    return state


def technique_state(model: nn.Module, name: str) -> Any:
    """The state the technique ``name`` (its option name: ``"quant"``, ``"kv"``, ``"spec"``)
    keeps on ``model``; ``None`` if it has none."""
    state = model.__dict__.get(STATE_ATTR)
    return None if state is None else state.techniques.get(name)


def set_technique_state(model: nn.Module, name: str, value: Any) -> None:
    """Store the technique ``name``'s state on ``model`` (replacing what it had)."""
    model_state(model, create=True).techniques[name] = value


def clear_technique_state(model: nn.Module, name: str) -> Any:
    """Remove and return the technique ``name``'s state (``None`` if it had none)."""
    state = model.__dict__.get(STATE_ATTR)
    return None if state is None else state.techniques.pop(name, None)


def record_applied(model: nn.Module, name: str, config: InfoptConfig) -> None:
    """Append ``{"option": name, "config": config.to_dict()}`` to what ``model`` records as
    applied (``wrap_model`` does this for each option; :func:`infopt.load_quantized` for the
    quantization it restores)."""
    model_state(model, create=True).applied.append({"option": name, "config": config.to_dict()})
