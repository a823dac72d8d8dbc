"""Cache layout, inter-process locking and the manifest that marks a converted model as complete.

Layout under the cache root (``cache_dir`` argument, else ``$INFOPT_CACHE``, else
``~/.cache/infopt``)::

    models/<name>/              finished HF directory (config.json, model.safetensors, ...)
    models/.tmp-<name>-<id>/    a conversion in progress (renamed into place atomically)
    downloads/<name>/           wheels and the assembled GGUF; removed once models/<name> is built
    locks/<name>.lock           flock'ed while a process fetches or converts <name>

``models/<name>/infopt_model.json`` is written last, so a directory without it is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "check_model_dir",
    "file_lock",
    "infopt_version",
    "make_temp_dir",
    "model_dir",
    "progress_bar",
    "read_manifest",
    "remove_stale_temps",
    "resolve_cache_dir",
    "sha256_file",
]

MANIFEST_NAME = "infopt_model.json"
WEIGHTS_NAME = "model.safetensors"
# Bump when the conversion output changes, so caches written by older code are rebuilt.
MANIFEST_FORMAT = 1
TEMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$INFOPT_CACHE``, else ``~/.cache/infopt``."""
    if cache_dir is None:
        cache_dir = os.environ.get("INFOPT_CACHE") or Path.home() / ".cache" / "infopt"
    return Path(cache_dir).expanduser().resolve()


def progress_bar(progress: bool, **kwargs: Any) -> Any:
    """A tqdm bar on stderr, or a disabled one when ``progress`` is False.

    ``disable`` is only passed to switch bars off: passing ``disable=False`` would override
    the user's ``TQDM_DISABLE=1``.
    """
    from tqdm.auto import tqdm

    if not progress:
        kwargs["disable"] = True
    return tqdm(file=sys.stderr, **kwargs)


def model_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the HF directory of embedded model ``name`` lives (whether or not it exists yet)."""
    return resolve_cache_dir(cache_dir) / "models" / name


def infopt_version() -> str:
    """The installed infopt version, or the source tree's, or ``"unknown"``."""
    from importlib import metadata

    try:
        return metadata.version("infopt")
    except metadata.PackageNotFoundError:
        pass
    try:
        from infopt import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except ImportError:
        return "unknown"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks so memory stays flat for multi-GB weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The parsed manifest of a model directory, or None when absent or unreadable."""
    try:
        with open(directory / MANIFEST_NAME, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_model_dir(
    directory: Path, name: str, gguf_sha256: str, *, full: bool = False
) -> str | None:
    """Why ``directory`` is not a usable conversion of ``name``, or None when it is.

    The cheap check (every load) looks at the manifest and the weight file's size; ``full``
    also re-hashes the weights, which costs a read of the whole file (GBs for the big models).
    """
    manifest = read_manifest(directory)
    if manifest is None:
        return f"no readable {MANIFEST_NAME} in {directory}"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"manifest format {manifest.get('format')!r} != {MANIFEST_FORMAT} (older infopt)"
    if manifest.get("name") != name:
        return f"manifest is for {manifest.get('name')!r}, not {name!r}"
    if manifest.get("gguf_sha256") != gguf_sha256:
        return "built from a different GGUF than the registry now pins"
    for required in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if not (directory / required).is_file():
            return f"{required} is missing"
    weights = directory / WEIGHTS_NAME
    try:
        size = weights.stat().st_size
    except OSError:
        return f"{WEIGHTS_NAME} is missing"
    if size != manifest.get("weights_size"):
        return f"{WEIGHTS_NAME} is {size} bytes, manifest says {manifest.get('weights_size')}"
    if full:
        actual = sha256_file(weights)
        if actual != manifest.get("weights_sha256"):
            return (f"{WEIGHTS_NAME} sha256 is {actual}, manifest says "
                    f"{manifest.get('weights_sha256')}")
    return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the ``with`` body.

    The lock is released by the kernel if the process dies, so a killed conversion never
    wedges the cache. Waiting is announced on stderr because a 1.5B conversion takes minutes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if fcntl is None:  # pragma: no cover
            yield
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"infopt: waiting for another process holding {path} ...", file=sys.stderr)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def make_temp_dir(parent: Path, label: str) -> Path:
    """A fresh ``parent/.tmp-<label>-<id>`` directory on the cache's filesystem.

    ``os.mkdir`` (unlike ``tempfile.mkdtemp``'s 0700) honours the umask, so a cache shared
    between users stays readable after the directory is renamed into place.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{TEMP_PREFIX}{label}-{uuid.uuid4().hex[:12]}"
    os.mkdir(path)
    return path


def remove_stale_temps(parent: Path, label: str) -> None:
    """Delete ``.tmp-<label>-*`` leftovers of a process that was killed mid-build.

    Only call this while holding the model's lock: then no live process owns them.
    """
    if not parent.is_dir():
        return
    for entry in parent.glob(f"{TEMP_PREFIX}{label}-*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
