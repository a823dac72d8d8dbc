"""Save / load quantized models as safetensors.

Layout of ``directory``:

* ``infopt_quant.safetensors``: the model's full state dict (quantized buffers and every
  unquantized tensor, e.g. norms that absorbed AWQ / SmoothQuant scales). Tensors sharing
  storage (tied embeddings) are written once; the metadata maps the other names to it.
  Metadata (all JSON strings): ``infopt_quant_config`` (the config's ``to_dict()``),
  ``infopt_quant_modules`` (``{dotted name: module spec}``), ``infopt_aliases`` and
  ``infopt_serialization_version``.
* ``config.json``: the HF model config when the model has one, so :func:`load_quantized` can
  rebuild the architecture without the original checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..options import record_applied
from .config import QuantConfig
from .qlinear import QuantizedLinear, _class_and_kwargs
from .quantize import (
    is_quantized,
    move_to_hugepages,
    quant_config_of,
    refuse_save_pretrained,
    set_quant_state,
)

__all__ = ["WEIGHTS_NAME", "CheckpointError", "load_quantized", "save_quantized"]

WEIGHTS_NAME = "infopt_quant.safetensors"
_FORMAT_VERSION = 1


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a quantized ``model`` to ``directory`` (created if needed); returns the file path.

    Raises ValueError if ``model`` was not quantized by :func:`infopt.quant.quantize_model`
    (or ``wrap_model(quant=...)``).
    """
    config = quant_config_of(model)
    if config is None or not is_quantized(model):
        raise ValueError(
            "save_quantized needs a model quantized by infopt (quantize_model / wrap_model)"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]  # tied weight: store once
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    modules = {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    metadata = {
        "format": "pt",
        "infopt_serialization_version": str(_FORMAT_VERSION),
        "infopt_quant_config": json.dumps(config.to_dict()),
        "infopt_quant_modules": json.dumps(modules),
        "infopt_aliases": json.dumps(aliases),
    }
    path = out / WEIGHTS_NAME
    save_file(tensors, str(path), metadata=metadata)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "save_pretrained"):
        hf_config.save_pretrained(str(out))
    return path


