"""``create_app``: the FastAPI app of ``infopt serve`` (OpenAI-compatible routes).

Bodies are read and parsed here rather than by FastAPI so that every failure (size, JSON,
schema) gets OpenAI's error shape and status. Check order: API key (401) -> body size (413)
-> JSON and schema (400) -> model name (404) -> model loaded (503) -> prompt fits (400).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from .config import ServeConfig
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from .render import Renderer, TextStreamer, sse
from .runtime import DISCONNECTED, ModelHost, RequestTimeout

__all__ = ["create_app"]

_log = logging.getLogger("infopt.serve")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_DONE = "data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(config: ServeConfig, *, loader: Any = None) -> FastAPI:
    """The app for ``config``. The model loads on a background thread when the app starts
    (``/health`` answers 503 until it is ready); ``loader(config) -> started Engine`` replaces
    :func:`~infopt.serve.runtime.load_engine`."""
    host = ModelHost(config, loader)
    metrics = ServerMetrics(host)
    started = int(time.time())
    renderers: dict[int, Renderer] = {}

    def renderer() -> Renderer:
        r = renderers.get(id(host.engine))
        if r is None:
            r = renderers[id(host.engine)] = Renderer(host.tokenizer, config.model_name)
        return r

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        host.start_loading()
        try:
            yield
        finally:
            # Runs after uvicorn stopped serving: in-flight requests have finished or been
            # cancelled (and so aborted); this stops the engine loop.
            await asyncio.to_thread(host.stop)

    app = FastAPI(title="infopt serve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.host = host
    app.state.metrics = metrics

    # --- errors -----------------------------------------------------------------------------

    def error_response(err: APIError) -> JSONResponse:
        metrics.rejected.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        code = "not_found" if exc.status_code == 404 else None
        return error_response(APIError(exc.status_code, msg, code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("infopt serve: unexpected error in %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    # --- request plumbing -----------------------------------------------------------------

    api_key = config.api_key.encode() if config.api_key is not None else None

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key):
            raise APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict[str, Any]:
        limit = config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, f"bad Content-Length header {declared!r}")
            if int(declared) > limit:
                raise APIError(413, f"the request body is {declared} bytes; the limit is {limit} "
                               "(--max-request-bytes)", code="request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # chunked bodies have no Content-Length to check up front
                    raise APIError(413, f"the request body exceeds the limit of {limit} bytes "
                                   "(--max-request-bytes)", code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the body") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise APIError(400, f"the request body is not valid JSON: {e}",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got "
                           f"{type(body).__name__}", code="invalid_json")
        return body

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{config.model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    async def watch_disconnect(request: Request, q: asyncio.Queue) -> None:
        # The body is read, so the next ASGI message is the disconnect (if it ever comes).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        q.put_nowait(DISCONNECTED)

    def timeout_error() -> APIError:
        return APIError(504, f"the request did not finish within {config.request_timeout:g} s "
                        "(--request-timeout) and was aborted", code="request_timeout")

    def ended_error(out: Any) -> APIError | None:
        if out.finish_reason == "error":
            return APIError(500, f"the request failed in the engine: {out.error}",
                            code="request_failed")
        if out.finish_reason == "abort":
            return APIError(503, "the request was aborted: the server is shutting down",
                            code="shutting_down")
        return None

    # --- generation -----------------------------------------------------------------------

    async def generate(request: Request, req: Any, prompt: list[int], chat: bool,
                       param: str) -> Response:
        default = None if chat else DEFAULT_COMPLETION_MAX_TOKENS
        asked = req.requested_max_tokens
        max_tokens = host.check_fits(prompt, asked or default, asked is not None, param)
        try:
            sampling = req.sampling(max_tokens, req.engine_logprobs)
        except ValueError as e:  # the engine's own checks, after the schema's
            raise APIError(400, str(e), code="invalid_value") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        want_lp = req.engine_logprobs is not None
        if req.stream:
            events = stream(rid, created, prompt, sampling, chat, want_lp, req.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers=_SSE_HEADERS)
        q = host.submit(rid, prompt, sampling)
        watcher = asyncio.create_task(watch_disconnect(request, q))
        last = None
        try:
            async with aclosing(host.results(rid, q, config.request_timeout, metrics)) as outs:
                async for out in outs:
                    last = out
        except RequestTimeout:
            raise timeout_error() from None
        finally:
            watcher.cancel()
        if last is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        err = ended_error(last)
        if err is not None:
            raise err
        r = renderer()
        body = r.chat(rid, created, last, want_lp) if chat else r.completion(rid, created, last,
                                                                               want_lp)
        return JSONResponse(body)

    async def stream(rid: str, created: int, prompt: list[int], sampling: Any, chat: bool,
                     want_lp: bool, include_usage: bool) -> AsyncIterator[str]:
        # The request is added here, not in the handler: a client that leaves before the
        # stream starts then never leaves an orphan request in the engine.
        r = renderer()
        obj = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            yield sse(r.chat_chunk(rid, created, {"role": "assistant", "content": ""},
                                   with_usage=include_usage))
        # No await or yield between submit and results(): a cancellation (the client left)
        # always lands inside results(), which aborts the request.
        try:
            q = host.submit(rid, prompt, sampling)
        except APIError as e:
            yield sse(e.body())
            yield _DONE
            return
        streamer = TextStreamer(sampling.stop)
        n_lp, offset, last = 0, 0, None
        try:
            async with aclosing(host.results(rid, q, config.request_timeout, metrics)) as outs:
                async for out in outs:
                    last = out
                    err = ended_error(out)
                    if err is not None:
                        raise err
                    text = streamer.delta(out.text, out.finished)
                    lps = None
                    if want_lp and out.logprobs is not None:
                        new, n_lp = out.logprobs[n_lp:], len(out.logprobs)
                        if chat:
                            lps = r.chat_logprobs(new)
                        else:
                            lps = r.completion_logprobs(new, offset)
                            offset += sum(len(t) for t in lps["tokens"])
                        lps = lps if new else None
                    finish = out.finish_reason if out.finished else None
                    if not (text or lps or finish):
                        continue
                    if chat:
                        delta = {"content": text} if text or not finish else {}
                        yield sse(r.chat_chunk(rid, created, delta, finish, lps, include_usage))
                    else:
                        yield sse(r.completion_chunk(rid, created, text, finish, lps,
                                                     include_usage))
        except RequestTimeout:
            yield sse(timeout_error().body())
        except APIError as e:
            yield sse(e.body())
        else:
            if include_usage and last is not None:
                yield sse(r.usage_chunk(rid, created, obj, len(prompt), len(last.token_ids)))
        yield _DONE

    # --- routes ---------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if host.state == "ready":
            return JSONResponse({"status": "ok"})
        body = {"status": host.state}
        if host.error:
            body["error"] = host.error
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        card = {"id": config.model_name, "object": "model", "created": started,
                "owned_by": "infopt", "root": config.model}
        if host.engine is not None:
            card["max_model_len"] = host.max_model_len
        return card

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> JSONResponse:
        authorize(request)
        check_model(name)
        return JSONResponse(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse_request(ChatCompletionRequest, await read_json(request))
        check_model(req.model)
        host.require_ready()
        return await generate(request, req, chat_prompt(req), chat=True, param="messages")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse_request(CompletionRequest, await read_json(request))
        check_model(req.model)
        host.require_ready()
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            prompt = list(host.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return await generate(request, req, prompt, chat=False, param="prompt")

    def chat_prompt(req: ChatCompletionRequest) -> list[int]:
        tok = host.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions with a "
                           "plain prompt", param="messages", code="no_chat_template")
        # "developer" is OpenAI's newer name for "system"; chat templates know "system".
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content} for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises from inside the template (e.g. role order)
            raise APIError(400, f"the model's chat template rejected the messages: {e}",
                           param="messages", code="invalid_value") from None
        # The template already holds the special tokens (BOS and the like).
        return list(tok(text, add_special_tokens=False)["input_ids"])

    return app
