"""``infopt serve`` end to end: a real server in a subprocess (a tiny random Llama saved to a
local directory, with a character-level tokenizer and a chat template) driven by the official
``openai`` client and by raw ``httpx`` for malformed and hostile input. Greedy answers equal
``Engine.generate`` in-process; disconnects and timeouts free the KV blocks; a bounded
loopback load test loses nothing; shutdown lets in-flight streams finish."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from infopt.batching import Engine, EngineConfig, SamplingParams  # noqa: E402
from infopt.serve.config import ServeConfig  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
REPO = Path(__file__).resolve().parents[1]


def build_tiny_model(path: Path) -> None:
    """A random 2-layer Llama plus a one-token-per-character tokenizer, as a HF directory."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.add_special_tokens(SPECIALS)
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                      special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>", chat_template=TEMPLATE,
                                  clean_up_tokenization_spaces=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(path)
    return path


class Server:
    """A server subprocess: its base URL, log file and metrics."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 15.0) -> dict[str, float]:
        """Metrics once no request runs, waits, or holds a KV block (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["infopt_kv_blocks_used"], m["infopt_num_requests_running"],
                    m["infopt_num_requests_waiting"]) == (0, 0, 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:  # not listening (any more)
        return False


def start_server(model_dir: Path, log: Path, *extra: str) -> Server:
    # conftest turns the Triton interpreter on for this process; the server runs as deployed
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "infopt.serve", "--model", str(model_dir),
           "--served-model-name", NAME, "--port", "0", "--threads", "1", "--log-level",
           "warning", "--num-blocks", "512", *extra]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = Server(proc, "", log)
    try:
        deadline = time.monotonic() + 90
        while not server.url:
            found = re.search(r"listening on (http://\S+)", log.read_text())
            if found:
                server.url = found[1]
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        while not _healthy(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                code = proc.poll()
                raise RuntimeError(f"server never became healthy (exit {code}):\n"
                                   f"{log.read_text()}")
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, request):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = start_server(model_dir, log, "--api-key", KEY, "--max-request-bytes", "65536",
                     "--request-timeout", "120", "--enable-prefix-caching")
    request.addfinalizer(s.stop)  # the subprocess never outlives the tests
    return s


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same model in-process, driven by ``Engine.generate``."""
    from infopt.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server subprocess gets the other core
    model, tok = load_model(model_dir, progress=False)
    yield Engine(model, tok, EngineConfig(num_blocks=512)), tok
    torch.set_num_threads(threads)


def ref_text(reference, prompt_ids, n):
    engine, _ = reference
    out = engine.generate([prompt_ids], SamplingParams(max_tokens=n, temperature=0),
                          use_tqdm=False)[0]
    return out.text, len(out.token_ids), out.finish_reason


def chat_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


# --- the official client ------------------------------------------------------------------


def test_models_and_health(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert [m.id for m in client(server).models.list().data] == [NAME]


def test_chat_greedy_equals_engine_and_stream_concatenates(server, reference):
    c, (_, tok) = client(server), reference
    msgs = [{"role": "user", "content": "Tell me a story."}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0)
    text, n, reason = ref_text(reference, chat_ids(tok, "Tell me a story."), 24)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, reason)
    assert r.usage.prompt_tokens == len(chat_ids(tok, "Tell me a story."))
    assert r.usage.completion_tokens == n and r.object == "chat.completion"

    chunks = list(c.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completions_string_and_token_ids_stream_and_logprobs(server, reference):
    c, (_, tok) = client(server), reference
    ids = tok("Once upon a time")["input_ids"]
    text, n, reason = ref_text(reference, ids, 16)
    a = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16,
                             temperature=0, logprobs=2)
    b = c.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=0)
    assert a.choices[0].text == b.choices[0].text == text
    assert a.choices[0].finish_reason == reason and a.usage.completion_tokens == n
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert all(len(t) <= 2 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    streamed = list(c.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=0,
                                         stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == text
    # default max_tokens is OpenAI's 16
    assert c.completions.create(model=NAME, prompt=ids, temperature=0).choices[0].text == text


def test_stop_string_cuts_and_stream_never_leaks_it(server, reference):
    c, (_, tok) = client(server), reference
    ids = tok("Once upon a time")["input_ids"]
    full, _, _ = ref_text(reference, ids, 16)
    stop = full[5:8]  # inside the greedy answer: generation must end there
    r = c.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    chunks = list(c.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=0,
                                       stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text


def test_chat_logprobs_and_seeded_sampling(server):
    c = client(server)
    kw = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    r = c.chat.completions.create(**kw, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode()) for t in content)
    a, b = (c.chat.completions.create(**kw, temperature=1.0, seed=7, extra_body={"top_k": 20})
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


# --- hostile and malformed input ------------------------------------------------------------

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [
    ({**CHAT, "n": 2}, 400, "n"),
    ({**CHAT, "temperature": -1}, 400, "temperature"),
    ({**CHAT, "temperature": 2.5}, 400, "temperature"),
    ({**CHAT, "top_p": 0}, 400, "top_p"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": True}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    ({**CHAT, "seed": -3}, 400, "seed"),
    ({**CHAT, "stop": [""]}, 400, "stop"),
    ({**CHAT, "stop": 3}, 400, "stop"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ({**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({**CHAT, "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ({**CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ({**CHAT, "frobnicate": 1}, 400, "frobnicate"),
    ({**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({**CHAT, "messages": []}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 4100}]}, 400, "messages"),
    ({**CHAT, "max_tokens": 4090}, 400, "max_tokens"),
    ({**CHAT, "model": "gpt-4"}, 404, "model"),
    ({key: v for key, v in CHAT.items() if key != "model"}, 400, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{p}-{i}" for i, (_, _, p) in
                                                        enumerate(BAD)])
def test_bad_parameters_are_refused_naming_them(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["message"]


COMPLETION_BAD = [
    ({"model": NAME, "prompt": ["a", "b"]}, "prompt"),
    ({"model": NAME, "prompt": [5, 999]}, "prompt"),
    ({"model": NAME, "prompt": ""}, "prompt"),
    ({"model": NAME, "prompt": "a", "echo": True}, "echo"),
    ({"model": NAME, "prompt": "a", "best_of": 3}, "best_of"),
    ({"model": NAME, "prompt": "a", "logprobs": 50}, "logprobs"),
    ({"model": NAME, "prompt": "a", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
]


@pytest.mark.parametrize("body,param", COMPLETION_BAD, ids=[p for _, p in COMPLETION_BAD])
def test_bad_completion_parameters(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("content,code", [
    (b'{"model": "tiny", "messages": [', "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b"\xff\xfe not utf-8", "invalid_json"),
    (b'{"model": "tiny", "temperature": NaN, "messages": []}', "invalid_value"),
    (b"[" * 20_000 + b"]" * 20_000, "invalid_json"),
])  # fmt: skip
def test_malformed_bodies(server, content, code):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_oversized_bodies_are_413(server):
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]})
    r = httpx.post(f"{server.url}/v1/chat/completions", content=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted while reading
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192].encode()

    r = httpx.post(f"{server.url}/v1/chat/completions", content=chunked(), headers=AUTH)
    assert r.status_code == 413


def test_api_key_is_required_on_v1_only(server):
    url = f"{server.url}/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url, json=CHAT, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/nowhere", headers=AUTH).json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.url}/v1/completions", headers=AUTH).status_code == 405


# --- disconnects, load --------------------------------------------------------------------

LONG = {"model": NAME, "prompt": "Go on and on", "max_tokens": 4000, "ignore_eos": True,
        "temperature": 0}


def test_disconnect_mid_stream_frees_blocks(server):
    before = server.metrics().get('infopt_request_finished_total{reason="cancelled"}', 0)
    with httpx.Client(timeout=30) as c, c.stream(
        "POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}, headers=AUTH
    ) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert len(got) >= 2
        assert server.metrics()["infopt_kv_blocks_used"] > 0  # it holds blocks mid-stream
    m = server.wait_idle()  # the closed connection aborted it: every block is back
    assert m["infopt_kv_blocks_used"] == 0 and m["infopt_num_requests_running"] == 0
    assert m['infopt_request_finished_total{reason="cancelled"}'] == before + 1


def test_disconnect_while_waiting_for_a_whole_answer_frees_blocks(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=LONG, headers=AUTH,
                   timeout=httpx.Timeout(30, read=0.5))
    m = server.wait_idle()
    assert m["infopt_kv_blocks_used"] == 0
    assert m['infopt_request_finished_total{reason="disconnected"}'] >= 1


def test_bounded_concurrent_load(server, reference):
    """48 clients x 3 requests (chat / completions, streamed or not), all greedy: each answer
    equals its in-process reference, none lost, and the server ends idle and healthy. The
    prompts repeat and span full KV blocks, so the prefix cache serves some of them."""
    _, tok = reference
    prompts = [w * 8 for w in ("alpha ", "beta gamma ", "delta epsilon zeta ", "eta ")]
    refs = {}
    for p in prompts:
        refs["chat", p] = ref_text(reference, chat_ids(tok, p), 12)[0]
        refs["text", p] = ref_text(reference, tok(p)["input_ids"], 12)[0]

    async def one(ac, i, j):
        p, kind, stream = prompts[(i + j) % 4], ("chat", "text")[i % 2], bool(j % 2)
        kw = dict(model=NAME, max_tokens=12, temperature=0, stream=stream)
        if kind == "chat":
            r = await ac.chat.completions.create(messages=[{"role": "user", "content": p}], **kw)
            if stream:
                chunks = [ch async for ch in r]
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
                reason = chunks[-1].choices[0].finish_reason
            else:
                text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        else:
            r = await ac.completions.create(prompt=p, **kw)
            if stream:
                chunks = [ch async for ch in r]
                text = "".join(ch.choices[0].text for ch in chunks)
                reason = chunks[-1].choices[0].finish_reason
            else:
                text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert reason in ("stop", "length")
        return text == refs[kind, p]

    async def run_all():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=60) as hc:
            ac = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                                    http_client=hc)

            async def worker(i):
                return [await one(ac, i, j) for j in range(3)]

            return await asyncio.gather(*(worker(i) for i in range(48)))

    results = asyncio.run(asyncio.wait_for(run_all(), timeout=150))
    flat = [ok for w in results for ok in w]
    assert len(flat) == 144 and all(flat)
    m = server.wait_idle()
    assert (m["infopt_kv_blocks_used"], m["infopt_num_requests_waiting"]) == (0, 0)
    assert m["infopt_prefix_cache_hit_rate"] > 0
    assert httpx.get(f"{server.url}/health").status_code == 200


# --- timeouts and shutdown (a second server with a short timeout) -----------------------------


@pytest.fixture(scope="module")
def short_server(model_dir, tmp_path_factory, request):
    log = tmp_path_factory.mktemp("serve-short") / "server.log"
    s = start_server(model_dir, log, "--request-timeout", "2", "--shutdown-timeout", "20")
    request.addfinalizer(s.stop)
    return s


def test_request_timeout_aborts(short_server):
    long = {**LONG, "prompt": "x"}
    r = httpx.post(f"{short_server.url}/v1/completions", json=long, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    with httpx.stream("POST", f"{short_server.url}/v1/completions",
                      json={**long, "stream": True}, timeout=30) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and "request_timeout" in events[-2]
    m = short_server.wait_idle()
    assert m["infopt_kv_blocks_used"] == 0
    assert m['infopt_request_finished_total{reason="timeout"}'] == 2


def test_graceful_shutdown_finishes_in_flight_stream(short_server):
    body = {**LONG, "max_tokens": 30, "stream": True}
    events, started = [], threading.Event()

    def consume():
        with httpx.stream("POST", f"{short_server.url}/v1/completions", json=body,
                          timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(20)
    short_server.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert not t.is_alive() and events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]
    assert short_server.proc.wait(30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{short_server.url}/health", timeout=5)


def test_a_model_that_cannot_load_exits_with_status_1(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match=r"(?s)exit 1\).*without config\.json"):
        start_server(tmp_path / "empty", tmp_path / "server.log")


# --- in-process pieces ----------------------------------------------------------------------


def test_health_is_503_while_loading_then_200(model_dir, reference):
    from starlette.testclient import TestClient

    from infopt.serve import create_app

    gate, failures = threading.Event(), []
    model = reference[0].model

    def slow_loader(cfg):
        assert gate.wait(30)
        engine = Engine(model, reference[1], EngineConfig(num_blocks=32))
        engine.start()
        return engine

    app = create_app(ServeConfig(model=str(model_dir), served_model_name=NAME), loader=slow_loader)
    with TestClient(app) as tc:
        assert tc.get("/health").status_code == 503
        r = tc.post("/v1/completions", json={"model": NAME, "prompt": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        gate.set()
        deadline = time.monotonic() + 30
        while tc.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = tc.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3

    def broken_loader(cfg):
        raise OSError("no such model")

    app = create_app(ServeConfig(model="missing"), loader=broken_loader)
    app.state.host.on_failure = lambda: failures.append(True)
    with TestClient(app) as tc:
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        body = tc.get("/health").json()
        assert body["status"] == "failed" and "no such model" in body["error"]


def test_engine_failure_fails_requests_and_health(model_dir, reference):
    from starlette.testclient import TestClient

    from infopt.serve import create_app

    def loader(cfg):
        engine = Engine(reference[0].model, reference[1], EngineConfig(num_blocks=32))
        engine.start()
        return engine

    def boom(plan):
        raise RuntimeError("device lost")

    app = create_app(ServeConfig(model=str(model_dir), served_model_name=NAME), loader=loader)
    with TestClient(app) as tc:
        deadline = time.monotonic() + 30
        while tc.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        app.state.host.engine.runner.execute = boom  # the engine loop dies at its next step
        r = tc.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 3})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        assert tc.get("/health").json()["status"] == "failed"
        assert tc.post("/v1/completions", json={"model": NAME, "prompt": "a"}).status_code == 503


def test_bench_serve_url_client_measures_every_request(server):
    """``infopt bench-serve --url``'s client: every request streams exactly its max_tokens
    (ignore_eos), timings are ordered, Poisson arrivals are honoured."""
    from infopt.batching.workload import SampledRequest
    from infopt.bench.serve import poisson_arrivals
    from infopt.bench.serve_client import run_url_bench

    reqs = [SampledRequest(tuple(range(5, 5 + n)), "", m, str(i))
            for i, (n, m) in enumerate([(4, 5), (9, 3), (6, 8), (12, 2)])]
    arrivals = poisson_arrivals(len(reqs), 20.0, seed=1)
    row = run_url_bench(server.url, reqs, arrivals, api_key=KEY)
    assert [r.num_generated for r in row.records] == [5, 3, 8, 2]
    for r, a in zip(row.records, arrivals):
        assert r.arrival >= a - 1e-3 and r.arrival <= r.first_token <= r.finished
    m = row.metrics
    assert m["output_tokens"] == 18 and m["output_tok_s"] > 0 and m["ttft_ms"]["p50"] > 0
    assert m["itl_ms"]["p99"] >= m["itl_ms"]["p50"] > 0
    with pytest.raises(ValueError, match="--url"):
        run_url_bench("127.0.0.1:1", reqs, arrivals)
    server.wait_idle()


def test_prompt_lookup_server_keeps_greedy_output_and_counts_drafts(model_dir, reference,
                                                                    tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-spec") / "server.log"
    s = start_server(model_dir, log, "--spec", "prompt-lookup")
    try:
        _, tok = reference
        prompt = tok("abcabcabcabcabcabc", add_special_tokens=False)["input_ids"]
        want, n, _ = ref_text(reference, prompt, 24)
        body = {"model": NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        m = s.wait_idle()
        assert m["infopt_spec_draft_tokens_total"] > 0
        assert 0 <= m["infopt_spec_accepted_tokens_total"] <= m["infopt_spec_draft_tokens_total"]
    finally:
        s.stop()
