"""Offline-reproducible English evaluation text and prompts.

Two named sources, both real English and both pinned so numbers are comparable across runs:

* ``"lee"`` (the default): the Lee background corpus, 300 short Australian news articles
  (one per line, ~360 KB) shipped as test data inside the ``gensim==4.4.0`` wheel. It is
  fetched once from the package registry with ``pip download`` (gensim is never installed;
  the file is read out of the wheel with :mod:`zipfile`), sha256-checked and cached at
  ``<cache>/data/lee_background.cor`` where ``<cache>`` is ``$INFOPT_CACHE`` or
  ``~/.cache/infopt``. News prose is the closest thing to "generic English" available
  offline, so it is the default. If the fetch fails we raise: silently switching text
  would make perplexities incomparable.
* ``"pydoc"``: documentation prose extracted from CPython's ``pydoc_data/topics.py``
  (always present, no network). The exact text depends on the Python minor version, so
  compare pydoc numbers only between runs on the same Python.

The evaluation domains (``"prose"``, ``"code"``, ``"chat"``: :func:`domain_text`) live here
too, with the 64-character overlap check the calibration mix (:mod:`infopt.quant.calib_data`)
uses to stay disjoint from them; :mod:`infopt.eval.domains` measures quality on them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_EVAL_CHARS",
    "CHAT_EVAL_RECORDS",
    "CODE_PROMPTS",
    "DOMAINS",
    "EVAL_CODE_FILES",
    "DEFAULT_TEXT",
    "GROUNDED_PROMPTS",
    "LEE_SHA256",
    "TEXT_NAMES",
    "cache_dir",
    "chat_conversations",
    "code_text",
    "default_text",
    "domain_documents",
    "domain_text",
    "eval_window_hashes",
    "eval_prompts",
    "fetch_lee",
    "get_text",
    "lee_articles",
    "pydoc_paragraphs",
    "render_conversation",
    "shares_window",
    "window_hashes",
]

TEXT_NAMES = ("lee", "pydoc")
DEFAULT_TEXT = "lee"

LEE_PACKAGE = "gensim==4.4.0"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
LEE_FILENAME = "lee_background.cor"
# sha256 of the raw member bytes (360082 bytes, 300 lines) in every gensim 4.4.0 wheel.
LEE_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"

# The data file is identical in every platform wheel, so ask for one fixed wheel: this works
# from any host interpreter/OS (gensim 4.4.0 may have no wheel for the host's Python). The
# second attempt (host defaults) covers registries that mirror only some platforms.
_PIP_ATTEMPTS = (
    [
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ],
    [],
)


def cache_dir() -> Path:
    """``$INFOPT_CACHE`` if set, else ``~/.cache/infopt`` (not created here)."""
    env = os.environ.get("INFOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infopt"


def _lee_path() -> Path:
    return cache_dir() / "data" / LEE_FILENAME


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_member(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(LEE_MEMBER)
    if _sha256(data) != LEE_SHA256:
        raise RuntimeError(
            f"{LEE_MEMBER} in {wheel.name} has sha256 {_sha256(data)}, expected {LEE_SHA256}; "
            f"the wheel is not the pinned {LEE_PACKAGE}"
        )
    return data


def _download_wheel(dest: Path) -> Path:
    """``pip download`` the pinned gensim wheel into ``dest``; returns the wheel's path."""
    errors = []
    for extra in _PIP_ATTEMPTS:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            *extra,
            LEE_PACKAGE,
            "-d",
            str(dest),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{' '.join(cmd)}: {e}")
            continue
        wheels = sorted(dest.glob("gensim-4.4.0-*.whl"))
        if proc.returncode == 0 and wheels:
            return wheels[0]
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        errors.append(f"{' '.join(cmd)} -> exit {proc.returncode}: {' | '.join(tail)}")
    raise RuntimeError(
        f"could not download {LEE_PACKAGE} (needed for the 'lee' evaluation text) from the "
        "package registry:\n  " + "\n  ".join(errors) + "\n"
        "Check network/registry access (pip config, PIP_INDEX_URL) and retry, or download it "
        f"yourself (`python -m pip download --no-deps --only-binary=:all: {LEE_PACKAGE} -d DIR`) "
        "and call infopt.eval.fetch_lee(wheel='DIR/gensim-4.4.0-....whl'). The offline "
        "text get_text('pydoc') needs no download."
    )