class CheckpointError(ValueError):
    """A quantized checkpoint directory that cannot be loaded as it is; the message names the
    file, the field or tensor, and what was expected."""


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """``(metadata, {tensor name: (shape, dtype string)})`` from the safetensors header only
    (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {}
            for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
                sl = f.get_slice(k)
                tensors[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); write it "
            "again with infopt.save_quantized"
        ) from e
    return meta, tensors


def _field(path: Path, meta: dict[str, str], name: str) -> Any:
    """Metadata field ``name`` parsed as JSON."""
    if name not in meta:
        raise CheckpointError(f"{path}: metadata field {name!r} is missing")
    try:
        return json.loads(meta[name])
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata field {name!r} is not valid JSON ({e})") from e


def _check_version(path: Path, meta: dict[str, str]) -> None:
    raw = meta.get("infopt_serialization_version")
    if raw is None or "infopt_quant_config" not in meta:
        raise CheckpointError(
            f"{path} is not an infopt quantized checkpoint (no infopt_serialization_version / "
            "infopt_quant_config metadata)"
        )
    if not (isinstance(raw, str) and raw.isdigit() and raw.isascii()):
        raise CheckpointError(
            f"{path}: metadata field 'infopt_serialization_version' must be a positive "
            f"integer, got {raw!r}"
        )
    version = int(raw)
    if version < 1:
        raise CheckpointError(
            f"{path}: metadata field 'infopt_serialization_version' must be >= 1, got {version}"
        )
    if version > _FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: infopt_serialization_version {version} is newer than this infopt reads "
            f"({_FORMAT_VERSION}); upgrade infopt"
        )


def _parse(path: Path, meta: dict[str, str], stored: dict[str, Any]) -> tuple[
    QuantConfig, dict[str, tuple[type[QuantizedLinear], dict[str, Any]]], dict[str, str]
]:
    """The quant config, module specs and aliases of the metadata, each field validated."""
    _check_version(path, meta)
    try:
        config = QuantConfig.from_dict(_field(path, meta, "infopt_quant_config"))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata field 'infopt_quant_config': {e}") from e
    raw_modules = _field(path, meta, "infopt_quant_modules")
    if not isinstance(raw_modules, dict):
        raise CheckpointError(f"{path}: metadata field 'infopt_quant_modules' must be an object")
    modules = {}
    for name, spec in raw_modules.items():
        try:
            modules[name] = _class_and_kwargs(spec)
        except ValueError as e:
            raise CheckpointError(
                f"{path}: metadata field 'infopt_quant_modules'[{name!r}].{e}"
            ) from None
    aliases = _field(path, meta, "infopt_aliases")
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointError(
            f"{path}: metadata field 'infopt_aliases' must map tensor names to tensor names"
        )
    for alias, source in aliases.items():
        if alias in stored:
            raise CheckpointError(
                f"{path}: metadata field 'infopt_aliases' maps {alias!r}, a tensor the file "
                "stores, to another one; an alias may only name a tensor that is not stored"
            )
        if source not in stored:
            raise CheckpointError(
                f"{path}: metadata field 'infopt_aliases' maps {alias!r} to {source!r}, which "
                "the file does not store"
            )
    return config, modules, aliases


def _base_model(directory: Path, base: Any) -> tuple[nn.Module, bool]:
    """``(model, built on the meta device)``."""
    if isinstance(base, nn.Module):
        return base, False
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if base is None:
        cfg_path = directory / "config.json"
        if not cfg_path.exists():
            raise ValueError(
                f"{directory} has no config.json; pass the base model to load_quantized"
            )
        try:
            with open(cfg_path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_path}: not a readable JSON file ({e})") from e
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise CheckpointError(
                f"{cfg_path}: must be a JSON object with a string field 'model_type' (a "
                "transformers model config)"
            )
        try:
            base = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_path}: not a valid transformers config ({e})") from e
    if not isinstance(base, PretrainedConfig):
        raise TypeError(
            "base must be an nn.Module, a transformers PretrainedConfig or None, got "
            f"{type(base).__name__}"
        )
    # On the meta device: shapes only. Nothing is allocated until the checkpoint's tensors
    # are read, after they were checked against these shapes.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base)
    return model, True


def _check_shapes(
    path: Path, model: nn.Module, stored: dict[str, tuple[tuple[int, ...], str]],
    aliases: dict[str, str], modules: dict[str, Any],
) -> None:
    """Every tensor the model expects is stored (or aliased) with the model's shape, and
    nothing else is; quantized buffers also with their exact dtype."""
    expected = model.state_dict(keep_vars=True)
    have = set(stored) | set(aliases)
    missing, unexpected = sorted(set(expected) - have), sorted(have - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model built from its config: missing tensors "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected tensors "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} (config.json and the "
            "checkpoint disagree, e.g. num_hidden_layers was edited)"
        )
    for name, (shape, dtype) in stored.items():
        want = expected[name]
        for alias in (a for a, src in aliases.items() if src == name):
            if tuple(expected[alias].shape) != tuple(want.shape):
                raise CheckpointError(
                    f"{path}: alias {alias!r} -> {name!r} joins tensors of shapes "
                    f"{tuple(expected[alias].shape)} and {tuple(want.shape)}"
                )
        if shape != tuple(want.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(shape)}, but the model built from "
                f"the config expects {list(want.shape)} (config.json and the checkpoint "
                "disagree, e.g. vocab_size or hidden_size was edited)"
            )
        # A quantized module's buffers (codes, scales, zero points, its bias in the spec's
        # bias_dtype) are read by kernels that take exactly one dtype; other tensors keep the
        # float dtype they were saved in.
        exact = name.rpartition(".")[0] in modules or not want.is_floating_point()
        if exact and dtype != _st_dtype(want.dtype):
            raise CheckpointError(
                f"{path}: tensor {name!r} is stored as {dtype}, expected {_st_dtype(want.dtype)}"
            )
        if want.is_floating_point() and dtype not in _FLOAT_ST:
            raise CheckpointError(
                f"{path}: tensor {name!r} is stored as {dtype}, expected a floating-point dtype"
            )


_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL",
}
_FLOAT_ST = ("F32", "F16", "BF16", "F64")


def _st_dtype(dtype: torch.dtype) -> str:
    return _ST_DTYPES.get(dtype, str(dtype))


def _check_values(
    path: Path, state: dict[str, torch.Tensor], model: nn.Module, modules: dict[str, Any],
    check_finite: bool,
) -> None:
    """Ranges of the quantized buffers (scales > 0, int4 zero points 0..15, no fp8 NaN
    codes) and, with ``check_finite``, no NaN / inf in any parameter or scale."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, t in state.items():
        owner, _, leaf = name.rpartition(".")
        if owner in modules:
            if leaf in ("scale", "in_scale") and bool((t <= 0).any()):
                raise CheckpointError(f"{path}: tensor {name!r} has scales <= 0")
            if leaf == "zero" and bool((t > 15).any()):
                raise CheckpointError(
                    f"{path}: tensor {name!r} has int4 zero points above 15 (max "
                    f"{int(t.max())}); int4 zero points are 0..15"
                )
            fp8 = leaf == "weight_fp8" and check_finite
            if fp8 and bool(t.view(torch.float8_e4m3fn).isnan().any()):
                raise CheckpointError(f"{path}: tensor {name!r} holds fp8 NaN codes")
        elif name not in params:
            continue  # buffers of unquantized modules (masks) may hold inf on purpose
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{path}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf); pass "
                "check_finite=False to load_quantized to load it anyway"
            )


