"""``infopt serve`` pieces that need no running server: streamed-text holdback, CLI refusals
and option aliases (the server itself: tests/test_serve.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from infopt.serve.render import TextStreamer, stable_prefix  # noqa: E402


def test_stream_text_holds_back_partial_characters_and_stop_prefixes():
    assert stable_prefix("abc\ufffd", ()) == "abc"
    assert stable_prefix("hello wor", ["world"]) == "hello "
    assert stable_prefix("hello w", ["xyz", "wx"]) == "hello "
    assert stable_prefix("hello", ["lo!"]) == "hel"
    s = TextStreamer(["END"])
    parts = [s.delta(t, False) for t in ["a", "aE", "aEN", "aENx", "aENx\ufffd"]]
    parts.append(s.delta("aENx\u00e9", True))
    assert "".join(parts) == "aENx\u00e9" and parts[1:3] == ["", ""]


@pytest.mark.parametrize("argv,needle", [
    (["--kv", "int8"], "accepted values"),
    (["--kv", "paged-int8", "--kv-cache-dtype", "fp8"], "conflicts"),
    (["--spec", "ngram"], "accepted values"),
    (["--spec", "layer-skip"], "draft KV cache"),
    (["--quant", "bogus"], "--quant"),
    (["--port", "70000"], "--port"),
    (["--block-size", "3"], "block_size"),
    (["--request-timeout", "0"], "--request-timeout"),
])  # fmt: skip
def test_cli_refuses_with_a_clear_message(argv, needle, capsys):
    from infopt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "smollm2-135m", *argv])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_kv_alias_maps_to_the_engine_pool():
    import argparse

    from infopt.serve.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--model", "m", "--kv", "paged-prefix"]), p)
    assert cfg.engine.enable_prefix_caching and cfg.engine.kv_cache_dtype == "auto"
    cfg = config_from_args(p.parse_args(["--model", "m", "--kv", "paged-int8"]), p)
    assert cfg.engine.kv_cache_dtype == "int8" and not cfg.engine.enable_prefix_caching
