"""A disk cache of calibration results: re-wrapping a model with the same calibrated config
(AWQ, GPTQ, SmoothQuant) on the same calibration data loads the result instead of
calibrating again (minutes to half an hour on a CPU; a load takes about a second).

**Key.** sha256 over

* the model: its class, its HF config (without paths and the transformers version), the
  device type, and every parameter and buffer (name, dtype, shape and bytes; tied tensors
  once);
* the quant config's ``to_dict()``;
* the calibration token ids (dtype, shape, bytes), whatever produced them;
* the calibration code: the cache format, infopt's and torch's versions and a digest of the
  source of ``infopt/quant`` and ``infopt/ops`` (so an edited algorithm never reuses an old
  result).

**Value.** What calibration left in the model's repeated blocks: each calibrated linear's
module spec and buffers (the final quantized tensors: codes, scales, zero points, bias,
``in_scale``) and every other block tensor calibration replaced (norm weights that absorbed
AWQ / SmoothQuant scales). That is about the size of the blocks' quantized checkpoint
(SmolLM2-135M int4: about 57 MB) and makes a re-wrap a file read. Statistics alone (GPTQ
Hessians, about 400 MB for SmolLM2) would be larger and still leave the quantization to redo.

**Layout.** ``<cache root>/calibration/<key>.safetensors`` plus ``<key>.json``, a sidecar
written last that records the key's fields and the safetensors file's sha256. An entry whose
sidecar is missing, unreadable or disagrees with the key, whose file's hash differs, or whose
tensors do not fit the model is ignored with a message on the ``infopt.quant.calib_cache``
logger and calibration runs again (and rewrites it). Deleting the directory is always safe.

**Switch.** On by default; ``INFOPT_CALIB_CACHE=0`` turns it off, and
``quantize_model(..., calib_cache=False / True)`` decides per call.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..models.disk_cache import infopt_version, resolve_cache_dir, sha256_file
from .config import QuantConfig
from .qlinear import QuantizedLinear
from .structure import set_tensor

__all__ = ["CACHE_FORMAT", "CalibrationEntry", "calib_cache_dir", "calib_cache_enabled"]

#: Bump when what an entry stores, or how it is keyed, changes.
CACHE_FORMAT = 1
_SUBDIR = "calibration"
_OFF = ("0", "false", "no", "off")
# HF config fields that name where the model came from, not what it computes.
_CONFIG_SKIP = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")
_log = logging.getLogger(__name__)


def calib_cache_enabled(flag: bool | None = None) -> bool:
    """``flag`` if given, else ``INFOPT_CALIB_CACHE`` (``0``/``false``/``no``/``off`` = off),
    else on."""
    if flag is not None:
        if not isinstance(flag, bool):
            raise TypeError(f"calib_cache must be True, False or None, got {flag!r}")
        return flag
    return os.environ.get("INFOPT_CALIB_CACHE", "").strip().lower() not in _OFF


def calib_cache_dir() -> Path:
    """Where entries live: ``<cache root>/calibration`` (``INFOPT_CACHE`` moves the root)."""
    return resolve_cache_dir() / _SUBDIR


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().data).hexdigest()


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by dotted name; tied tensors once."""
    out: dict[str, torch.Tensor] = {}
    out.update(model.named_parameters())
    out.update(model.named_buffers())
    return out


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """sha256 of the calibration code's source (``infopt/quant`` and ``infopt/ops``)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in ("quant", "ops"):
        for path in sorted((root / sub).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _hf_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    to_dict = getattr(cfg, "to_dict", None)
    if not callable(to_dict):
        return None
    return {k: v for k, v in to_dict().items() if k not in _CONFIG_SKIP}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


@dataclass
class CalibrationEntry:
    """The cache entry of one (model, config, calibration data): built before calibration by
    :meth:`for_model`, then either :meth:`apply`'d (a hit) or :meth:`store`'d after
    calibrating (a miss)."""

    key: str
    fields: dict[str, Any]
    digests: dict[str, str]
    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / f"{self.key}.safetensors"

    @property
    def sidecar(self) -> Path:
        return self.directory / f"{self.key}.json"

    @classmethod
    def for_model(
        cls, model: nn.Module, config: QuantConfig, input_ids: torch.Tensor
    ) -> CalibrationEntry | None:
        """The entry for ``model`` (unmodified), ``config`` and ``input_ids``; None if the
        model cannot be keyed (tensors on the meta device)."""
        tensors = _model_tensors(model)
        if any(t.is_meta for t in tensors.values()):
            _log.debug("calibration cache: the model has meta tensors; not cached")
            return None
        digests = {n: _tensor_digest(t) for n, t in tensors.items()}
        h = hashlib.sha256()
        for n, t in tensors.items():
            h.update(f"{n}|{t.dtype}|{tuple(t.shape)}|{digests[n]}\n".encode())
        device = next(iter(tensors.values())).device.type if tensors else "cpu"
        ids = input_ids.detach().to("cpu", torch.long).contiguous()
        fields = {
            "cache_format": CACHE_FORMAT,
            "model_class": type(model).__name__,
            "model_config_sha256": hashlib.sha256(_dumps(_hf_config(model)).encode()).hexdigest(),
            "model_weights_sha256": h.hexdigest(),
            "device": device,
            "quant_config": config.to_dict(),
            "calib_ids_shape": list(ids.shape),
            "calib_ids_sha256": _tensor_digest(ids),
            "infopt_version": infopt_version(),
            "torch_version": torch.__version__,
            "code_sha256": _code_digest(),
        }
        key = hashlib.sha256(_dumps(fields).encode()).hexdigest()
        return cls(key, fields, digests, calib_cache_dir())

    # -- hit -------------------------------------------------------------------------------

    def apply(self, model: nn.Module, targets: list[str]) -> list[str] | None:
        """Put the cached calibration result into ``model``; returns the targets calibration
        left for the caller (outside the blocks), or None (nothing changed) on a miss or an
        unusable entry."""
        if not self.sidecar.exists():
            _log.debug("calibration cache miss: %s", self.key)
            return None
        try:
            plan = self._read(model, targets)
        except Exception as e:  # noqa: BLE001 - any unusable entry is recomputed, not fatal
            _log.warning(
                "ignoring calibration cache entry %s (%s: %s); calibrating again",
                self.path, type(e).__name__, e,
            )
            return None
        modules, floats, rest, seconds = plan
        named = dict(model.named_modules())
        for name, t in floats.items():
            owner, _, leaf = name.rpartition(".")
            mod = named[owner] if owner else model
            old = getattr(mod, leaf)
            set_tensor(mod, leaf, t.to(old.device))
        for name, new in modules.items():
            model.set_submodule(name, new)
        _log.info(
            "calibration loaded from the cache (%s, %d linears; calibrating took %.1f s)",
            self.path, len(modules), seconds,
        )
        return rest

    def _read(self, model: nn.Module, targets: list[str]) -> tuple[
        dict[str, nn.Module], dict[str, torch.Tensor], list[str], float
    ]:
        """Everything :meth:`apply` needs, checked against ``model`` before any change;
        raises on anything that does not fit."""
        side = json.loads(self.sidecar.read_text(encoding="utf-8"))
        if not isinstance(side, dict):
            raise ValueError("sidecar is not a JSON object")
        for k, v in self.fields.items():
            if _dumps(side.get(k)) != _dumps(v):
                raise ValueError(f"sidecar field {k!r} does not match this model / config / data")
        if side.get("key") != self.key:
            raise ValueError("sidecar key does not match its file name")
        if sha256_file(self.path) != side.get("file_sha256"):
            raise ValueError("safetensors file does not match the sha256 in the sidecar")
        specs, changed, rest = side.get("modules"), side.get("changed"), side.get("rest")
        if not (isinstance(specs, dict) and isinstance(changed, list) and isinstance(rest, list)):
            raise ValueError("sidecar lacks 'modules' / 'changed' / 'rest'")
        if set(specs) & set(rest) or set(specs) | set(rest) != set(targets):
            raise ValueError("its calibrated linears are not this config's targets")
        state = load_file(str(self.path), device="cpu")
        named = dict(model.named_modules())
        tensors = _model_tensors(model)
        used: set[str] = set()
        modules: dict[str, nn.Module] = {}
        for name, spec in specs.items():
            old = named.get(name)
            if not isinstance(old, nn.Linear):
                raise ValueError(f"{name!r} is not an nn.Linear of the model")
            new = QuantizedLinear.from_spec(spec)  # every field checked (ValueError)
            if (new.in_features, new.out_features) != (old.in_features, old.out_features):
                raise ValueError(f"{name!r}: shape differs from the model's linear")
            own = {}
            for leaf, want in new.state_dict().items():
                full = f"{name}.{leaf}"
                got = state.get(full)
                if got is None or got.shape != want.shape or got.dtype != want.dtype:
                    raise ValueError(f"tensor {full!r} is missing or has the wrong shape / dtype")
                own[leaf] = got
                used.add(full)
            new.load_state_dict(own, strict=True)
            modules[name] = new.to(old.weight.device)
        floats: dict[str, torch.Tensor] = {}
        for name in changed:
            want, got = tensors.get(name), state.get(name)
            if want is None or got is None or got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(f"tensor {name!r} is missing or does not fit the model")
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise ValueError(f"tensor {name!r} holds NaN / inf")
            floats[name] = got
            used.add(name)
        if set(state) - used:
            raise ValueError(f"unexpected tensors {sorted(set(state) - used)[:4]}")
        for name, mod in modules.items():
            for leaf, t in mod.state_dict().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"tensor {name}.{leaf!s} holds NaN / inf")
        seconds = side.get("calibration_seconds", 0.0)
        return modules, floats, rest, float(seconds) if isinstance(seconds, (int, float)) else 0.0

    # -- miss ------------------------------------------------------------------------------

    def store(self, model: nn.Module, targets: list[str], rest: list[str], seconds: float) -> None:
        """Write what calibration produced (``model`` after calibrating ``targets``, leaving
        ``rest``). A failure to write is logged, never raised: the model is already done."""
        try:
            self._write(model, targets, rest, seconds)
        except (OSError, ValueError, RuntimeError) as e:
            _log.warning("could not write the calibration cache entry %s: %s", self.path, e)

    def _write(self, model: nn.Module, targets: list[str], rest: list[str], seconds: float) -> None:
        named = dict(model.named_modules())
        rest_set = set(rest)
        specs: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name in targets:
            if name in rest_set:
                continue
            mod = named.get(name)
            if not isinstance(mod, QuantizedLinear):
                raise ValueError(f"{name!r} was not quantized by calibration")
            specs[name] = mod.spec()
            for leaf, t in mod.state_dict().items():
                tensors[f"{name}.{leaf}"] = t.detach().to("cpu").clone()
        inside = tuple(f"{n}." for n in specs)
        changed = []
        for name, t in _model_tensors(model).items():
            if name.startswith(inside):
                continue
            if self.digests.get(name) != _tensor_digest(t):
                changed.append(name)
                tensors[name] = t.detach().to("cpu").clone()
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-{self.key}-{uuid.uuid4().hex[:8]}"
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        side = dict(self.fields)
        side.update(
            key=self.key, modules=specs, changed=changed, rest=list(rest),
            file_sha256=sha256_file(self.path), file_bytes=self.path.stat().st_size,
            calibration_seconds=round(seconds, 2), created=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        tmp_side = self.directory / f".tmp-{self.key}-{uuid.uuid4().hex[:8]}.json"
        try:
            tmp_side.write_text(json.dumps(side, indent=1, default=str), encoding="utf-8")
            os.replace(tmp_side, self.sidecar)
        finally:
            tmp_side.unlink(missing_ok=True)
        _log.info(
            "calibration stored in the cache (%s, %.1f MB)", self.path, side["file_bytes"] / 1e6
        )