def _materialise_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (e.g. rotary ``inv_freq``) are not in the checkpoint: after a
    meta-device build they are computed on CPU the way transformers' from_pretrained does,
    by the model's ``_init_weights`` on their modules (loaded tensors are flagged so it
    leaves them alone)."""
    owners = []
    for mod in model.modules():
        for name in mod._non_persistent_buffers_set:
            b = mod._buffers.get(name)
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.empty_like(b, device="cpu")
                if mod not in owners:
                    owners.append(mod)
    if not owners:
        return
    init = getattr(model, "_init_weights", None)
    if not callable(init):
        raise TypeError(
            f"{type(model).__name__} has non-persistent buffers but no _init_weights to compute "
            "them; pass an instantiated base model to load_quantized"
        )
    for t in model.state_dict(keep_vars=True).values():
        t._is_hf_initialized = True
    for mod in owners:
        init(mod)


@torch.no_grad()
def load_quantized(
    directory: str | os.PathLike, base: Any = None, *, check_finite: bool = True
) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`.

    Args:
        directory: what :func:`save_quantized` wrote.
        base: the *unquantized* model of the same architecture to load into (modified in
            place and returned), a ``transformers.PretrainedConfig``, or None to build the
            architecture from the saved ``config.json``. Every tensor is overwritten from the
            checkpoint, so the base's own weights do not matter. Without a module the model
            is built on the meta device and only the stored tensors are materialised (in
            their stored dtypes), so peak memory is about the checkpoint's size.
        check_finite: refuse tensors holding NaN / inf (parameters, biases, scales, fp8
            codes). ``False`` loads them anyway; range checks (scales > 0, int4 zero points
            0..15) always apply.
    Returns:
        The quantized model; its outputs equal those of the saved model exactly.
    Raises:
        CheckpointError (a ``ValueError``): a damaged or tampered file, naming the file and
        the field or tensor. Every header field is checked, and every shape against the
        model's, before any tensor is read.
    """
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    meta, stored = _read_header(path)
    config, modules, aliases = _parse(path, meta, stored)
    model, on_meta = _base_model(directory, base)
    if is_quantized(model):
        raise ValueError(
            "load_quantized needs an unquantized base model; this one is already quantized"
        )
    named = dict(model.named_modules())
    device = torch.device("meta") if on_meta else next(model.parameters()).device
    for name, (cls, kwargs) in modules.items():
        old = named.get(name)
        if not isinstance(old, nn.Linear):
            raise ValueError(
                f"checkpoint quantized {name!r} but the base model has no nn.Linear there"
            )
        if (old.in_features, old.out_features) != (kwargs["in_features"], kwargs["out_features"]):
            raise ValueError(f"{name}: base Linear is {old.in_features}->{old.out_features}, "
                             f"checkpoint has {kwargs['in_features']}->{kwargs['out_features']}")
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            new = cls(**kwargs)
        model.set_submodule(name, new if on_meta else new.to(device))
    _check_shapes(path, model, stored, aliases, modules)

    state = load_file(str(path), device="cpu" if on_meta else str(device))
    _check_values(path, state, model, modules, check_finite)
    for alias, source in aliases.items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True, assign=on_meta)
    if on_meta:
        _retie(model, aliases)
        _materialise_buffers(model)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise CheckpointError(f"{path}: tensors {left[:8]} were never loaded")
    move_to_hugepages(model)
    set_quant_state(model, config)
    refuse_save_pretrained(model)
    record_applied(model, "quant", config)
    return model.eval()


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias the very tensor object of its source again (``assign=True`` loading
    wraps each name in its own Parameter), so tied weights stay tied."""
    for alias, source in aliases.items():
        src_owner, _, src_leaf = source.rpartition(".")
        dst_owner, _, dst_leaf = alias.rpartition(".")
        src_mod = model.get_submodule(src_owner)
        dst_mod = model.get_submodule(dst_owner)
        if src_leaf in src_mod._parameters and dst_leaf in dst_mod._parameters:
            dst_mod._parameters[dst_leaf] = src_mod._parameters[src_leaf]
        elif src_leaf in src_mod._buffers and dst_leaf in dst_mod._buffers:
            dst_mod._buffers[dst_leaf] = src_mod._buffers[src_leaf]
