"""Calibration token ids for AWQ / GPTQ / SmoothQuant.

The default calibration data is ``"mix"``: a deterministic mix of what users send, in equal
parts chat, code and prose:

* chat: ShareGPT V3 conversations (records 8000 on, English, every turn) rendered through the
  tokenizer's chat template;
* code: Python standard-library files (:data:`CALIB_CODE_FILES`);
* prose: the second half of the Lee news corpus (articles 150-299) and CPython's pydoc
  documentation prose.

Every source is disjoint from infopt's evaluation texts (:mod:`infopt.eval.texts`) by
construction: other ShareGPT records, other files, other articles, and any piece (an article,
a paragraph, a conversation, a top-level block of code) that shares a 64-character window
with an evaluation text is dropped. Windows are sampled with a seeded ``torch.Generator``,
``seq_len`` tokens each, source by source in a fixed cycle (chat, code, news, chat, code,
docs): the same tokenizer, sizes and seed always give the same ids.

Own data: ``quantize_model(..., calib_data=...)`` takes a text, a list of texts, a file path
or token ids (see :func:`calibration_ids_from`), or ``calib_input_ids=[n, seq_len]`` windows.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CALIB_CODE_FILES",
    "CALIB_SOURCES",
    "MIX_CYCLE",
    "calibration_ids",
    "calibration_ids_from",
    "calibration_sources",
    "calibration_text",
    "resolve_tokenizer",
]

#: standard-library files of the code part of the mix (disjoint from EVAL_CODE_FILES).
CALIB_CODE_FILES = ("argparse.py", "dataclasses.py", "functools.py", "pprint.py", "csv.py",
                    "configparser.py", "statistics.py", "tokenize.py", "queue.py",
                    "contextlib.py", "string.py", "glob.py")
#: ShareGPT records (file order) the chat part draws from, and how much message text.
CALIB_CHAT_START = 8000
CALIB_CHAT_CHARS = 400_000
#: the sources a window of ``"mix"`` is cut from, in turn.
MIX_CYCLE = ("chat", "code", "news", "chat", "code", "docs")
#: every name ``calib_text`` accepts.
CALIB_SOURCES = ("mix", "chat", "code", "news", "docs", "lee", "pydoc")


def _pydoc_text_fallback() -> list[str]:
    # Used only if infopt.eval is unavailable: same idea (prose paragraphs of pydoc topics).
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            if block.strip() and not block[0].isspace() and len(block.split()) >= 8:
                paras.append(" ".join(block.split()))
    return paras


def _disjoint(pieces: Sequence[str]) -> list[str]:
    """``pieces`` without those sharing a 64-character window with an evaluation text."""
    from ..eval.texts import eval_window_hashes, shares_window

    hashes = eval_window_hashes()
    return [p for p in pieces if not shares_window(p, hashes)]


def _code_pieces() -> list[str]:
    from ..eval.texts import code_text

    # Top-level blocks (PEP 8 separates them by two blank lines) are the unit dropped.
    return [b for b in code_text(CALIB_CODE_FILES).split("\n\n\n") if b.strip()]


@functools.lru_cache(maxsize=8)
def _documents(source: str) -> tuple[Any, ...]:
    """The pieces of ``source``, already disjoint from the evaluation texts. Chat pieces are
    conversations (tuples of (role, text)), the others strings."""
    if source == "chat":
        from ..eval.texts import chat_conversations

        convs = chat_conversations(CALIB_CHAT_START, None, CALIB_CHAT_CHARS)
        from ..eval.texts import eval_window_hashes, shares_window

        hashes = eval_window_hashes()
        return tuple(c for c in convs if not any(shares_window(t, hashes) for _, t in c))
    if source == "code":
        return tuple(_disjoint(_code_pieces()))
    if source in ("news", "lee"):
        from ..eval.texts import lee_articles

        arts = lee_articles()
        return tuple(_disjoint(arts[len(arts) // 2 :]))
    if source in ("docs", "pydoc"):
        try:
            from ..eval.texts import pydoc_paragraphs
        except ImportError:
            return tuple(_pydoc_text_fallback())
        return tuple(_disjoint(pydoc_paragraphs()))
    raise ValueError(f"unknown calibration text {source!r}; available: {', '.join(CALIB_SOURCES)}")


_JOIN = {"code": "\n\n\n", "news": "\n", "lee": "\n", "docs": "\n\n", "pydoc": "\n\n"}


def _source_text(source: str, tokenizer: Any = None) -> str:
    docs = _documents(source)
    if source == "chat":
        from ..eval.texts import render_conversation

        return "".join(render_conversation(tokenizer, c) for c in docs)
    return _JOIN[source].join(docs)


def calibration_sources(name: str = "mix") -> tuple[str, ...]:
    """The sources windows of calibration text ``name`` are cut from, in turn."""
    if name not in CALIB_SOURCES:
        raise ValueError(f"unknown calibration text {name!r}; available: "
                         f"{', '.join(CALIB_SOURCES)}")
    return MIX_CYCLE if name == "mix" else (name,)


def calibration_text(name: str = "mix", tokenizer: Any = None) -> str:
    """The calibration text named ``name`` (each source's text, joined by blank lines for
    ``"mix"``). ``tokenizer`` renders chat through its template (plain lines without one).

    * ``"mix"`` (default): chat + code + news + docs, see the module docstring.
    * ``"chat"``, ``"code"``, ``"news"`` (= ``"lee"``: Lee articles 150-299), ``"docs"``
      (= ``"pydoc"``: CPython documentation prose): one source alone.
    """
    srcs = dict.fromkeys(calibration_sources(name))
    return "\n\n".join(_source_text(s, tokenizer) for s in srcs)


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    # The whole corpus is one sequence on purpose (windows are cut from it), so transformers'
    # "longer than the model's maximum length" warning would be misleading: verbose=False
    # (only for transformers tokenizers; any callable returning input_ids is accepted).
    from transformers import PreTrainedTokenizerBase

    quiet = {"verbose": False} if isinstance(tokenizer, PreTrainedTokenizerBase) else {}
    ids = tokenizer(text, add_special_tokens=False, **quiet)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


@functools.lru_cache(maxsize=8)
def _tokenized(tokenizer: Any, source: str) -> torch.Tensor:
    if source == "chat":
        # One conversation at a time: the template's own special tokens are in the text.
        parts = [_encode(tokenizer, _render(tokenizer, c)) for c in _documents("chat")]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return _encode(tokenizer, _source_text(source))


def _render(tokenizer: Any, conv: Any) -> str:
    from ..eval.texts import render_conversation

    return render_conversation(tokenizer, conv)


def _windows(ids: torch.Tensor, n: int, seq_len: int, gen: torch.Generator, what: str):
    if ids.numel() <= seq_len:
        raise ValueError(
            f"calibration text {what} has {ids.numel()} tokens, fewer than "
            f"calib_seq_len={seq_len}"
        )
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=gen)
    return [ids[s : s + seq_len] for s in starts.tolist()]


def calibration_ids(
    tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0, text: str = "mix"
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens of calibration text ``text``: int64
    ``[n_samples, seq_len]``.

    Window ``i`` comes from source ``calibration_sources(text)[i % len(cycle)]``; within a
    source, starts are drawn uniformly (generator seeded by ``seed``) from its whole tokenized
    text, as in the GPTQ/AWQ reference implementations.
    """
    cycle = calibration_sources(text)
    gen = torch.Generator().manual_seed(seed)
    counts = {s: sum(1 for i in range(n_samples) if cycle[i % len(cycle)] == s) for s in cycle}
    drawn = {s: iter(_windows(_tokenized(tokenizer, s), k, seq_len, gen, repr(s)))
             for s, k in counts.items() if k}
    return torch.stack([next(drawn[cycle[i % len(cycle)]]) for i in range(n_samples)])


