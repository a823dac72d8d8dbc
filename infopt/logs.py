"""What infopt prints, and the switches for it.

* Notices about what the library does (a cached model being rebuilt, waiting for another
  process's lock, a kernel backend falling back, an emulated fp8 GEMM, a calibration result
  loaded from the cache) go to loggers named after their module, children of ``infopt``
  (``logging.getLogger("infopt")``), so applications route or silence them like any other
  library's: ``logging.getLogger("infopt").setLevel(logging.ERROR)``. Notices that would
  repeat on every call (a backend fallback, fp8 emulation) are logged once, at ``WARNING``
  (shown on stderr even when the application configured no logging).
* Only deprecations (an old alias spelling) are ``warnings.warn(DeprecationWarning)``, so
  ``-W error`` and ``pytest.warns`` see them.
* Progress bars (model fetch/convert, calibration) are tqdm bars on stderr. Each entry point
  takes ``progress=``; when it is not given, :func:`set_progress` decides, else the
  environment variable ``INFOPT_PROGRESS=0`` switches them off (tqdm's own ``TQDM_DISABLE=1``
  is honoured too).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

__all__ = ["get_logger", "progress_bar", "progress_enabled", "set_progress"]

_PROGRESS: bool | None = None
_OFF = ("0", "false", "no", "off")


def get_logger(name: str = "infopt") -> logging.Logger:
    """The ``infopt`` logger or one of its children (``name`` must start with ``infopt``)."""
    if name != "infopt" and not name.startswith("infopt."):
        raise ValueError(f"logger name must be 'infopt' or 'infopt.<sub>', got {name!r}")
    return logging.getLogger(name)


def set_progress(enabled: bool | None) -> None:
    """Switch infopt's progress bars on (``True``) or off (``False``) for every call that is
    not given ``progress=`` explicitly; ``None`` goes back to the default (the
    ``INFOPT_PROGRESS`` environment variable, else on)."""
    global _PROGRESS
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_progress takes True, False or None, got {enabled!r}")
    _PROGRESS = enabled


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show a bar: ``progress`` if given, else :func:`set_progress`'s switch, else
    ``INFOPT_PROGRESS`` (``0``/``false``/``no``/``off`` = off), else on."""
    if progress is not None:
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True, False or None, got {progress!r}")
        return progress
    if _PROGRESS is not None:
        return _PROGRESS
    return os.environ.get("INFOPT_PROGRESS", "").strip().lower() not in _OFF


def progress_bar(progress: bool | None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr, or a disabled one when :func:`progress_enabled` says off.

    ``disable`` is only passed to switch bars off: passing ``disable=False`` would override
    the user's ``TQDM_DISABLE=1``.
    """
    from tqdm.auto import tqdm

    if not progress_enabled(progress):
        kwargs["disable"] = True
    return tqdm(file=sys.stderr, **kwargs)
