"""Engine outputs -> OpenAI response bodies and stream chunks (plain dicts, JSON-ready)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from ..batching.request import RequestOutput, TokenLogprobs

__all__ = ["Renderer", "TextStreamer", "sse", "stable_prefix"]

# OpenAI reports a log-probability it cannot represent as -9999.0; JSON has no -inf.
_FLOOR = -9999.0


def stable_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of an unfinished output that later tokens cannot change.

    Held back: trailing U+FFFD (bytes of an incomplete UTF-8 character, which the next token
    may complete) and a suffix that could be the start of a stop string (the engine cuts the
    final text before a matched stop string, so streaming it early would send text the
    finished answer does not have).
    """
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text.endswith(s[:k], 0, end):
                hold = k
                break
    return text[: end - hold]


class TextStreamer:
    """Turns successive full-text snapshots of one request into deltas whose concatenation is
    the finished text."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.sent = 0

    def delta(self, text: str, finished: bool) -> str:
        safe = text if finished else stable_prefix(text, self.stops)
        if len(safe) <= self.sent:
            return ""
        out, self.sent = safe[self.sent :], len(safe)
        return out


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'), allow_nan=False)}\n\n"


def _lp(v: float) -> float:
    return v if math.isfinite(v) else _FLOOR


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Renderer:
    """Builds the bodies for one served model; ``tokenizer`` names the tokens of logprobs."""

    def __init__(self, tokenizer: Any, model_name: str):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._token_text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            # Each token on its own, as OpenAI shows them (a byte-level piece of a multi-byte
            # character decodes to U+FFFD; its "bytes" field then carries the replacement).
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 1 << 16:
                self._token_text[token_id] = s
        return s

    # --- logprobs -------------------------------------------------------------------------

    def chat_logprobs(self, lps: Sequence[TokenLogprobs]) -> dict[str, Any]:
        def entry(tid: int, lp: float) -> dict[str, Any]:
            s = self.token_text(tid)
            return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

        return {"content": [
            {**entry(t.token_id, t.logprob),
             "top_logprobs": [entry(i, lp) for i, lp in t.top]}
            for t in lps
        ]}  # fmt: skip

    def completion_logprobs(self, lps: Sequence[TokenLogprobs], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for t in lps:
            s = self.token_text(t.token_id)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [_lp(t.logprob) for t in lps],
            "top_logprobs": [{self.token_text(i): _lp(lp) for i, lp in t.top} for t in lps],
            "text_offset": offsets,
        }

    # --- whole responses ------------------------------------------------------------------

    def chat(self, rid: str, created: int, out: RequestOutput, logprobs: bool) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": self.chat_logprobs(out.logprobs or ()) if logprobs else None,
            "finish_reason": out.finish_reason,
        }
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": self.model_name, "choices": [choice],
                "usage": usage(len(out.prompt_token_ids), len(out.token_ids)),
                "system_fingerprint": None}

    def completion(self, rid: str, created: int, out: RequestOutput,
                   logprobs: bool) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": out.text,
            "logprobs": self.completion_logprobs(out.logprobs or (), 0) if logprobs else None,
            "finish_reason": out.finish_reason,
        }
        return {"id": rid, "object": "text_completion", "created": created,
                "model": self.model_name, "choices": [choice],
                "usage": usage(len(out.prompt_token_ids), len(out.token_ids)),
                "system_fingerprint": None}

    # --- stream chunks --------------------------------------------------------------------

    def chat_chunk(self, rid: str, created: int, delta: dict[str, Any],
                   finish_reason: str | None = None, logprobs: dict[str, Any] | None = None,
                   with_usage: bool = False) -> dict[str, Any]:
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created,
                 "model": self.model_name, "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                              "finish_reason": finish_reason}]}
        if with_usage:  # OpenAI sends "usage": null on every chunk but the last
            chunk["usage"] = None
        return chunk

    def completion_chunk(self, rid: str, created: int, text: str,
                         finish_reason: str | None = None,
                         logprobs: dict[str, Any] | None = None,
                         with_usage: bool = False) -> dict[str, Any]:
        chunk = {"id": rid, "object": "text_completion", "created": created,
                 "model": self.model_name, "system_fingerprint": None,
                 "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                              "finish_reason": finish_reason}]}
        if with_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, rid: str, created: int, obj: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
        return {"id": rid, "object": obj, "created": created, "model": self.model_name,
                "system_fingerprint": None, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}
