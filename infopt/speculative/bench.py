"""Rows for ``infopt bench``: infopt's speculative decoding and HF's assisted generation as peers.

Registered when :mod:`infopt.speculative` is imported. The draft-model rows only make sense for
a target sharing the Qwen2.5 tokenizer (``qwen2.5-coder-1.5b``); elsewhere they fail with the
vocabulary-mismatch error. Draft-model weights are not counted by ``model_bytes`` (the draft is
not a submodule of the target).
"""

from __future__ import annotations

import functools
from typing import Any

import torch.nn as nn

from ..quant.config import Int4WeightOnlyConfig
from .config import DraftModelConfig

QWEN_DRAFT = "qwen2.5-coder-0.5b"


def _int4_draft() -> Int4WeightOnlyConfig:
    # The draft's tied 151936 x 896 head is most of what an int4 draft reads per token: int8.
    return Int4WeightOnlyConfig(lm_head="int8")


def _hf_assisted(model: nn.Module, quant: Any = None) -> nn.Module:
    # Peer: HF's own assisted generation with the same draft model (quantized by infopt when
    # ``quant`` is given, so the int4-draft rows compare the speculation loops, not the drafts).
    draft = DraftModelConfig(QWEN_DRAFT, quant=quant).load(model)
    model.generate = functools.partial(model.generate, assistant_model=draft)
    return model


def _hf_prompt_lookup(model: nn.Module) -> nn.Module:
    # Peer: HF's prompt-lookup decoding (its documented default of 10 draft tokens).
    model.generate = functools.partial(model.generate, prompt_lookup_num_tokens=10)
    return model


def register_bench_configs() -> None:
    from ..bench.configs import BenchConfig, register_bench_config

    rows = [
        BenchConfig(
            "spec-prompt-lookup",
            "speculative: prompt lookup (n-gram) drafts",
            wrap_options={"spec": "prompt-lookup"},
        ),
        BenchConfig(
            "spec-layer-skip",
            "speculative: self-drafting with a middle layer block skipped",
            wrap_options={"spec": "layer-skip"},
        ),
        BenchConfig(
            "spec-draft-qwen0.5b",
            f"speculative: {QWEN_DRAFT} drafts (Qwen2.5 targets)",
            wrap_options={"spec": DraftModelConfig(QWEN_DRAFT)},
        ),
        BenchConfig(
            "spec-draft-qwen0.5b-int4",
            f"speculative: {QWEN_DRAFT} drafts, draft int4 + int8 head (output still exact)",
            wrap_options={"spec": DraftModelConfig(QWEN_DRAFT, quant=_int4_draft())},
        ),
        BenchConfig(
            "hf-assisted-qwen0.5b",
            f"peer: HF assisted generation, {QWEN_DRAFT} draft",
            apply=_hf_assisted,
        ),
        BenchConfig(
            "hf-assisted-qwen0.5b-int4",
            f"peer: HF assisted generation, {QWEN_DRAFT} draft int4 + int8 head (by infopt)",
            apply=functools.partial(_hf_assisted, quant=_int4_draft()),
        ),
        BenchConfig(
            "hf-prompt-lookup",
            "peer: HF prompt-lookup decoding (10 tokens)",
            apply=_hf_prompt_lookup,
        ),
    ]
    for row in rows:
        register_bench_config(row, overwrite=True)