def fetch_lee(wheel: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Ensure the Lee corpus is cached and return its path.

    Args:
        wheel: a local ``gensim-4.4.0-*.whl`` to extract from instead of downloading.
        force: re-extract even if a verified cached copy exists.

    Raises:
        RuntimeError: the download failed or the bytes do not match :data:`LEE_SHA256`.
    """
    path = _lee_path()
    # A cached file with the wrong hash (corrupt, foreign) is replaced rather than trusted.
    if path.exists() and not force and _sha256(path.read_bytes()) == LEE_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
        data = _read_member(Path(wheel))
    else:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".gensim-dl-") as tmp:
            data = _read_member(_download_wheel(Path(tmp)))
    # Atomic publish: concurrent readers see either no file or the complete, verified one.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{LEE_FILENAME}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def lee_articles() -> list[str]:
    """The 300 Lee news articles in file order, each stripped (fetches on first use)."""
    text = fetch_lee().read_bytes().decode("utf-8")
    return [line.strip() for line in text.split("\n") if line.strip()]


_UNDERLINE = re.compile(r"\s*([*=\-^~\"'#+])\1{2,}\s*")


def pydoc_paragraphs() -> list[str]:
    """Prose paragraphs of ``pydoc_data.topics``, topics in sorted key order.

    Keeps only unindented blocks (indented ones are code, grammar productions or quoted
    examples), drops section headings, reflows each paragraph onto one line and drops short
    or symbol-heavy ones (tables, method signatures, ``>>>`` sessions).
    """
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            if not block.strip() or block[0].isspace():
                continue
            lines = block.split("\n")
            kept = [ln for ln in lines if not _UNDERLINE.fullmatch(ln)]
            if len(kept) < len(lines) and len(kept) <= 1:
                continue  # a heading: title line + underline
            para = " ".join(" ".join(kept).split())
            if len(para.split()) < 8:
                continue
            letters = sum(c.isalpha() or c == " " for c in para) / len(para)
            if letters < 0.75:
                continue
            paras.append(para)
    return paras


def get_text(name: str = DEFAULT_TEXT) -> str:
    """The named evaluation text: ``"lee"`` (articles joined by ``\\n``) or ``"pydoc"``
    (paragraphs joined by ``\\n\\n``)."""
    if name == "lee":
        return "\n".join(lee_articles())
    if name == "pydoc":
        return "\n\n".join(pydoc_paragraphs())
    raise ValueError(f"unknown text {name!r}; available: {list(TEXT_NAMES)}")


def default_text() -> str:
    """``get_text(DEFAULT_TEXT)``, i.e. the Lee news corpus (downloads once, then cached)."""
    return get_text(DEFAULT_TEXT)


def eval_prompts(n: int = 8, source: str = DEFAULT_TEXT, *, n_words: int = 12) -> list[str]:
    """``n`` short English prompts: the first ``n_words`` words of ``n`` documents spread
    evenly over the source (articles for ``"lee"``, paragraphs for ``"pydoc"``).

    Prompts stop mid-sentence so a model's continuation is fairly constrained, and carry no
    trailing space (BPE tokenizers attach the space to the next word).
    """
    if source == "lee":
        docs = lee_articles()
    elif source == "pydoc":
        docs = pydoc_paragraphs()
    else:
        raise ValueError(f"unknown prompt source {source!r}; available: {list(TEXT_NAMES)}")
    if not 0 < n <= len(docs):
        raise ValueError(f"n must be in [1, {len(docs)}] for source {source!r}, got {n}")
    return [" ".join(docs[i * len(docs) // n].split()[:n_words]) for i in range(n)]


# Hand-written completion prompts for code models: each is the head of a small, well-known
# Python function whose body a competent model should write the same way every time.
CODE_PROMPTS: tuple[str, ...] = (
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number (fib(0) == 0)."""\n',
    'def is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n',
    "def binary_search(items: list[int], target: int) -> int:\n"
    '    """Return the index of target in the sorted list items, or -1 if absent."""\n',
    "def reverse_words(sentence: str) -> str:\n"
    '    """Reverse the order of words in a sentence."""\n',
    "def flatten(nested: list) -> list:\n"
    '    """Flatten an arbitrarily nested list into a flat list."""\n',
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
    '    """Merge two sorted lists into one sorted list."""\n',
    'def word_count(text: str) -> dict[str, int]:\n    """Count occurrences of each word."""\n',
    "class Stack:\n"
    '    """A last-in, first-out stack backed by a Python list."""\n\n'
    "    def __init__(self):\n",
    "def gcd(a: int, b: int) -> int:\n"
    '    """Greatest common divisor using Euclid\'s algorithm."""\n',
    "import json\n\n\ndef load_config(path: str) -> dict:\n"
    '    """Read a JSON config file and return it as a dict."""\n',
    "def quicksort(xs: list[int]) -> list[int]:\n"
    '    """Sort a list of integers with the quicksort algorithm."""\n',
    "def is_palindrome(s: str) -> bool:\n"
    '    """Return True if s reads the same backwards, ignoring case and spaces."""\n',
)

