"""Plan-driven paged attention: the forward context a model runner sets around one forward.

A model runner (the batching engine's) sets a :class:`ForwardContext` (the step's slot mapping,
block tables, sequence lengths and query offsets as tensors, plus the KV pool) around one
forward of the HF model over a flat ragged batch ``[1, N]``. The ``"infopt_paged"`` attention
function (:mod:`infopt.kvcache.hf`) sees the context and calls :func:`plan_attention`: each
layer writes its new K/V into the pool at the planned slots and attends through
:func:`infopt.ops.paged_attention_prefill`. Nothing is reconstructed from HF's masks: the mask
function registered for ``"infopt_paged"`` returns ``None`` while a context is set, so HF
builds no ``[N, N]`` mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops
from .pool import KVPool

__all__ = ["ForwardContext", "PagedRows", "current_context", "forward_context", "plan_attention"]

_LOCAL = threading.local()


@dataclasses.dataclass
class ForwardContext:
    """One step's plan as tensors (on the model's device).

    slot_mapping ``int64 [N]``; block_tables ``int32 [B, max_blocks]``; seq_lens ``int32 [B]``;
    query_start_loc ``int32 [B + 1]``; layer_windows ``[num_layers]`` (``None``: full).

    ``fresh``: flat row ranges ``(q0, q1)`` of sequences that compute all their tokens from
    position 0 in this step (a first prefill). Their keys are all in this step's states, so
    attention over them is a causal SDPA (a BLAS-backed kernel, about twice the paged
    kernel's speed on long prompts, and what the model computes without the engine); the other
    sequences (``rest``) go through the paged kernel. Empty: everything is paged.
    """

    pool: KVPool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    layer_windows: tuple[int | None, ...]
    fresh: tuple[tuple[int, int], ...] = ()
    rest: PagedRows | None = None


@dataclasses.dataclass
class PagedRows:
    """The sequences of a step that are not ``fresh``, as their own varlen batch: flat rows
    ``rows`` ``int64 [M]`` and that subset's block tables, lengths and query offsets."""

    rows: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor


def current_context() -> ForwardContext | None:
    return getattr(_LOCAL, "ctx", None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    """Make ``ctx`` visible to the attention layers of forwards run in this thread."""
    prev = current_context()
    _LOCAL.ctx = ctx
    try:
        yield
    finally:
        _LOCAL.ctx = prev


def plan_attention(
    ctx: ForwardContext,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One layer's attention under ``ctx``. query ``[1, Hq, N, D]``, key/value
    ``[1, Hkv, N, D]`` (this step's tokens, RoPE applied). Returns ``([1, N, Hq, D], None)``."""
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"the infopt engine does not support attention {name!r}")
    if not getattr(module, "is_causal", True):
        raise NotImplementedError("the infopt engine runs causal (decoder) attention only")
    if dropout and module.training:
        raise NotImplementedError("the infopt engine is inference-only (attention dropout > 0)")
    if query.shape[0] != 1:
        raise ValueError(
            f"the engine runs one flat ragged batch [1, N]; got batch {query.shape[0]}"
        )
    layer = module.layer_idx
    planned = ctx.layer_windows[layer] if layer < len(ctx.layer_windows) else None
    if sliding_window != planned:
        # The scheduler frees blocks by the planned windows: attending wider would read them.
        raise RuntimeError(
            f"layer {layer} attends with sliding_window={sliding_window}, but the engine "
            f"planned {planned} from the model config; the config's layer_types / "
            "sliding_window do not describe this model"
        )
    _, hq, n, d = query.shape
    q = query[0].transpose(0, 1).contiguous()  # [N, Hq, D]
    k = key[0].transpose(0, 1)  # [N, Hkv, D]
    v = value[0].transpose(0, 1)
    pool = ctx.pool
    pool.write(layer, ctx.slot_mapping, k, v)
    scale = float(scaling) if scaling is not None else d**-0.5
    if ctx.fresh and softcap is None and (
        planned is None or max(q1 - q0 for q0, q1 in ctx.fresh) <= planned
    ):
        return _split_attention(ctx, layer, planned, q, k, v, scale, query.dtype), None
    k_scale, v_scale = pool.scales(layer)
    extra = {}
    if planned is not None:
        extra["window"] = planned
    if softcap is not None:
        extra["softcap"] = float(softcap)
    out = ops.paged_attention_prefill(
        q.to(pool.dtype),
        pool.k[layer],
        pool.v[layer],
        ctx.block_tables,
        ctx.seq_lens,
        ctx.query_start_loc,
        scale,
        k_scale=k_scale,
        v_scale=v_scale,
        **extra,
    )
    return out.to(query.dtype).unsqueeze(0), None


def _split_attention(ctx: ForwardContext, layer: int, window: int | None, q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, scale: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """Fresh sequences by causal SDPA on this step's K/V (an int8/fp8 pool is read only by later
    steps, as vLLM does), the rest by the paged kernel. q ``[N, Hq, D]``, k/v ``[N, Hkv, D]``
    -> ``[1, N, Hq, D]``. ``window`` is at least every fresh sequence's length here, so the
    window masks nothing."""
    pool = ctx.pool
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for q0, q1 in ctx.fresh:
        o = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1)[None], k[q0:q1].transpose(0, 1)[None].to(q.dtype),
            v[q0:q1].transpose(0, 1)[None].to(q.dtype), is_causal=True, scale=scale,
            enable_gqa=True,
        )  # fmt: skip
        out[q0:q1] = o[0].transpose(0, 1).to(dtype)
    rest = ctx.rest
    if rest is not None:
        k_scale, v_scale = pool.scales(layer)
        extra = {"window": window} if window is not None else {}
        o = ops.paged_attention_prefill(
            q.index_select(0, rest.rows).to(pool.dtype), pool.k[layer], pool.v[layer],
            rest.block_tables, rest.seq_lens, rest.query_start_loc, scale,
            k_scale=k_scale, v_scale=v_scale, **extra,
        )  # fmt: skip
        out.index_copy_(0, rest.rows, o.to(dtype))
    return out.unsqueeze(0)
