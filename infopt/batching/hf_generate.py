"""``model.generate`` on the engine: the ``wrap_model(kv=...)`` handler.

After ``wrap_model(model, kv="paged" | "paged-prefix" | "paged-int8" | "paged-fp8" | KVConfig)``
a call to ``model.generate`` submits each row of its batch to the model's
:class:`~infopt.batching.Engine` (one per model, built at wrap time, so a prefix-caching pool
persists across calls) and assembles HF's output ``[B * num_return_sequences, T + new]``:
left-padded prompts as given, generated tokens, ``pad_token_id`` after a row's EOS.

The engine covers greedy and sampling (temperature / top-k / top-p, HF's defaults), EOS and
min/max lengths, ``num_return_sequences`` and a streamer (batch 1). Anything else HF's
``generate`` can do (beam search, scores, logits processors, repetition penalties, assisted
decoding, ...) runs on the :class:`~infopt.kvcache.PagedCache` layer over the same pool and
kernels, and the reason is logged. Eviction policies (``policy="streaming" / "h2o"``) are
cache-layer features: those configs keep the PagedCache path for every call.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch

from ..kvcache import hf as kv_hf
from ..kvcache.allocator import OutOfBlocksError
from ..kvcache.config import KVConfig
from ..options import register_handler, set_technique_state
from .compiled import CompileConfig
from .engine import Engine
from .params import EngineConfig, SamplingParams
from .spec import build_proposer

__all__ = ["enable_engine_generate", "model_engine"]

_log = logging.getLogger(__name__)

# generate() arguments the engine implements; any other non-default one takes the PagedCache
# path (see _unsupported).
_ENGINE_FIELDS = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature",
    "top_k", "top_p", "eos_token_id", "pad_token_id", "bos_token_id", "num_return_sequences",
    "use_cache", "decoder_start_token_id", "transformers_version", "_from_model_config",
    "cache_implementation", "return_legacy_cache",
}  # fmt: skip
_MODEL_KWARGS = {"attention_mask", "use_cache"}


def model_engine(model: Any) -> Engine | None:
    """The engine behind a kv-wrapped model's ``generate`` (``None`` if there is none)."""
    state = kv_hf.kv_state(model)
    return None if state is None else state.engine


def engine_config_for(kv: KVConfig) -> EngineConfig:
    """The engine settings a :class:`KVConfig` describes (block size, pool, dtype, prefix)."""
    num_blocks = None
    if kv.num_blocks is not None or kv.max_tokens is not None:
        num_blocks = kv.resolve_num_blocks(1)
    return EngineConfig(
        block_size=kv.block_size,
        num_blocks=num_blocks,
        kv_cache_dtype=kv.cache_dtype,
        enable_prefix_caching=kv.prefix_caching,
    )


def enable_engine_generate(model: Any, config: KVConfig) -> Any:
    """Route ``model.generate`` through a new :class:`Engine` (in place). See the module doc."""
    ecfg = engine_config_for(config)
    if config.max_bytes is not None:  # bytes -> blocks needs the model's per-token size
        probe = Engine(model, None, EngineConfig(block_size=config.block_size, num_blocks=1,
                                                 kv_cache_dtype=config.cache_dtype))
        per_block = probe.runner.bytes_per_block
        ecfg = EngineConfig(block_size=config.block_size,
                            num_blocks=config.resolve_num_blocks(per_block),
                            kv_cache_dtype=config.cache_dtype,
                            enable_prefix_caching=config.prefix_caching)
    previous = kv_hf.kv_state(model)
    old_impl = previous.previous_attn if previous else model.config._attn_implementation
    original = previous.original_generate if previous else model.generate
    engine = Engine(model, None, ecfg)  # switches attention to "infopt_paged"

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        reason = _unsupported(model, args, kwargs)
        if reason is not None:
            _log.info("generate(%s): not an engine feature; running the PagedCache path", reason)
            return kv_hf.paged_cache_generate(model, original, config, args, kwargs)
        return _engine_generate(model, engine, args, kwargs)

    def attach_spec(spec: Any) -> None:
        # wrap_model(spec=...) after kv=: the proposer joins this engine (one generation loop)
        # instead of wrapping generate a second time.
        engine.proposer = build_proposer(spec, model, engine.config, engine.max_model_len)
        engine.config = dataclasses.replace(engine.config, speculative=spec)

    generate.infopt_native_min_new_tokens = True  # type: ignore[attr-defined]
    model.generate = generate
    state = kv_hf.KVState(config, original, old_impl, pool=engine.runner.pool,  # one pool for
                          engine=engine, attach_spec=attach_spec)  # both paths
    set_technique_state(model, kv_hf.KV_STATE, state)
    return model


def _unsupported(model: Any, args: tuple, kwargs: dict) -> str | None:
    """Why this call cannot run on the engine (``None``: it can)."""
    if len(args) > 1:
        return "positional arguments after inputs"
    for name in ("logits_processor", "stopping_criteria"):
        if kwargs.get(name):
            return name
    for name in ("prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids",
                 "custom_generate", "past_key_values", "inputs_embeds", "synced_gpus"):
        if kwargs.get(name) is not None and kwargs.get(name) is not False:
            return name
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        return "inputs that are not a [B, T] LongTensor of token ids"
    passthrough = {"input_ids", "inputs", "attention_mask", "streamer", "generation_config",
                   "logits_processor", "stopping_criteria"}
    gen_kwargs = {k: v for k, v in kwargs.items() if k not in passthrough}
    gen, extra = model._prepare_generation_config(kwargs.get("generation_config"), **gen_kwargs)
    leftover = sorted(set(extra) - _MODEL_KWARGS)
    if leftover:
        return f"model kwargs {leftover}"
    defaults = type(gen)._get_default_generation_params()
    for name, value in gen.to_dict().items():
        if name in _ENGINE_FIELDS or name.startswith("_"):
            continue
        if name in defaults:
            if value is not None and value != defaults[name]:
                return f"{name}={value!r}"
        elif value not in (None, False, {}, []):
            return f"{name}={value!r}"
    if gen.num_beams and gen.num_beams > 1:
        return "num_beams > 1"
    return None


