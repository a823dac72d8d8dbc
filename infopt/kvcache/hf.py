"""transformers integration: the ``"infopt_paged"`` attention function and ``enable_paged``.

Supported hooks only (transformers 5.17-5.23): the function is registered with
``AttentionInterface.register`` and gets the same mask as ``sdpa`` (``AttentionMaskInterface``
maps the name to the ``"sdpa"`` mask function); models switch to it with
``model.set_attn_implementation``; ``generate`` gets a :class:`PagedCache` from an *instance*
attribute wrapping the bound ``generate`` (no class is patched).

When the attention function receives ordinary K/V (no cache, or another ``Cache``) it runs HF's
own ``sdpa`` function, so a wrapped model still does plain forwards (perplexity, training-style
calls) exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .. import ops
from ..options import clear_technique_state, set_technique_state, technique_state
from .config import KVConfig
from .forward import current_context, plan_attention
from .paged_cache import PagedCache, get_paged_layer
from .pool import KVPool

__all__ = [
    "ATTN_NAME",
    "KVState",
    "attention_shapes",
    "disable_paged",
    "enable_paged",
    "kv_state",
    "model_pool",
    "paged_cache_generate",
    "register",
    "switch_to_paged",
]

ATTN_NAME = "infopt_paged"
#: The kv cache's entry in the model's state object (:class:`infopt.options.WrapState`).
KV_STATE = "kv"


@dataclasses.dataclass
class KVState:
    """What ``kv=...`` keeps on a wrapped model (``technique_state(model, "kv")``).

    Attributes:
        config: the applied :class:`KVConfig`.
        original_generate: the model's ``generate`` before it was wrapped (bound method).
        previous_attn: its attention implementation before it was switched to ``infopt_paged``.
        pool: the persistent :class:`KVPool` (prefix caching, or the engine's pool), built on
            first use.
        engine: the :class:`~infopt.batching.Engine` behind ``generate`` (set by
            :mod:`infopt.batching`; ``None`` on the PagedCache-only path).
        attach_spec: ``fn(spec_config)`` that joins a ``spec=`` proposer to that engine.
    """

    config: KVConfig
    original_generate: Callable[..., Any]
    previous_attn: Any
    pool: KVPool | None = None
    engine: Any = None
    attach_spec: Callable[[Any], None] | None = None


def kv_state(model: Any) -> KVState | None:
    """The :class:`KVState` of a model wrapped with ``kv=...`` (``None`` otherwise)."""
    state = technique_state(model, KV_STATE)
    return state if isinstance(state, KVState) else None


def attention_shapes(model: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` from a HF model's (text) config."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def real_token_mask(mask: Any, batch: int, q_len: int, hf_start: int) -> list[list[bool]]:
    """Which of this step's ``[B, T]`` new tokens are real (not padding), from the sdpa-style
    mask ``[B|1, 1, T, hf_start + T]`` (bool, or additive float): a token is real iff it may
    attend to itself. ``None`` means no padding."""
    if mask is None:
        return [[True] * q_len for _ in range(batch)]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise NotImplementedError(
            f"infopt_paged expects a 4-D sdpa-style attention mask or None, got "
            f"{type(mask).__name__} {getattr(mask, 'shape', '')}"
        )
    if mask.shape[-1] != hf_start + q_len or mask.shape[-2] != q_len:
        raise ValueError(
            f"infopt_paged: mask {tuple(mask.shape)} does not match {hf_start} cached + {q_len} "
            "new positions"
        )
    t = torch.arange(q_len, device=mask.device)
    diag = _allowed(mask[:, 0, t, hf_start + t])  # [B|1, T]
    return diag.expand(batch, q_len).tolist()


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask == 0


def check_mask(mask: torch.Tensor, hf_start: int, q_len: int, pads: list[int]) -> None:
    """Raise unless ``mask`` is exactly causal attention over non-padding keys."""
    kv = hf_start + q_len
    j = torch.arange(kv, device=mask.device)
    causal = j[None, :] <= hf_start + torch.arange(q_len, device=mask.device)[:, None]  # [T, kv]
    not_pad = j[None, :] >= torch.tensor(pads, device=mask.device)[:, None]  # [B, kv]
    expected = causal[None] & not_pad[:, None]  # [B, T, kv]
    if not torch.equal(_allowed(mask[:, 0]).expand_as(expected), expected):
        raise NotImplementedError(
            "infopt_paged supports causal attention with left padding only; this model passed "
            "a different mask (bidirectional/prefix, sliding window or custom mask functions)"
        )


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function. Three cases, checked in this order:

    * a :class:`~infopt.kvcache.forward.ForwardContext` is set (a model runner's step over a
      flat ragged batch): :func:`~infopt.kvcache.forward.plan_attention` with the plan;
    * key/value are a :class:`PagedCache` layer's pools: the cache's own plan;
    * ordinary ``[B, Hkv, S, D]`` states: HF ``sdpa``.

    query ``[B, Hq, T, D]``. Returns ``([B, T, Hq, D], None)`` like every HF attention function.
    """
    ctx = current_context()
    if ctx is not None:
        return plan_attention(ctx, module, query, key, value, dropout, scaling, **kwargs)
    layer = get_paged_layer(key)
    if layer is None:
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _check_features(module, dropout, kwargs)
    cache = layer.cache
    k_new, v_new = layer.pending
    layer.pending = None
    batch, hq, q_len, d = query.shape
    hkv = k_new.shape[1]
    plan = cache.plan_for(layer, batch, q_len, attention_mask)

    def pack(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, H, T, D] -> [N, H, D]
        x = x.transpose(1, 2).reshape(batch * q_len, heads, d)
        return x if plan.valid_index is None else x.index_select(0, plan.valid_index)

    cache.pool.write(layer.layer_idx, plan.slots, pack(k_new, hkv), pack(v_new, hkv))
    q = pack(query, hq).to(cache.pool.dtype)  # the model's dtype (a quantized pool's too)
    scale = float(scaling) if scaling is not None else d**-0.5
    if cache.policy.needs_scores:  # H2O: accumulate the attention each stored token receives
        cache.observe_attention(layer.layer_idx, q, plan, scale)
    if plan.hf_start == 0 and not plan.decode:
        # Prefill from an empty cache: every key is in this step's states, so HF's own sdpa
        # (a BLAS-backed fused kernel) computes exactly what the paged kernel would, faster for
        # long prompts and bit-identical to the unwrapped model. The pool was written above.
        # With an int8/fp8 pool the prompt attends to its unquantized states (as vLLM does);
        # every later step reads the quantized cache.
        layer.hf_len += q_len
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(
            module, query, k_new, v_new, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    k_scale, v_scale = cache.pool.scales(layer.layer_idx)
    if plan.decode:
        out = ops.paged_attention_decode(
            q,
            layer.keys,
            layer.values,
            plan.block_tables,
            plan.seq_lens,
            scale,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    else:
        out = ops.paged_attention_prefill(
            q,
            layer.keys,
            layer.values,
            plan.block_tables,
            plan.seq_lens,
            plan.query_start_loc,
            scale,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    out = out.to(query.dtype)
    if plan.valid_index is not None:  # padding rows: zeros (HF's are garbage nobody reads)
        full = out.new_zeros(batch * q_len, hq, d)
        full.index_copy_(0, plan.valid_index, out)
        out = full
    layer.hf_len += q_len
    return out.view(batch, q_len, hq, d), None


def _check_features(module: torch.nn.Module, dropout: float, kwargs: dict) -> None:
    # Attention variants the paged kernels don't implement: fail loudly, never approximate.
    for name in ("sliding_window", "softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"infopt_paged does not support attention {name!r} yet")
    if not getattr(module, "is_causal", True):
        raise NotImplementedError("infopt_paged supports causal (decoder) attention only")
    if dropout and module.training:
        raise NotImplementedError("infopt_paged is inference-only (attention dropout > 0)")


def register() -> None:
    """Register ``"infopt_paged"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    # Same 4-D boolean mask as sdpa, so the non-paged fallback is exactly HF sdpa; none at all
    # under a forward context (the plan carries the causal structure, no [N, N] mask is built).
    AttentionMaskInterface.register(ATTN_NAME, _paged_mask)


def _paged_mask(*args: Any, **kwargs: Any) -> Any:
    if current_context() is not None:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def _check_model(model: Any) -> None:
    if not all(hasattr(model, a) for a in ("config", "generate", "set_attn_implementation")):
        raise TypeError(
            "kv=... needs a transformers PreTrainedModel (config, generate, "
            f"set_attn_implementation); got {type(model).__name__}"
        )
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    if getattr(cfg, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"{type(model).__name__}: encoder-decoder models are not supported"
        )
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise NotImplementedError(
            f"{type(model).__name__} has layer types {sorted(kinds)}; the paged cache supports "
            "full-attention layers only (no sliding-window/linear/hybrid layers yet)"
        )


def _tokens_hint(model: Any, config: KVConfig, args: tuple, kwargs: dict) -> int | None:
    """Pool size for one generate call: rows x max_length rounded up to whole blocks."""
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    rows, prompt = ids.shape
    gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    max_new = kwargs.get("max_new_tokens", getattr(gen, "max_new_tokens", None))
    total = prompt + max_new if max_new else kwargs.get("max_length", getattr(gen, "max_length", 0))
    total = max(total or 0, prompt + 1)
    for name in ("num_beams", "num_return_sequences"):
        rows *= max(1, kwargs.get(name, getattr(gen, name, 1)) or 1)
    bs = config.block_size
    return rows * -(-total // bs) * bs


def switch_to_paged(model: Any) -> None:
    """Register ``"infopt_paged"`` and make ``model`` attend through it; ``ValueError`` naming
    the cause when its attention does not dispatch through transformers' AttentionInterface."""
    register()
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception as e:
        raise ValueError(f"{type(model).__name__} cannot switch to {ATTN_NAME!r}: {e}") from e
    if model.config._attn_implementation != ATTN_NAME:
        raise ValueError(
            f"{type(model).__name__} cannot use the paged KV cache: its attention modules do not "
            "dispatch through transformers' AttentionInterface (attn_implementation stayed "
            f"{model.config._attn_implementation!r})"
        )


def enable_paged(model: Any, config: KVConfig | None = None) -> Any:
    """Make ``model`` attend through the paged kernels and ``model.generate`` use a fresh
    :class:`PagedCache` per call (unless the caller passes ``past_key_values``). In place.

    Raises ``TypeError`` for non-HF modules and ``ValueError``/``NotImplementedError`` naming the
    cause for models whose attention cannot use transformers' AttentionInterface.
    """
    config = config or KVConfig()
    _check_model(model)
    previous = kv_state(model)
    old_impl = previous.previous_attn if previous else model.config._attn_implementation
    switch_to_paged(model)
    original = previous.original_generate if previous else model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        return paged_cache_generate(model, original, config, args, kwargs)

    model.generate = generate  # instance attribute: shadows the class method for this model only
    # A fresh state: a pool built for an earlier config is dropped.
    set_technique_state(model, KV_STATE, KVState(config, original, old_impl))
    return model


def paged_cache_generate(model: Any, original: Any, config: KVConfig, args: tuple,
                         kwargs: dict) -> Any:
    """HF's own ``generate`` (``original``) on a fresh :class:`PagedCache` (or the model's
    persistent pool with prefix caching), unless the caller brought a cache or disabled it."""
    if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) is not False:
        hint = _tokens_hint(model, config, args, kwargs)
        if config.prefix_caching:
            return _generate_prefix_cached(model, original, config, hint, args, kwargs)
        kwargs["past_key_values"] = PagedCache.from_model(model, config, tokens_hint=hint)
    return original(*args, **kwargs)


def model_pool(model: Any, config: KVConfig, tokens_hint: int | None = None) -> KVPool:
    """The persistent pool a prefix-caching model owns (built on first use, rebuilt if the model
    moved to another dtype/device). Sized by ``config``, else by the first call's
    ``tokens_hint`` and grown on demand."""
    param = next(model.parameters())
    state = kv_state(model)
    pool = None if state is None else state.pool
    if pool is None or (pool.dtype, pool.device) != (param.dtype, param.device):
        num_layers, num_kv_heads, head_dim = attention_shapes(model)
        pool = KVPool(
            config,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=param.dtype,
            device=param.device,
            tokens_hint=tokens_hint,
        )
        if state is not None:
            state.pool = pool
    return pool


def _generate_prefix_cached(model, original, config, hint, args, kwargs):
    """``generate`` on the model's persistent pool: reuse the prompt's cached prefix, then name
    the rows' full blocks so later calls can reuse them."""
    cache = PagedCache.from_model(model, pool=model_pool(model, config, hint))
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if (
        kwargs.get("inputs_embeds") is not None
        or not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
    ):
        ids = None  # nothing to look up or name: the rows are only freed at the end
    mask = kwargs.get("attention_mask")
    if ids is not None:
        gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        expand = max(
            kwargs.get("num_beams", getattr(gen, "num_beams", 1)) or 1,
            kwargs.get("num_return_sequences", getattr(gen, "num_return_sequences", 1)) or 1,
        )
        cache.reuse_prefix(ids, padded=_has_padding(model, ids, mask, kwargs), expand=expand)
    kwargs["past_key_values"] = cache
    rows_tokens = None
    try:
        out = original(*args, **kwargs)
        if ids is not None:
            rows_tokens = _rows_tokens(model, cache, ids, mask, out, kwargs)
        return out
    finally:
        cache.release(rows_tokens)  # frees the rows even if generate raised


def _has_padding(model: Any, ids: torch.Tensor, mask: Any, kwargs: dict) -> bool:
    if isinstance(mask, torch.Tensor):
        return not bool(mask.all())
    # No mask: HF masks pad tokens found in the prompt itself (when pad != eos).
    gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    pad = kwargs.get("pad_token_id", getattr(gen, "pad_token_id", None))
    return pad is not None and bool((ids == pad).any())


def _rows_tokens(model, cache, ids, mask, out, kwargs) -> list[list[int]] | None:
    """Each cache row's real tokens, for naming its blocks: the generated sequences when rows
    map 1:1 onto them (no beam search), else each row's prompt (beams reorder rows)."""
    if cache.seq_ids is None:
        return None
    seqs = getattr(out, "sequences", out)
    rows = len(cache.seq_ids)
    gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(gen, "num_beams", 1)) or 1
    if isinstance(seqs, torch.Tensor) and seqs.dim() == 2 and seqs.shape[0] == rows and beams == 1:
        return [r[p:] for r, p in zip(seqs.tolist(), cache.pads)]
    if rows % ids.shape[0]:
        return None
    keep = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool)
    prompts = [r[k].tolist() for r, k in zip(ids, keep)]
    expand = rows // ids.shape[0]
    return [prompts[i // expand] for i in range(rows)]


def disable_paged(model: Any) -> Any:
    """Undo :func:`enable_paged`: the class's ``generate`` and the previous attention again."""
    previous = kv_state(model)
    if previous is None:
        return model
    del model.generate  # the instance attribute; the class method shows through again
    model.set_attn_implementation(previous.previous_attn)
    clear_technique_state(model, KV_STATE)  # its pool and engine with it
    return model
