"""Paged attention: causal attention of ragged query batches over a block-paged KV cache.

Layout (the same "NHD" paged layout as flash-attn's ``flash_attn_with_kvcache`` and FlashInfer):

* ``k_cache``, ``v_cache``: ``[num_blocks, block_size, Hkv, D]``, one layer's pool. Token ``j`` of
  a sequence lives in block ``block_tables[b, j // block_size]`` at row ``j % block_size``. Token-
  major blocks make the cache write one ``index_copy_`` of ``[Hkv, D]`` rows per new token; the
  kernels read each ``[block_size, D]`` tile of one head with a row stride of ``Hkv * D``.
* ``block_tables``: ``int32 [B, max_blocks]``; entries past a sequence's last block are ignored.
* ``seq_lens``: ``int32 [B]``, tokens in the cache per sequence, *including* this step's queries
  (the cache is written before attention runs).
* Queries are packed (varlen): ``q [N, Hq, D]``; sequence ``b`` owns rows
  ``query_start_loc[b] : query_start_loc[b + 1]`` (``int32 [B + 1]``), which are its *last*
  ``n_b`` tokens: query ``i`` sits at position ``seq_lens[b] - n_b + i`` and attends causally to
  cache positions ``0 ..= that position``. Decode is the special case ``n_b == 1``.

Quantized caches: ``k_cache``/``v_cache`` may be ``int8`` or ``float8_e4m3fn`` with ``k_scale``/
``v_scale`` ``float32 [num_blocks, block_size, Hkv]``, one scale per token and KV head; the value
of a cached element is ``float(stored) * scale``. Every backend dequantizes rows as it reads them
(the reference dequantizes the gathered blocks).

Sliding window (``window``, an int >= 1; None = full causal attention): the query at position
``p`` attends to keys ``j`` with ``p - window < j <= p`` (``window`` keys, itself included; HF
transformers' ``sliding_window_overlay`` convention). Keys before the window are never read: every
backend starts its block loop at the first block holding a key of the window (and the reference
gathers only the blocks it needs), so block-table entries whose blocks lie entirely before the
earliest window start of a sequence's queries may hold anything (a freed block, 0, an
out-of-range id).

Logit soft-capping (``softcap``, a float > 0; None = off): scores become
``softcap * tanh(scale * q.k / softcap)`` before the softmax (Gemma 2's
``attn_logit_softcapping``, applied after the scale as in HF's eager Gemma 2 attention).

GQA/MQA: ``Hq`` must be a multiple of ``Hkv``; query head ``h`` reads KV head ``h // (Hq / Hkv)``.
The kernels process the ``Hq / Hkv`` query heads of one KV head together, so each KV tile is loaded
once per group and never repeated in memory.

Math: scores, softmax and the weighted sum in fp32 (online softmax over blocks in the kernels),
output rounded once to ``q.dtype``. Backends: ``reference`` (gather + SDPA), ``cpp``
(``csrc/cpu/paged_attention.cpp``), ``triton`` (``triton_kernels/paged_attention.py``). The kernels
are inference-only; inputs that require grad run on the reference.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

from . import extensions
from ._triton import is_interpreted, triton_status
from .registry import Backend, BackendImpl, register_op, select_backend

__all__ = [
    "paged_attention_decode",
    "paged_attention_decode_reference",
    "paged_attention_prefill",
    "paged_attention_prefill_reference",
]


def paged_attention_prefill_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Pure-torch oracle: gather each sequence's KV, then fp32 SDPA with a causal offset mask.

    q ``[N, Hq, D]``; k/v_cache ``[num_blocks, block_size, Hkv, D]``; block_tables ``int32 [B,
    max_blocks]``; seq_lens ``int32 [B]``; query_start_loc ``int32 [B + 1]``; k/v_scale ``float32
    [num_blocks, block_size, Hkv]`` for int8/fp8 caches (gathered rows are multiplied by them);
    ``window`` / ``softcap`` as in the module docstring (only the blocks from the first one
    holding a key of some query's window are gathered). Returns ``[N, Hq, D]`` in ``q.dtype``.
    Loops over sequences on the host (an oracle, not a fast path).
    """
    window, softcap = _check_window_softcap(window, softcap)
    _check_values(q, k_cache, block_tables, seq_lens, query_start_loc, window)
    block_size = k_cache.shape[1]
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    out = torch.zeros_like(q)
    qsl = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[b], qsl[b + 1]
        n = q1 - q0
        if n == 0:
            continue
        first = _first_block(length, n, block_size, window)
        start = first * block_size  # position of the first gathered key
        blocks = block_tables[b, first : -(-length // block_size)].long()
        k = k_cache[blocks].reshape(-1, hkv, d)[: length - start].float()  # [L', Hkv, D]
        v = v_cache[blocks].reshape(-1, hkv, d)[: length - start].float()
        if k_scale is not None:
            k = k * k_scale[blocks].reshape(-1, hkv)[: length - start, :, None]
            v = v * v_scale[blocks].reshape(-1, hkv)[: length - start, :, None]
        pos = torch.arange(length - n, length, device=q.device)[:, None]  # [n, 1]
        kpos = torch.arange(start, length, device=q.device)[None, :]  # [1, L']
        mask = kpos <= pos  # [n, L']
        if window is not None:
            mask = mask & (kpos > pos - window)
        qb = q[q0:q1].transpose(0, 1).float()[None]  # [1, Hq, n, D]
        kb = k.transpose(0, 1)[None]  # [1, Hkv, L', D]
        vb = v.transpose(0, 1)[None]
        if softcap is None:
            o = F.scaled_dot_product_attention(
                qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True
            )
        else:
            group = q.shape[1] // hkv
            kb, vb = kb.repeat_interleave(group, 1), vb.repeat_interleave(group, 1)
            s = (qb @ kb.transpose(-1, -2)) * scale
            s = torch.tanh(s / softcap) * softcap
            s = s.masked_fill(~mask, float("-inf"))
            o = torch.softmax(s, dim=-1) @ vb
        out[q0:q1] = o[0].transpose(0, 1).to(q.dtype)
    return out


def paged_attention_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode oracle: one query per sequence at its last position. q ``[B, Hq, D]`` -> same."""
    qsl = _decode_qsl(seq_lens)
    return paged_attention_prefill_reference(
        q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, k_scale, v_scale, window, softcap
    )


def _decode_qsl(seq_lens: torch.Tensor) -> torch.Tensor:
    return torch.arange(seq_lens.shape[0] + 1, dtype=torch.int32, device=seq_lens.device)


def _first_block(length: int, n: int, block_size: int, window: int | None) -> int:
    """Index in the block table of the first block holding a key that one of a sequence's ``n``
    queries (at positions ``length - n .. length - 1``) attends to; 0 without a window."""
    if window is None:
        return 0
    return max(0, length - n - window + 1) // block_size


def _check_window_softcap(window, softcap) -> tuple[int | None, float | None]:
    """Validate ``window`` / ``softcap``; returns them normalized to ``int`` / ``float``."""
    if window is not None:
        if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1:
            raise ValueError(
                f"window must be None (full causal attention) or an int >= 1 (keys attended, "
                f"the query's own included), got {window!r}"
            )
        window = int(window)
    if softcap is not None:
        if (
            not isinstance(softcap, numbers.Real)
            or isinstance(softcap, bool)
            or not math.isfinite(softcap)
            or softcap <= 0
        ):
            raise ValueError(
                f"softcap must be None (no logit soft-capping) or a finite real number > 0, "
                f"got {softcap!r}"
            )
        softcap = float(softcap)
    return window, softcap


def _check_values(q, k_cache, block_tables, seq_lens, query_start_loc, window=None) -> None:
    """Host-side value checks (they sync): used by the reference; the C++ kernel has its own.

    With a ``window``, table entries before a sequence's first needed block are not checked
    (they are never read)."""
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    cap = block_tables.shape[1] * k_cache.shape[1]
    if qsl[0] != 0 or qsl[-1] != q.shape[0]:
        raise ValueError(f"query_start_loc must start at 0 and end at N={q.shape[0]}, got {qsl}")
    for b, length in enumerate(lens):
        n = qsl[b + 1] - qsl[b]
        if n < 0 or n > length or length > cap:
            raise ValueError(
                f"sequence {b}: need 0 <= query len ({n}) <= seq_len ({length}) <= "
                f"max_blocks * block_size ({cap})"
            )
        first = _first_block(length, n, k_cache.shape[1], window)
        used = block_tables[b, first : -(-length // k_cache.shape[1])]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= k_cache.shape[0]):
            raise ValueError(f"sequence {b}: block id out of range [0, {k_cache.shape[0]})")


QUANT_CACHE_DTYPES = (torch.int8, torch.float8_e4m3fn)


def _validate(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    scale,
    k_scale,
    v_scale,
    window=None,
    softcap=None,
) -> tuple[int | None, float | None]:
    """Type/shape checks (no sync); returns ``(window, softcap)`` normalized."""
    for name, t in (
        ("q", q),
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("block_tables", block_tables),
        ("seq_lens", seq_lens),
        ("query_start_loc", query_start_loc),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not q.is_floating_point() or q.dim() != 3:
        raise ValueError(f"q must be a floating [N, Hq, D] tensor, got {q.dtype} {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    quant = k_cache.dtype in QUANT_CACHE_DTYPES
    if v_cache.dtype != k_cache.dtype or (k_cache.dtype != q.dtype and not quant):
        raise ValueError(
            f"k/v_cache dtype must equal q.dtype={q.dtype} or both be one of "
            f"{[str(t) for t in QUANT_CACHE_DTYPES]}, got {k_cache.dtype} / {v_cache.dtype}"
        )
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    if quant != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError(
            "k_scale and v_scale are required with int8/float8_e4m3fn caches and only then "
            f"(cache dtype {k_cache.dtype}, k_scale given: {k_scale is not None}, v_scale given: "
            f"{v_scale is not None})"
        )
    want = (k_cache.shape[0], k_cache.shape[1], hkv)
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != torch.float32 or tuple(t.shape) != want or t.device != q.device:
            raise ValueError(
                f"{name} must be float32 [num_blocks, block_size, Hkv] = {list(want)} on "
                f"{q.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if k_cache.shape[3] != d:
        raise ValueError(f"head_dim mismatch: q has D={d}, k_cache has D={k_cache.shape[3]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv} (GQA/MQA)")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        raise ValueError(
            f"block_tables must be int32 [B, max_blocks], got {block_tables.dtype} "
            f"{tuple(block_tables.shape)}"
        )
    b = block_tables.shape[0]
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (b,):
        raise ValueError(
            f"seq_lens must be int32 [B={b}], got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    if query_start_loc.dtype != torch.int32 or tuple(query_start_loc.shape) != (b + 1,):
        raise ValueError(
            f"query_start_loc must be int32 [B + 1 = {b + 1}], got {query_start_loc.dtype} "
            f"{tuple(query_start_loc.shape)}"
        )
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    return _check_window_softcap(window, softcap)


def _kernel_supports(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    scale,
    k_scale=None,
    v_scale=None,
    window=None,
    softcap=None,
):
    # (the dtype and autograd checks every kernel shares run in the registry first)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return "k/v_cache head_dim must be unit-stride"
    if k_scale is not None and not (k_scale.is_contiguous() and v_scale.is_contiguous()):
        return "k/v_scale must be contiguous"
    return None


# --- cpp: the dispatcher op torch.ops.infopt.paged_attention (schema in csrc/cpu/schema.cpp) ---


def _paged_attention_op(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    scale,
    k_scale=None,
    v_scale=None,
    window=None,
    softcap=None,
):
    return torch.ops.infopt.paged_attention.default(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        float(scale),
        k_scale,
        v_scale,
        window,
        softcap,
    )


# --- triton: launcher (the kernel itself lives in triton_kernels/paged_attention.py) ---


def _triton_kernel():
    from .triton_kernels.paged_attention import paged_attention_kernel

    return paged_attention_kernel


def _triton_probe(device_type: str) -> str | None:
    return triton_status(device_type, _triton_kernel)


def _paged_attention_triton(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    scale,
    k_scale=None,
    v_scale=None,
    window=None,
    softcap=None,
):
    """One program per (query token, KV head); see the kernel for the loop structure."""
    import triton

    kernel = _triton_kernel()
    n, hq, d = q.shape
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    group = hq // hkv
    # The interpreter truncates fp32 -> bf16/fp16; write fp32 there and round with torch (RNE).
    soft = is_interpreted(kernel) and q.dtype != torch.float32
    out = torch.empty(q.shape, dtype=torch.float32 if soft else q.dtype, device=q.device)
    if n == 0:
        return out.to(q.dtype)
    q = q if q.stride(-1) == 1 else q.contiguous()
    # Per query token: its sequence and absolute position (host-free, a few tiny torch ops).
    qlens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    seq_idx = torch.repeat_interleave(
        torch.arange(len(qlens), device=q.device), qlens, output_size=n
    )
    local = torch.arange(n, device=q.device) - query_start_loc[:-1].long()[seq_idx]
    q_pos = (seq_lens.long()[seq_idx] - qlens[seq_idx] + local).to(torch.int32)
    seq_idx = seq_idx.to(torch.int32)
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    quant = k_scale is not None
    if quant:
        # Scales are read at (block * block_size + token) * Hkv + head: contiguous layout.
        ks, vs = k_scale, v_scale
    else:
        ks = vs = out  # never read (QUANT=False); any pointer will do
    if k_cache.dtype == torch.float8_e4m3fn:
        # fp8 is passed as its raw bytes and decoded in the kernel (exact), which works where
        # the backend (the CPU interpreter, older GPUs) has no native e4m3 load.
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with guard:
        kernel[(n, hkv)](
            q,
            k_cache,
            v_cache,
            out,
            bt,
            seq_idx,
            q_pos,
            ks,
            vs,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            bt.stride(0),
            hkv,
            float(scale),
            window if window is not None else 0,
            float(softcap) if softcap is not None else 1.0,
            GROUP=group,
            GROUP_P=max(triton.next_power_of_2(group), 1),
            D=d,
            D_P=triton.next_power_of_2(d),
            BLOCK_SIZE=block_size,
            QUANT=quant,
            FP8=k_cache.dtype == torch.uint8,
            SLIDING=window is not None,
            SOFTCAP=softcap is not None,
            num_warps=4,
        )
    return out.to(q.dtype) if soft else out


_IMPLS = {
    Backend.CPP: BackendImpl(_paged_attention_op, extensions.cpp_probe, _kernel_supports),
    Backend.TRITON: BackendImpl(_paged_attention_triton, _triton_probe, _kernel_supports),
}
register_op("paged_attention_prefill", paged_attention_prefill_reference, _IMPLS)


def _decode_ref_packed(*args):
    return paged_attention_prefill_reference(*args)


# Decode shares the varlen kernels (n_b == 1); registered separately so reports show each use.
register_op("paged_attention_decode", _decode_ref_packed, dict(_IMPLS))


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """Causal varlen attention of packed queries over a paged KV cache (see the module docstring).

    Args:
        q: ``[N, Hq, D]`` queries of all sequences, packed back to back.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]`` in ``q.dtype``, or ``int8`` /
            ``float8_e4m3fn`` with scales (already holding this step's keys/values).
        block_tables: ``int32 [B, max_blocks]``.
        seq_lens: ``int32 [B]`` cached tokens per sequence, this step's included.
        query_start_loc: ``int32 [B + 1]`` cumulative query counts (``[0, n_0, n_0 + n_1, ...]``);
            a sequence may have 0 queries.
        scale: softmax scale (usually ``D ** -0.5``).
        k_scale, v_scale: ``float32 [num_blocks, block_size, Hkv]`` per-token, per-head scales of
            a quantized cache (required for int8/fp8 caches, rejected otherwise).
        window: sliding window: the query at position ``p`` attends to keys ``p - window < j <=
            p`` only (``window`` keys, itself included); None = full causal attention. Table
            entries of blocks entirely before the earliest window start are never read.
        softcap: logit soft-cap: scores become ``softcap * tanh(scale * q.k / softcap)`` before
            the softmax (Gemma 2); None = off.
        backend: per-call backend override (see :mod:`infopt.ops`).

    Returns:
        ``[N, Hq, D]`` in ``q.dtype``.
    """
    qsl = query_start_loc
    window, softcap = _validate(
        q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, k_scale, v_scale, window, softcap
    )
    args = (q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, k_scale, v_scale)
    args += (window, softcap)
    _, fn = select_backend("paged_attention_prefill", q.device, args, backend)
    return fn(*args)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """One query per sequence at its last cached position (``seq_lens[b] - 1``).

    q ``[B, Hq, D]``; k/v_cache ``[num_blocks, block_size, Hkv, D]`` (or int8/fp8 with k/v_scale
    ``float32 [num_blocks, block_size, Hkv]``); block_tables ``int32 [B, max_blocks]``; seq_lens
    ``int32 [B]`` (each ``>= 1``); ``window`` / ``softcap`` as in
    :func:`paged_attention_prefill`. Returns ``[B, Hq, D]`` in ``q.dtype``.
    """
    if isinstance(seq_lens, torch.Tensor) and isinstance(q, torch.Tensor):
        if q.dim() == 3 and seq_lens.dim() == 1 and q.shape[0] != seq_lens.shape[0]:
            raise ValueError(f"q has B={q.shape[0]} rows but seq_lens has {seq_lens.shape[0]}")
        qsl = _decode_qsl(seq_lens)
    else:
        qsl = seq_lens  # let _validate name the bad argument
    window, softcap = _validate(
        q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, k_scale, v_scale, window, softcap
    )
    args = (q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, k_scale, v_scale)
    args += (window, softcap)
    _, fn = select_backend("paged_attention_decode", q.device, args, backend)
    return fn(*args)