def _engine_generate(model: Any, engine: Engine, args: tuple, kwargs: dict) -> torch.Tensor:
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    passthrough = {"input_ids", "inputs", "attention_mask", "streamer", "generation_config"}
    gen, _ = model._prepare_generation_config(
        kwargs.get("generation_config"), **{k: v for k, v in kwargs.items() if k not in passthrough}
    )
    batch, t = ids.shape
    eos = gen.eos_token_id
    eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
    mask = kwargs.get("attention_mask")
    if mask is None and gen.pad_token_id is not None and gen.pad_token_id not in eos:
        mask = (ids != gen.pad_token_id).long()  # HF infers padding the same way
    rows = _rows(ids, mask)
    max_new = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length - t
    if max_new < 1:
        raise ValueError(
            f"generate: max_length={gen.max_length} leaves no room after the {t}-token input; "
            "set max_new_tokens"
        )
    min_new = gen.min_new_tokens if gen.min_new_tokens is not None else max(
        0, (gen.min_length or 0) - t)
    sp = SamplingParams(
        max_tokens=max_new,
        min_tokens=min(min_new, max_new),
        temperature=float(gen.temperature) if gen.do_sample else 0.0,
        top_k=int(gen.top_k or 0) if gen.do_sample else 0,
        top_p=float(gen.top_p if gen.top_p is not None else 1.0) if gen.do_sample else 1.0,
        stop_token_ids=tuple(eos),
        ignore_eos=True,  # EOS comes from this call's generation config, as stop ids
    )
    k = gen.num_return_sequences or 1
    prompts = [r for r in rows for _ in range(k)]
    _check_pool(engine, max(len(r) for r in rows) + max_new)
    streamer = kwargs.get("streamer")
    if streamer is not None:
        if len(prompts) != 1:
            raise ValueError("`streamer` cannot be used with beam search or batch size > 1")
        streamer.put(ids.cpu())
        gen_tokens: list[tuple[int, ...]] = []
        for out in engine.stream(prompts[0], sp):
            for tok in out.new_token_ids:
                streamer.put(torch.tensor([tok]))
            if out.finished:
                _raise_if_failed(out)
                gen_tokens.append(out.token_ids)
        streamer.end()
    else:
        outs = engine.generate(prompts, sp, use_tqdm=False)
        for out in outs:
            _raise_if_failed(out)
        gen_tokens = [o.token_ids for o in outs]
    longest = max(len(g) for g in gen_tokens)
    result = torch.full((len(prompts), t + longest), pad, dtype=torch.long, device=ids.device)
    result[:, :t] = ids.repeat_interleave(k, 0)
    for i, g in enumerate(gen_tokens):
        result[i, t : t + len(g)] = torch.tensor(g, dtype=torch.long)
    return result


def _check_pool(engine: Engine, longest: int) -> None:
    """A sequence the whole pool cannot hold fails before anything runs, as the PagedCache
    path does (a batch larger than the pool is fine: the engine queues and preempts)."""
    if engine.scheduler.evict_window is not None:
        return
    bs = engine.config.block_size
    need, total = -(-longest // bs), engine.runner.pool.num_blocks
    if need > total:
        raise OutOfBlocksError(need, total, total, f"one sequence of {longest} tokens")


def _raise_if_failed(out: Any) -> None:
    if out.finish_reason == "error":
        raise ValueError(f"generate: {out.error}")


def _rows(ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's real tokens; padding must be on the left (as HF requires for decoders)."""
    if mask is None:
        return ids.tolist()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
    out = []
    for b, (row, m) in enumerate(zip(ids.tolist(), mask.bool().tolist())):
        first = m.index(True) if True in m else len(m)
        if not all(m[first:]) or first == len(m):
            raise ValueError(
                f"generate: row {b} of attention_mask is not left padding followed by tokens; "
                "decoder-only generation needs left padding (tokenizer.padding_side = 'left')"
            )
        out.append(row[first:])
    return out


@register_handler(KVConfig)
def _apply_kv(model: Any, config: KVConfig) -> Any:
    if config.policy != "full":  # eviction policies live in the PagedCache layer
        return kv_hf.enable_paged(model, config)
    return enable_engine_generate(model, config)


@register_handler(CompileConfig)
def _apply_compile(model: Any, config: CompileConfig) -> Any:
    """``wrap_model(compile=...)``: the decode steps of the model's engine run compiled. A
    model without ``kv=`` gets the engine with the default paged pool first (``kv="paged"``):
    the compiled step is the engine's, and ``generate`` runs on the engine."""
    if not hasattr(model, "generate"):
        raise TypeError(f"compile= needs a model with generate(); got {type(model).__name__}")
    engine = model_engine(model)
    if engine is None:
        if kv_hf.kv_state(model) is not None:
            raise ValueError(
                "compile= runs on the batching engine, but this model's kv= option uses the "
                "PagedCache layer (an eviction policy); use kv='paged' / 'paged-prefix' / "
                "'paged-int8' / 'paged-fp8' with compile="
            )
        enable_engine_generate(model, KVConfig())
        engine = model_engine(model)
    engine.enable_compile(config)
    return model
