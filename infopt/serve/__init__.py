"""``infopt serve``: an OpenAI-compatible HTTP server on the batching engine.

    $ infopt serve --model smollm2-135m --port 8000
    >>> from openai import OpenAI
    >>> client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    >>> client.chat.completions.create(model="smollm2-135m", messages=[...])

FastAPI + uvicorn in front of :class:`~infopt.batching.Engine`: the engine steps on its own
thread and the HTTP layer only queues requests and streams results. See ``docs/serve.md``.

Importing this package is cheap; FastAPI, uvicorn and prometheus_client (the ``serve`` extra)
load with :func:`create_app` / :func:`serve`.
"""

from __future__ import annotations

from typing import Any

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(f"module 'infopt.serve' has no attribute {name!r}")