def calibration_ids_from(
    data: Any, tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Calibration windows ``[n_samples, seq_len]`` from user data.

    ``data`` is one of: a ``str`` text; a list of texts (joined by blank lines); a
    ``pathlib.Path`` / ``os.PathLike`` to a UTF-8 text file; a 1-D sequence or tensor of token
    ids (windows are cut from it); a 2-D tensor / list of lists of ids (used as the windows,
    as ``calib_input_ids``). Windows are drawn with ``seed`` as for :func:`calibration_ids`.
    """
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        return data.to(torch.long)
    if isinstance(data, (Path, os.PathLike)):
        data = Path(data).read_text(encoding="utf-8")
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, str) for d in data):
        data = "\n\n".join(data)
    if isinstance(data, str):
        if tokenizer is None:
            raise ValueError("calib_data given as text needs a tokenizer")
        ids = _encode(tokenizer, data)
    else:
        ids = torch.as_tensor(data, dtype=torch.long)
        if ids.dim() == 2:
            return ids
        if ids.dim() != 1:
            raise ValueError(f"calib_data token ids must be 1-D or 2-D, got {tuple(ids.shape)}")
    gen = torch.Generator().manual_seed(seed)
    return torch.stack(_windows(ids, n_samples, seq_len, gen, "calib_data"))


def check_calibration_source(model: Any) -> None:
    """Raise the error :func:`resolve_tokenizer` would, without loading a tokenizer: the model
    must have a local ``config.name_or_path`` directory to find calibration text's tokenizer."""
    import os

    path = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not (path and os.path.isdir(path)):
        raise ValueError(_NO_TOKENIZER)


_NO_TOKENIZER = (
    "this quantization method needs calibration data: the model has no local "
    "config.name_or_path directory to load a tokenizer from. Call "
    "infopt.quant.quantize_model(model, config, tokenizer=tok) or pass "
    "calib_input_ids=[n, seq_len] token ids"
)


def resolve_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """The tokenizer to calibrate with: ``tokenizer`` if given, else the one saved next to the
    model (``model.config.name_or_path`` when it is a local directory; never the hub)."""
    if tokenizer is not None:
        return tokenizer
    import os

    path = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if path and os.path.isdir(path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"this quantization method needs calibration text and no tokenizer could be "
                f"loaded from the model's directory {path!r} ({e}); call "
                "infopt.quant.quantize_model(model, config, tokenizer=tok) or pass "
                "calib_input_ids=[n, seq_len] token ids"
            ) from e
    raise ValueError(_NO_TOKENIZER)
