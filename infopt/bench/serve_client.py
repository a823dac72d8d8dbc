"""``infopt bench-serve --url``: the ShareGPT workload against a live OpenAI-compatible server.

Like vLLM's ``benchmark_serving``: each request is a streamed ``POST /v1/completions`` with the
prompt's token ids, greedy, ``max_tokens`` = its reference length and ``ignore_eos`` (an
extension ``infopt serve`` and vLLM accept) so every request generates the same number of
tokens as the in-process rows. Requests start at their (offline: 0, online: Poisson) arrival
times, all concurrently. Measured per request on the client: TTFT (arrival -> first streamed
text), TPOT ((last - first) / (tokens - 1)) and inter-chunk latency; output tokens come from the
final ``usage`` chunk. The server is only ever the URL given (loopback in the tests).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

from .serve import ServeRow
from .serve_metrics import RequestRecord, _stats_ms, summarize_records

__all__ = ["run_url_bench"]


async def _one(client: Any, url: str, model: str, req: Any, arrival: float, t0: float,
               headers: dict[str, str], gaps: list[float]) -> RequestRecord:
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    body = {
        "model": model, "prompt": list(req.prompt_token_ids), "max_tokens": req.output_len,
        "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    first = last = None
    n_out = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body,
                             headers=headers) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            raise RuntimeError(f"server answered {resp.status_code}: {text[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"server stream error: {chunk['error']}")
            if chunk.get("usage"):
                n_out = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                first = first if first is not None else now
                last = now
    if first is None:
        raise RuntimeError("the server streamed no text")
    return RequestRecord(len(req.prompt_token_ids), n_out, start - t0, first - t0, last - t0)


async def _run(url: str, model: str, reqs: Sequence[Any], arrivals: Sequence[float],
               api_key: str | None, timeout_s: float):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gaps: list[float] = []
    limits = httpx.Limits(max_connections=len(reqs) + 1, max_keepalive_connections=len(reqs) + 1)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(
            _one(client, url, model, r, a, t0, headers, gaps) for r, a in zip(reqs, arrivals)
        ))  # fmt: skip
        wall = time.perf_counter() - t0
    return list(records), wall, gaps


def _served_model(url: str, api_key: str | None, timeout_s: float) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout_s)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run_url_bench(url: str, reqs: Sequence[Any], arrivals: Sequence[float], *,
                  api_key: str | None = None, timeout_s: float = 600.0) -> ServeRow:
    """The ``server`` row: ``reqs`` (``SampledRequest``) against ``url`` (``http://host:port``,
    no trailing path). One short warm-up request first, untimed."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {url!r}")
    model = _served_model(url, api_key, timeout_s)
    warm = type(reqs[0])(tuple(reversed(reqs[0].prompt_token_ids)), "", 4, "warmup")
    asyncio.run(_run(url, model, [warm], [0.0], api_key, timeout_s))
    records, wall, gaps = asyncio.run(_run(url, model, reqs, arrivals, api_key, timeout_s))
    row = ServeRow("server", f"infopt serve at {url} (streamed /v1/completions)")
    row.metrics = summarize_records(records, wall)
    row.metrics["itl_ms"] = _stats_ms(gaps) if gaps else {}
    row.records = records
    return row
