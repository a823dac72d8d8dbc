"""``ServeConfig``: everything ``infopt serve`` needs, validated on construction.

Kept free of FastAPI/uvicorn imports so the command line can build and check it cheaply.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from ..batching.params import KV_CACHE_DTYPES, EngineConfig

__all__ = ["DTYPES", "ServeConfig"]

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _positive_number(name: str, v: Any) -> None:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok:
        raise ValueError(f"ServeConfig.{name} must be a finite number of seconds > 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of one server.

    Attributes:
        model: registry name, local HF directory or hub id (see ``infopt.load_model``).
        served_model_name: the name clients put in ``model``; defaults to ``model``.
        quant: a ``wrap_model(quant=...)`` alias applied before the engine is built, or None.
        dtype: weights' dtype (``float32``, ``bfloat16``, ``float16``).
        device: ``cpu`` or ``cuda``.
        host, port: where to listen; 127.0.0.1 unless told otherwise. Port 0 picks a free one.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        engine: the batching engine's :class:`~infopt.batching.EngineConfig`.
        request_timeout: seconds a request may take (queueing included) before it is aborted.
        max_request_bytes: largest request body accepted (413 beyond).
        shutdown_timeout: seconds in-flight requests get to finish on shutdown before they are
            aborted.
        threads: torch intra-op threads (None: torch's default).
        log_level: uvicorn's log level.
    """

    model: str
    served_model_name: str | None = None
    quant: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    request_timeout: float = 600.0
    max_request_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    threads: int | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        o = "ServeConfig"
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"{o}.model must be a non-empty model name or path, got "
                             f"{self.model!r}")
        name = self.served_model_name
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{o}.served_model_name must be a non-empty string, got {name!r}")
        if self.quant is not None and (not isinstance(self.quant, str) or not self.quant):
            raise ValueError(f"{o}.quant must be a quant alias string or None, got "
                             f"{self.quant!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{o}.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"{o}.device must be one of {DEVICES}, got {self.device!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"{o}.host must be a host name or address, got {self.host!r}")
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            raise ValueError(f"{o}.port must be an integer in [0, 65535] (0: any free port), "
                             f"got {self.port!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError(f"{o}.api_key must be a non-empty string or None")
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"{o}.engine must be an EngineConfig, got "
                             f"{type(self.engine).__name__}")
        _positive_number("request_timeout", self.request_timeout)
        _positive_number("shutdown_timeout", self.shutdown_timeout)
        if not _is_int(self.max_request_bytes) or self.max_request_bytes < 1024:
            raise ValueError(f"{o}.max_request_bytes must be an integer >= 1024, got "
                             f"{self.max_request_bytes!r}")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise ValueError(f"{o}.threads must be an integer >= 1 or None, got "
                             f"{self.threads!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"{o}.log_level must be one of {LOG_LEVELS}, got "
                             f"{self.log_level!r}")

    @property
    def model_name(self) -> str:
        """The name ``/v1/models`` lists and requests must use."""
        return self.served_model_name or self.model


# Re-exported for the command line's choices.
KV_DTYPES = KV_CACHE_DTYPES
