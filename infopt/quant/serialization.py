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

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..api import APPLIED_ATTR
from .config import QuantConfig
from .modules import QuantizedLinear
from .quantize import QUANT_ATTR, is_quantized, move_to_hugepages

__all__ = ["WEIGHTS_NAME", "load_quantized", "save_quantized"]

WEIGHTS_NAME = "infopt_quant.safetensors"
_FORMAT_VERSION = 1


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a quantized ``model`` to ``directory`` (created if needed); returns the file path.

    Raises ValueError if ``model`` was not quantized by :func:`infopt.quant.quantize_model`
    (or ``wrap_model(quant=...)``).
    """
    config = getattr(model, QUANT_ATTR, None)
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
        "infopt_quant_config": json.dumps(config),
        "infopt_quant_modules": json.dumps(modules),
        "infopt_aliases": json.dumps(aliases),
    }
    path = out / WEIGHTS_NAME
    save_file(tensors, str(path), metadata=metadata)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "save_pretrained"):
        hf_config.save_pretrained(str(out))
    return path


def _read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    version = int(meta.get("infopt_serialization_version", "0"))
    if version < 1 or "infopt_quant_config" not in meta:
        raise ValueError(f"{path} is not an infopt quantized checkpoint")
    if version > _FORMAT_VERSION:
        raise ValueError(f"{path} has serialization version {version}; this infopt reads up to "
                         f"{_FORMAT_VERSION}; upgrade infopt")
    return meta


def _base_model(directory: Path, base: Any) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if base is None:
        if not (directory / "config.json").exists():
            raise ValueError(
                f"{directory} has no config.json; pass the base model to load_quantized"
            )
        base = AutoConfig.from_pretrained(str(directory))
    if not isinstance(base, PretrainedConfig):
        raise TypeError(
            "base must be an nn.Module, a transformers PretrainedConfig or None, got "
            f"{type(base).__name__}"
        )
    # Weights are random here and fully overwritten by the checkpoint below.
    return AutoModelForCausalLM.from_config(base)


@torch.no_grad()
def load_quantized(directory: str | os.PathLike, base: Any = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`.

    Args:
        directory: what :func:`save_quantized` wrote.
        base: the *unquantized* model of the same architecture to load into (modified in
            place and returned), a ``transformers.PretrainedConfig``, or None to build the
            architecture from the saved ``config.json``. Every tensor is overwritten from the
            checkpoint, so the base's own weights do not matter.
    Returns:
        The quantized model; its outputs equal those of the saved model exactly.
    """
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    meta = _read_metadata(path)
    config = QuantConfig.from_dict(json.loads(meta["infopt_quant_config"]))
    model = _base_model(directory, base)
    if is_quantized(model):
        raise ValueError(
            "load_quantized needs an unquantized base model; this one is already quantized"
        )
    named = dict(model.named_modules())
    device = next(model.parameters()).device
    for name, spec in json.loads(meta["infopt_quant_modules"]).items():
        old = named.get(name)
        if not isinstance(old, nn.Linear):
            raise ValueError(
                f"checkpoint quantized {name!r} but the base model has no nn.Linear there"
            )
        if (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"{name}: base Linear is {old.in_features}->{old.out_features}, "
                             f"checkpoint has {spec['in_features']}->{spec['out_features']}")
        model.set_submodule(name, QuantizedLinear.from_spec(spec).to(device))
    state = load_file(str(path), device=str(device))
    for alias, source in json.loads(meta["infopt_aliases"]).items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True)
    move_to_hugepages(model)
    setattr(model, QUANT_ATTR, config.to_dict())
    applied = getattr(model, APPLIED_ATTR, [])
    applied.append({"option": "quant", "config": config.to_dict()})
    setattr(model, APPLIED_ATTR, applied)
    return model.eval()
