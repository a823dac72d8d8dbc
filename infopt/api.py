"""``wrap_model``: strings or config objects in, an optimized model out.

Shape (after torchao's quantize_ API): each keyword option (``quant=``, ``kv=``, ``spec=``...)
is registered once with the config base class it accepts and the string aliases that build a
default config. Every config *type* has one handler that applies it to a model, and may have a
check that says, without changing anything, whether the model supports it. ``wrap_model`` parses
every option and runs every check first (so a bad option changes nothing), then applies them
(quant, kv, spec, then the others in registration order) all or nothing: if one raises, the
model is put back as it was (see :class:`_Snapshot`).

One state object on the wrapped model: :class:`~infopt.options.WrapState` (``model._infopt``)
records what was applied, in order, and holds each technique's state under its option name
(:func:`model_state`, :func:`technique_state`). The registry itself lives in
:mod:`infopt.options`, the layer below the technique packages, so that they register into it
without importing this module.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn as nn

from .config import InfoptConfig
from .options import (
    STATE_ATTR,
    Check,
    Handler,
    OptionSpec,
    WrapInputs,
    WrapState,
    check_for,
    handler_for,
    model_state,
    parse_registered_option,
    record_applied,
    register_check,
    register_handler,
    register_option,
    registered_options,
    technique_state,
    wrap_inputs_scope,
)

__all__ = [
    "STATE_ATTR",
    "Check",
    "Handler",
    "OptionSpec",
    "WrapState",
    "accepted_options",
    "applied_configs",
    "load_builtin_options",
    "model_state",
    "parse_option",
    "register_check",
    "register_handler",
    "register_option",
    "technique_state",
    "wrap_model",
]

# The technique packages register their options on import (into :mod:`infopt.options`, the
# layer below them, so they never import this module). They are imported on first use of the
# registry, not by ``import infopt``, which keeps the top-level import cheap.
# infopt.batching registers the kv handler: generate on a kv-wrapped model runs on the engine.
_BUILTIN_OPTION_MODULES = (
    "infopt.quant", "infopt.kvcache", "infopt.batching", "infopt.speculative"
)
_builtins_loaded = False
_APPLY_ORDER = ("quant", "kv", "spec")


def load_builtin_options() -> None:
    """Import the technique packages so their options and handlers are registered."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in _BUILTIN_OPTION_MODULES:
        importlib.import_module(mod)


def accepted_options() -> dict[str, list[str]]:
    """``{option name: [accepted string aliases]}`` for error messages and the CLI."""
    load_builtin_options()
    return {name: sorted(spec.aliases) for name, spec in registered_options().items()}


def parse_option(name: str, value: Any) -> InfoptConfig:
    """One ``wrap_model`` keyword value (alias string, config or config dict) -> a config."""
    load_builtin_options()
    return parse_registered_option(name, value, stacklevel=4)


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
        # Handlers update the state object in place: keep a copy of its lists and dicts.
        self.model = model
        state = model_state(model)
        self.state = None if state is None else state.copy()
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
        if self.state is not None:
            self.model.__dict__[STATE_ATTR] = self.state
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


def wrap_model(
    model: nn.Module, *, tokenizer: Any = None, calib_data: Any = None, **options: Any
) -> nn.Module:
    """Apply optimizations to ``model`` in place and return it.

    Args:
        model: any ``nn.Module``; typically a HuggingFace ``*ForCausalLM``.
        tokenizer: the model's tokenizer, for options that need to encode text: calibrated
            quant methods (``int4-awq``, ``int4-gptq``, ``w8a8``) encode their calibration
            text with it. Default: the tokenizer saved in the model's local directory, which a
            model built from a GGUF file or in memory does not have.
        calib_data: your own calibration data for a calibrated quant method instead of the
            default mix: a text, a list of texts, a ``pathlib.Path`` or token ids (1-D: windows
            are cut from it; 2-D ``[n, seq_len]``: the windows). Refused with a ``ValueError``
            when no option calibrates.
        **options: ``option=value`` where value is an alias string, a config dataclass or a
            config dict (``to_dict()`` output). ``None`` (or ``False``) means "not this
            option"; ``True`` means an on/off option's default (``compile=True`` is
            ``compile="inductor"``).

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
    parsed = {name: parse_option(name, v) for name, v in options.items()
              if v is not None and v is not False}
    # Weights are quantized before the KV cache and speculation are set up, whatever order the
    # technique packages happened to be imported in; other options follow in registration order.
    registered = list(registered_options())
    order = sorted(
        parsed,
        key=lambda n: (_APPLY_ORDER.index(n) if n in _APPLY_ORDER else len(_APPLY_ORDER),
                       registered.index(n)),
    )
    if calib_data is not None and not any(
        getattr(parsed[n], "calibrated", False) for n in order
    ):
        raise ValueError(
            "calib_data= is used only by a calibrated quant method (quant='int4-awq', "
            "'int4-gptq' or 'w8a8'); the options given ("
            f"{', '.join(f'{n}={type(parsed[n]).__name__}' for n in order) or 'none'}) do not "
            "calibrate"
        )
    inputs = WrapInputs(tokenizer=tokenizer, calib_data=calib_data)
    with wrap_inputs_scope(inputs):
        return _wrap(model, parsed, order)


def _wrap(model: nn.Module, parsed: dict[str, InfoptConfig], order: list[str]) -> nn.Module:
    handlers = {name: handler_for(parsed[name]) for name in order}
    for name in order:
        check = check_for(parsed[name])
        if check is not None:
            check(model, parsed[name])
    if not order:
        return model
    snapshot = _Snapshot(model)
    try:
        for name in order:
            config = parsed[name]
            result = handlers[name](model, config)
            if result is not None and result is not model:
                raise RuntimeError(
                    f"handler for {type(config).__name__} returned a new module; handlers must "
                    "modify the model in place"
                )
            record_applied(model, name, config)
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
    return model


def applied_configs(model: nn.Module) -> list[dict[str, Any]]:
    """What ``wrap_model`` applied to ``model``, in order (empty for an unwrapped model)."""
    state = model_state(model)
    return [] if state is None else list(state.applied)
