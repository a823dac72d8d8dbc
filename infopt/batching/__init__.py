"""Continuous batching: one engine for many requests.

requests -> :class:`Scheduler` -> :class:`StepPlan` (plain data) -> :class:`ModelRunner`
(one forward of the HF model over a flat ragged batch through the paged attention ops) ->
:class:`Sampler` -> :class:`RequestOutput`. Chunked prefill, decodes and prefix-cache hits are
one rule: each step every running request computes some of its not-yet-computed tokens under
a token budget. See ``docs/batching.md``.

    >>> from infopt.batching import Engine, EngineConfig, SamplingParams
    >>> engine = Engine(model, tokenizer, EngineConfig(enable_prefix_caching=True))
    >>> [o.text for o in engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0))]
"""

from __future__ import annotations

from ..options import register_option
from .compiled import CompileConfig, CompiledDecode
from .engine import Engine, EngineStats
from .hf_generate import enable_engine_generate, model_engine  # registers the kv handler
from .params import EngineConfig, SamplingParams
from .plan import StepPlan
from .request import FinishReason, RequestMetrics, RequestOutput, TokenLogprobs
from .runner import ModelRunner, layer_windows
from .sampler import Sampler
from .scheduler import Scheduler

__all__ = [
    "CompileConfig",
    "CompiledDecode",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "ModelRunner",
    "RequestMetrics",
    "RequestOutput",
    "Sampler",
    "SamplingParams",
    "Scheduler",
    "StepPlan",
    "TokenLogprobs",
    "enable_engine_generate",
    "layer_windows",
    "model_engine",
]

register_option(
    "compile",
    CompileConfig,
    {
        "inductor": CompileConfig,
        "inductor-dynamic": lambda: CompileConfig(dynamic=True),
        "aot-eager": lambda: CompileConfig(backend="aot_eager"),
    },
    description="compiled decode step in the batching engine (torch.compile; CUDA graphs on GPU)",
    true_alias="inductor",
)