_MOVING_AVERAGE = '''def moving_average(values, window):
    """Return the moving averages of values over a sliding window."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''

_LRU = '''class LRUCache:
    """A fixed-capacity mapping that evicts the least recently used key."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.data = {}
        self.order = []

    def get(self, key, default=None):
        if key not in self.data:
            return default
        self.order.remove(key)
        self.order.append(key)
        return self.data[key]

    def put(self, key, value):
        if key in self.data:
            self.order.remove(key)
        elif len(self.data) >= self.capacity:
            oldest = self.order.pop(0)
            del self.data[oldest]
        self.data[key] = value
        self.order.append(key)
'''

_REPORT = '''def summarize(rows):
    """Print the count, mean and maximum of the score column."""
    scores = [row["score"] for row in rows if row.get("score") is not None]
    if not scores:
        print("no scores")
        return None
    mean = sum(scores) / len(scores)
    print("count:", len(scores))
    print("mean:", mean)
    print("max:", max(scores))
    return mean
'''

# Input-grounded edits for code models: the answer copies most of the given code, which is
# where prompt-lookup drafting pays off (and how editing assistants are used).
GROUNDED_PROMPTS: tuple[str, ...] = (
    "# Original:\n" + _MOVING_AVERAGE + "\n\n# The same function with `values` renamed to `xs`:\n",
    "# Original:\n" + _LRU + "\n\n# The same class with the method `get` renamed to `lookup`:\n",
    "# Original:\n" + _REPORT + "\n\n# The same function using logging.info instead of print:\n"
    "import logging\n\n\n",
)


# --- evaluation domains: prose, code, chat (see infopt.eval.domains and docs/eval.md) ---------

DOMAINS = ("prose", "code", "chat")

#: standard-library files of the code domain (evaluation); calibration uses others.
EVAL_CODE_FILES = ("textwrap.py", "fractions.py", "heapq.py", "shlex.py", "calendar.py",
                   "graphlib.py")
#: ShareGPT records (file order) the chat domain draws from; calibration starts at 8000.
CHAT_EVAL_RECORDS = (0, 4000)
#: characters of message text in the chat domain (~15k tokens, enough for 8192-token evals).
CHAT_EVAL_CHARS = 60_000
#: a conversation qualifies when all its messages together are at most this long...
CHAT_MAX_CHARS = 8000
#: ... and at least this share of its characters is ASCII (English-model evaluation).
CHAT_MIN_ASCII = 0.97
#: width of the windows checked by :func:`shares_window` (whitespace-normalised characters).
OVERLAP_WINDOW = 64

Conversation = tuple[tuple[str, str], ...]  # ((role, text), ...), role "user" / "assistant"


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_text(files: Sequence[str]) -> str:
    """The standard-library ``files`` (relative to the stdlib directory), joined by blank lines."""
    root = _stdlib_dir()
    return "\n\n\n".join((root / f).read_text(encoding="utf-8") for f in files)


def _ascii_share(text: str) -> float:
    return sum(c.isascii() for c in text) / max(len(text), 1)


def _as_conversation(record: Any) -> Conversation | None:
    conv = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conv, list) or len(conv) < 2:
        return None
    roles = {"human": "user", "gpt": "assistant"}
    out = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return None
        role, text = roles.get(turn.get("from")), turn.get("value")
        if role is None or not isinstance(text, str) or not text.strip():
            return None
        if role != ("user" if i % 2 == 0 else "assistant"):  # strictly alternating, user first
            return None
        out.append((role, text.strip()))
    if out[-1][0] != "assistant":
        out.pop()
    total = "".join(t for _, t in out)
    if len(out) < 2 or len(total) > CHAT_MAX_CHARS or _ascii_share(total) < CHAT_MIN_ASCII:
        return None
    return tuple(out)


@functools.lru_cache(maxsize=4)
def chat_conversations(start: int, stop: int | None, max_chars: int) -> tuple[Conversation, ...]:
    """Qualifying ShareGPT conversations of records ``[start, stop)`` in file order, until
    their messages total ``max_chars`` characters (English, alternating user / assistant,
    at most :data:`CHAT_MAX_CHARS` characters each). Cached; the ~17.6k records themselves
    are not kept (a few hundred MB as Python objects)."""
    # The reader lives with the serving workload (a JSON stream reader and the wheel fetch;
    # it imports only infopt.models), imported here so that loading texts stays cheap.
    from infopt.batching.workload import load_sharegpt

    out: list[Conversation] = []
    total = 0
    for rec in load_sharegpt()[start:stop]:
        conv = _as_conversation(rec)
        if conv is None:
            continue
        out.append(conv)
        total += sum(len(t) for _, t in conv)
        if total >= max_chars:
            break
    return tuple(out)


def render_conversation(tokenizer: Any, conv: Conversation) -> str:
    """``conv`` through ``tokenizer``'s chat template; ``User:`` / ``Assistant:`` lines when
    the tokenizer has none (or ``tokenizer`` is None)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) and hasattr(
        tokenizer, "apply_chat_template"
    ):
        msgs = [{"role": r, "content": t} for r, t in conv]
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    names = {"user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[r]}: {t}" for r, t in conv) + "\n"


