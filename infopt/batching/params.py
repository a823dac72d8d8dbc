"""User-facing parameters of the engine: :class:`SamplingParams` (per request) and
:class:`EngineConfig` (per engine). Both validate on construction; every error names the field and
the accepted values, so bad input never reaches the scheduler.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

__all__ = ["EngineConfig", "SamplingParams"]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_int(owner: str, name: str, v: Any, lo: int | None = None, hi: int | None = None,
               optional: bool = False) -> None:
    if v is None and optional:
        return
    bounds = [f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else ""]
    rng = " and ".join(b for b in bounds if b)
    rng = f"an integer {rng}".rstrip()
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{owner}.{name} must be {rng}{' or None' if optional else ''}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded (vLLM's names and defaults).

    Attributes:
        max_tokens: new tokens at most (>= 1). Generation also stops at the engine's
            ``max_model_len`` (finish reason ``"length"`` either way).
        min_tokens: EOS and ``stop_token_ids`` are masked until this many tokens exist (0..max).
        temperature: 0 is greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus sampling: the smallest set of most likely tokens whose probability
            reaches ``top_p`` (1.0 = all); in (0, 1].
        seed: per-request RNG seed: the request's samples do not depend on what else is in the
            batch. ``None`` draws a seed from torch's global RNG when the request is added.
        stop: strings that end the request when the decoded output contains one; the output
            text is cut before it (the tokens are kept).
        stop_token_ids: token ids that end the request (kept in the output, like EOS).
        ignore_eos: keep generating past the model's EOS token(s).
        logprobs: ``None``: none; ``k >= 0``: the sampled token's log-probability plus the
            ``k`` most likely tokens' (from the model's raw distribution) at every step.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        o = "SamplingParams"
        _check_int(o, "max_tokens", self.max_tokens, lo=1)
        _check_int(o, "min_tokens", self.min_tokens, lo=0, hi=self.max_tokens)
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or (
            self.temperature < 0
        ):
            raise ValueError(
                f"{o}.temperature must be a finite number >= 0 (0 = greedy), got "
                f"{self.temperature!r}"
            )
        _check_int(o, "top_k", self.top_k, lo=0)
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"{o}.top_p must be in (0, 1], got {self.top_p!r}")
        _check_int(o, "seed", self.seed, lo=0, hi=2**63 - 1, optional=True)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(
            isinstance(s, str) and s for s in stop
        ):
            raise ValueError(f"{o}.stop must be a string or a list of non-empty strings, got "
                             f"{self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(
                f"{o}.stop_token_ids must be a list of token ids (integers >= 0), got {ids!r}"
            )
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"{o}.ignore_eos must be True or False, got {self.ignore_eos!r}")
        _check_int(o, "logprobs", self.logprobs, lo=0, hi=20, optional=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


KV_CACHE_DTYPES = ("auto", "int8", "fp8")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes and switches of one :class:`~infopt.batching.Engine`.

    Attributes:
        max_num_seqs: requests running at once (decoding or prefilling).
        max_num_batched_tokens: tokens computed per step over all requests (the token budget:
            decodes take one each, prefills take chunks of what is left).
        block_size: tokens per KV block (a power of two).
        num_blocks: KV pool size in blocks. ``None``: sized by ``memory_fraction``.
        memory_fraction: share of the device's free memory given to the KV pool when
            ``num_blocks`` is ``None`` (default 0.2 on CPU, where the pool shares RAM with
            everything else); the pool never exceeds what ``max_num_seqs`` requests of
            ``max_model_len`` tokens can use.
        max_model_len: longest sequence (prompt + output). ``None``: the model's
            ``max_position_embeddings``.
        enable_prefix_caching: full blocks are content-addressed and reused by later requests
            with the same token prefix (their prefill skips those tokens).
        kv_cache_dtype: ``"auto"`` (the model's dtype), ``"int8"`` or ``"fp8"`` (per-token,
            per-head scales; see :mod:`infopt.kvcache.kvquant`).
        speculative: a ``wrap_model(spec=...)`` config whose proposer drafts tokens for the
            decoding requests (``PromptLookupConfig``; see :mod:`infopt.batching.spec`), or
            ``None``.
        spec_disable_batch_size: no drafts in a step where more requests than this are running
            (a full batch gains nothing from verifying guesses).
        compile: a :class:`~infopt.batching.compiled.CompileConfig`: decode-only steps run a
            ``torch.compile``-d forward over fixed batch buckets (see
            :mod:`infopt.batching.compiled`); ``None``: every step runs eager.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = False
    kv_cache_dtype: str = "auto"
    speculative: Any = None
    spec_disable_batch_size: int = 4
    compile: Any = None

    def __post_init__(self) -> None:
        o = "EngineConfig"
        _check_int(o, "max_num_seqs", self.max_num_seqs, lo=1)
        _check_int(o, "max_num_batched_tokens", self.max_num_batched_tokens, lo=1)
        bs = self.block_size
        if not _is_int(bs) or bs <= 0 or bs & (bs - 1):
            raise ValueError(f"{o}.block_size must be a power of two, got {bs!r}")
        _check_int(o, "num_blocks", self.num_blocks, lo=1, optional=True)
        mf = self.memory_fraction
        if mf is not None and (not _is_real(mf) or not 0 < mf <= 0.95):
            raise ValueError(f"{o}.memory_fraction must be in (0, 0.95] or None, got {mf!r}")
        if mf is not None and self.num_blocks is not None:
            raise ValueError(f"{o}: set num_blocks or memory_fraction, not both")
        _check_int(o, "max_model_len", self.max_model_len, lo=2, optional=True)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"{o}.enable_prefix_caching must be True or False, got "
                f"{self.enable_prefix_caching!r}"
            )
        _check_int(o, "spec_disable_batch_size", self.spec_disable_batch_size, lo=1)
        if self.speculative is not None and type(self.speculative).__name__ not in (
            "PromptLookupConfig", "DraftModelConfig", "LayerSkipConfig"
        ):
            raise ValueError(
                f"{o}.speculative must be None or a wrap_model(spec=...) config "
                f"(PromptLookupConfig), got {type(self.speculative).__name__}"
            )
        from .compiled import CompileConfig

        if self.compile is not None and not isinstance(self.compile, CompileConfig):
            raise ValueError(
                f"{o}.compile must be None or a CompileConfig, got {type(self.compile).__name__}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"{o}.kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
