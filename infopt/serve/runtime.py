"""``ModelHost``: loads the model off the event loop, owns the engine, and bridges the engine's
thread to asyncio.

The engine calls ``on_output`` on its stepping thread; the callback only appends the snapshot to
an inbox and, unless one is already pending, schedules one drain on the loop with
``loop.call_soon_threadsafe``; the drain moves snapshots to their requests' ``asyncio.Queue``.
Everything else (tokenizing, rendering, metrics) runs on the event loop. A request ends when its
finished snapshot arrives, or early on a timeout, a client disconnect or an engine failure: then
it is aborted, which frees its KV blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ..batching import Engine, RequestOutput, SamplingParams
from .config import ServeConfig
from .protocol import APIError

__all__ = ["DISCONNECTED", "ModelHost", "RequestTimeout", "load_engine"]

_log = logging.getLogger("infopt.serve")

DISCONNECTED = object()  # queued by a disconnect watcher: the client went away
_TIMEOUT = object()  # queued by the request's timer
_ENGINE_DOWN = object()  # queued for every request when the engine loop dies


class RequestTimeout(Exception):
    """The request ran past ``request_timeout``; it has been aborted."""


def load_engine(config: ServeConfig) -> Engine:
    """Load the model (plus ``quant``), build the engine and start its loop."""
    import torch

    from .. import wrap_model
    from ..models import load_model

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda given but no CUDA device is available")
    model, tokenizer = load_model(config.model, dtype=getattr(torch, config.dtype),
                                  device=config.device, progress=False)
    if config.quant is not None:
        model = wrap_model(model, quant=config.quant)
    engine = Engine(model, tokenizer, config.engine)
    engine.start()
    return engine


class ModelHost:
    """States: ``loading`` -> ``ready`` (or ``failed``) -> ``stopped``.

    ``loader`` builds a started engine from the config (tests can pass their own);
    ``on_failure`` is called (from the loading thread or the watchdog) when the model cannot be
    loaded or the engine loop dies, so the server can exit instead of answering 503 forever.
    """

    def __init__(self, config: ServeConfig, loader: Callable[[ServeConfig], Engine] | None = None):
        self.config = config
        self.state = "loading"
        self.error: str | None = None
        self.engine: Engine | None = None
        self.on_failure: Callable[[], None] | None = None
        self._loader = loader or load_engine
        self._lock = threading.Lock()
        self._active: dict[str, asyncio.Queue[Any]] = {}
        # engine thread -> loop: snapshots wait here until the loop drains them
        self._inbox: collections.deque[tuple[asyncio.Queue, RequestOutput]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._drain_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.load_seconds: float | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start_loading(self) -> None:
        """Start loading on a daemon thread and return at once (the server listens meanwhile)."""
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, name="infopt-serve-load", daemon=True).start()
        self._watchdog = self._loop.create_task(self._watch_engine())

    def _load(self) -> None:
        t0 = time.monotonic()
        try:
            engine = self._loader(self.config)
        except BaseException as e:  # reported through /health and the exit code
            _log.error("infopt serve: could not load %r: %s: %s", self.config.model,
                       type(e).__name__, e)
            self._fail(f"could not load the model: {type(e).__name__}: {e}")
            return
        with self._lock:
            if self.state != "loading":  # shut down while loading: nobody will use it
                engine.stop()
                return
            self.engine = engine
            self.state = "ready"
        self.load_seconds = time.monotonic() - t0
        _log.info("infopt serve: model %r ready in %.1f s (%d KV blocks of %d tokens)",
                  self.config.model_name, self.load_seconds, engine.stats().num_blocks,
                  engine.config.block_size)

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.state == "stopped":
                return
            self.state, self.error = "failed", message
        if self.on_failure is not None:
            self.on_failure()

    async def _watch_engine(self) -> None:
        # A dead engine loop never calls back: without this, its requests would wait for
        # their timeout.
        while True:
            await asyncio.sleep(0.5)
            engine = self.engine
            thread = getattr(engine, "_thread", None)
            if engine is None or self.state != "ready" or thread is None or thread.is_alive():
                continue
            err = getattr(engine, "_loop_error", None)
            self._fail(f"the engine loop stopped: {type(err).__name__}: {err}")
            for q in list(self._active.values()):
                q.put_nowait(_ENGINE_DOWN)
            return

    def stop(self) -> None:
        """Abort what is left and stop the engine (called once the server stopped serving)."""
        with self._lock:
            engine, self.state = self.engine, "stopped"
        if self._watchdog is not None:
            self._watchdog.cancel()
        if engine is not None:
            engine.stop(abort_unfinished=True)

    # --- model facts ----------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def require_ready(self) -> Engine:
        if self.state == "ready":
            return self.engine
        if self.state == "loading":
            raise APIError(503, "the model is still loading; retry when GET /health returns 200",
                           code="model_loading")
        if self.state == "failed":
            raise APIError(503, f"the server cannot serve: {self.error}", code="engine_failed")
        raise APIError(503, "the server is shutting down", code="shutting_down")

    def check_fits(self, prompt: Sequence[int], max_tokens: int | None, explicit: bool,
                   param: str) -> int:
        """Check a prompt against the context and the KV pool; returns the max_tokens to use
        (``None`` -> what is left of the context)."""
        engine = self.require_ready()
        n, limit = len(prompt), engine.max_model_len
        if n >= limit:
            raise APIError(400, f"the prompt is {n} tokens; this model's context is {limit} "
                           "tokens (prompt + at least one new token must fit)", param=param,
                           code="context_length_exceeded")
        bad = [t for t in prompt if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary "
                           f"[0, {engine.vocab_size})", param=param, code="invalid_value")
        bs, pool = engine.config.block_size, engine.stats().num_blocks
        windowed = getattr(engine.scheduler, "evict_window", None) is not None
        if not explicit:  # a default is capped to what fits, never refused
            room = limit if windowed else min(limit, pool * bs)
            return max(1, min(max_tokens or limit, room - n))
        if n + max_tokens > limit:
            raise APIError(400, f"this model's context is {limit} tokens; the prompt is {n} "
                           f"and max_tokens is {max_tokens} ({n + max_tokens} in all); lower "
                           "max_tokens or shorten the prompt", param="max_tokens",
                           code="context_length_exceeded")
        # A request that can never fit the pool alone would fail mid-generation instead.
        need = -(-(n + max_tokens) // bs)
        if need > pool and not windowed:
            raise APIError(400, f"prompt ({n}) + max_tokens ({max_tokens}) needs {need} KV "
                           f"blocks of {bs} tokens but the server's pool holds {pool}; lower "
                           "max_tokens", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    # --- requests -------------------------------------------------------------------------

    def submit(self, rid: str, prompt: list[int], sampling: SamplingParams) -> asyncio.Queue:
        """Queue a request in the engine; its snapshots arrive on the returned queue."""
        engine = self.require_ready()
        q: asyncio.Queue[Any] = asyncio.Queue()

        def on_output(out: RequestOutput) -> None:
            self._inbox.append((q, out))
            with self._inbox_lock:
                if self._drain_pending:  # a drain is already on its way to the loop
                    return
                self._drain_pending = True
            # RuntimeError: the loop is closed, so the server is gone and nobody is waiting.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._drain)

        try:
            engine.add_request(prompt, sampling, request_id=rid, on_output=on_output)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        self._active[rid] = q
        return q

    def _drain(self) -> None:
        # One loop wake-up hands over every snapshot published since the last one (about one
        # per engine step instead of one per request and step): each wake-up makes the loop
        # thread compete with the engine thread for the GIL.
        with self._inbox_lock:
            self._drain_pending = False
        while self._inbox:
            q, out = self._inbox.popleft()
            q.put_nowait(out)

    async def results(self, rid: str, q: asyncio.Queue, timeout: float,
                      metrics: Any) -> AsyncIterator[RequestOutput]:
        """Yield the request's snapshots until the finished one. Ends early, the request
        aborted, on disconnect (returns), timeout (raises :class:`RequestTimeout`), engine
        failure (raises a 500 ``APIError``), or when the consumer stops or is cancelled.
        ``metrics`` (a :class:`~infopt.serve.metrics.ServerMetrics`) records how it ended."""
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, q.put_nowait, _TIMEOUT)
        done, reason = False, "cancelled"
        try:
            while True:
                item = await q.get()
                if item is DISCONNECTED:
                    reason = "disconnected"
                    return
                if item is _TIMEOUT:
                    reason = "timeout"
                    raise RequestTimeout(rid)
                if item is _ENGINE_DOWN:
                    reason = "error"
                    raise APIError(500, f"the engine failed: {self.error}", code="engine_failed")
                if item.finished:
                    done = True
                    metrics.observe(item)
                yield item
                if done:
                    return
        finally:
            timer.cancel()
            self._active.pop(rid, None)
            if not done:
                metrics.ended(reason)
                if self.engine is not None:
                    self.engine.abort(rid)  # frees its KV blocks at the next step

    @property
    def num_active(self) -> int:
        return len(self._active)