@functools.lru_cache(maxsize=1)
def _prose_docs() -> tuple[str, ...]:
    arts = lee_articles()
    return tuple(arts[: len(arts) // 2])


def _chat_eval() -> tuple[Conversation, ...]:
    return chat_conversations(*CHAT_EVAL_RECORDS, CHAT_EVAL_CHARS)


def domain_documents(name: str) -> list[str]:
    """The raw documents of domain ``name`` (no chat template): what the overlap check reads."""
    if name == "prose":
        return list(_prose_docs())
    if name == "code":
        return [code_text(EVAL_CODE_FILES)]
    if name == "chat":
        return [t for conv in _chat_eval() for _, t in conv]
    raise ValueError(f"unknown domain {name!r}; available: {list(DOMAINS)}")


def domain_text(name: str, tokenizer: Any = None) -> str:
    """The evaluation text of domain ``name`` (``"prose"``, ``"code"`` or ``"chat"``).

    ``tokenizer`` matters only for ``"chat"``: conversations go through its chat template,
    each rendered on its own and concatenated.
    """
    if name == "prose":
        return "\n".join(_prose_docs())
    if name == "code":
        return code_text(EVAL_CODE_FILES)
    if name == "chat":
        return "".join(render_conversation(tokenizer, c) for c in _chat_eval())
    raise ValueError(f"unknown domain {name!r}; available: {list(DOMAINS)}")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def window_hashes(texts: Iterable[str], width: int = OVERLAP_WINDOW) -> set[int]:
    """Hashes of every ``width``-character window of the whitespace-normalised ``texts``."""
    out: set[int] = set()
    for t in texts:
        t = _normalise(t)
        out.update(hash(t[i : i + width]) for i in range(len(t) - width + 1))
    return out


def shares_window(text: str, hashes: set[int], width: int = OVERLAP_WINDOW) -> bool:
    """Whether whitespace-normalised ``text`` has a ``width``-character window in ``hashes``
    (from :func:`window_hashes`). A hash collision can only make this True wrongly, which
    drops a calibration piece it did not have to: never an overlap let through."""
    t = _normalise(text)
    return any(hash(t[i : i + width]) in hashes for i in range(len(t) - width + 1))


@functools.lru_cache(maxsize=1)
def eval_window_hashes() -> frozenset[int]:
    """:func:`window_hashes` of the documents of every evaluation domain (cached)."""
    return frozenset(window_hashes(d for name in DOMAINS for d in domain_documents(name)))
