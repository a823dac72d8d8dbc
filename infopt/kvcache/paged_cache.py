"""``PagedCache``: a transformers ``Cache`` whose layers live in shared block pools.

Per layer the pool is ``k_pool`` / ``v_pool`` ``[num_blocks, block_size, Hkv, D]`` (the layout of
:mod:`infopt.ops.paged_attention`), held by a :class:`~infopt.kvcache.pool.KVPool` that the cache
owns or, with prefix caching, shares with later caches; block ids are shared by all layers, so the
host-side :class:`~infopt.kvcache.allocator.BlockManager` does one allocation per step for the
whole model. An eviction policy (:mod:`infopt.kvcache.policy`) may free blocks before each step.

How it meets transformers: a decoder layer calls ``cache.update(k, v, layer_idx)`` and passes
the result to the attention function named by ``config._attn_implementation``. ``update`` only
*stashes* the new ``[B, Hkv, T, D]`` states and returns that layer's pools, tagged with their
layer; the ``"infopt_paged"`` attention function (:mod:`infopt.kvcache.hf`) then sees the
attention mask, works out which new tokens are real (left padding is not stored), writes them
into their slots and runs the paged kernels. The per-step slot plan (allocation, copy-on-write,
block tables) is built by the first layer of a forward and reused by the others.

Positions: HF counts padded positions (``get_seq_length`` is the padded length, identical for all
rows); the pools hold only real tokens, so each row's kernel ``seq_len`` is its real count.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import KVConfig
from .policy import make_policy
from .pool import KVPool
from .prefix import PrefixCachingAllocator, block_hashes

__all__ = ["PagedCache", "PagedLayer", "StepPlan", "get_paged_layer"]

_TAG = "_infopt_paged_layer"


@dataclass
class StepPlan:
    """Where one forward's new tokens go; built once, used by every layer.

    ``valid_index``: long ``[N]`` rows of the flattened ``[B * T]`` new tokens that are real
    (``None`` when all are); ``slots``: long ``[N]`` flat pool rows; ``block_tables`` int32
    ``[B, max_blocks]``, ``seq_lens`` int32 ``[B]``, ``query_start_loc`` int32 ``[B + 1]``.
    """

    hf_start: int
    batch: int
    q_len: int
    valid_index: torch.Tensor | None
    slots: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    decode: bool


def get_paged_layer(t: torch.Tensor) -> PagedLayer | None:
    """The :class:`PagedLayer` whose pool ``t`` is, or ``None`` (an ordinary K/V tensor)."""
    ref = getattr(t, _TAG, None)
    return ref() if ref is not None else None


class PagedLayer(CacheLayerMixin):
    """One decoder layer's view of a :class:`PagedCache` (its pools and HF-visible length)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False  # the pools are allocated up front; no lazy init from shapes

    def __init__(self, cache: PagedCache, layer_idx: int):
        super().__init__()
        self._cache = weakref.ref(cache)  # no cycle: pools go away with the cache
        self.layer_idx = layer_idx
        self.hf_len = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True

    @property
    def cache(self) -> PagedCache:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the PagedCache owning this layer was garbage-collected")
        return cache

    def set_pools(self, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
        setattr(k_pool, _TAG, weakref.ref(self))
        setattr(v_pool, _TAG, weakref.ref(self))
        self.keys, self.values = k_pool, v_pool

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # pools exist from construction

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stash the new ``[B, Hkv, T, D]`` states; return this layer's (tagged) pools."""
        cache = self.cache
        impl = getattr(cache.model_config, "_attn_implementation", "infopt_paged")
        if impl != "infopt_paged":
            raise RuntimeError(
                f"PagedCache needs the model's attn_implementation to be 'infopt_paged', got "
                f"{impl!r}; wrap the model with wrap_model(model, kv=...) or enable_paged(model)"
            )
        if self.pending is not None:
            raise RuntimeError(
                f"PagedCache layer {self.layer_idx}: the previous step's keys/values were never "
                "consumed by the 'infopt_paged' attention function. The model's attention does "
                "not dispatch through transformers' AttentionInterface, or its "
                "config._attn_implementation is not 'infopt_paged' (use wrap_model(model, "
                "kv=...) or model.set_attn_implementation('infopt_paged'))."
            )
        cache.check_states(key_states, value_states, self.layer_idx)
        self.pending = (key_states, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.hf_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.hf_len

    def get_max_length(self) -> int:
        return -1

    # Batch-level edits act on the shared block tables once, so they live on PagedCache.
    def reset(self) -> None:
        self.hf_len, self.pending = 0, None

    def crop(self, tokens_to_remove: int) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass


class PagedCache(Cache):
    """A paged KV cache for a HuggingFace decoder; pass it as ``past_key_values``.

    Args:
        config: the :class:`KVConfig` (block size, pool size).
        num_layers, num_kv_heads, head_dim: the model's attention shapes.
        dtype, device: of the pools (the model's K/V dtype and device).
        tokens_hint: pool size in tokens when ``config`` fixes none (e.g. batch x max_length).

    Rows of the HF batch become sequences of :attr:`manager` on the first forward. The model
    must run the ``"infopt_paged"`` attention function (see :func:`infopt.kvcache.enable_paged`).
    """

    def __init__(
        self,
        config: KVConfig,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        tokens_hint: int | None = None,
        pool: KVPool | None = None,
    ):
        super().__init__(layers=[PagedLayer(self, i) for i in range(num_layers)])
        if pool is None:
            pool = KVPool(
                config,
                num_layers=num_layers,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                dtype=dtype,
                device=device,
                tokens_hint=tokens_hint,
            )
        else:
            have = (pool.num_layers, pool.num_kv_heads, pool.head_dim)
            if have != (num_layers, num_kv_heads, head_dim):
                raise ValueError(
                    f"pool shapes (layers, Hkv, D) = {have} do not match the cache's "
                    f"{(num_layers, num_kv_heads, head_dim)}"
                )
        self.pool = pool
        self.kv_config = pool.config
        self.block_size = pool.block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = pool.dtype, pool.device
        self.bytes_per_token = pool.bytes_per_token
        self.growable = pool.growable
        self.manager = pool.manager
        self.policy = make_policy(pool.config)
        self._attach()
        self.seq_ids: list[int] | None = None  # HF batch row -> manager sequence id
        self.pads: list[int] = []  # leading padded HF positions per row (never stored)
        self._plan: StepPlan | None = None
        self.model_config: Any = None  # set by from_model: lets update() check the attention

    @classmethod
    def from_model(
        cls,
        model: Any,
        config: KVConfig | None = None,
        tokens_hint: int | None = None,
        pool: KVPool | None = None,
    ) -> PagedCache:
        """Size a cache from a HF model's config (text config for multimodal models); with
        ``pool``, use that (shared, persistent) pool instead of allocating one."""
        from .hf import attention_shapes

        num_layers, num_kv_heads, head_dim = attention_shapes(model)
        param = next(model.parameters())
        cache = cls(
            config or (pool.config if pool is not None else KVConfig()),
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=param.dtype,
            device=param.device,
            tokens_hint=tokens_hint,
            pool=pool,
        )
        cache.model_config = model.config
        return cache

    def _attach(self) -> None:
        # Each layer gets views of the pool tensors tagged with itself: the attention function
        # finds its layer (and this cache) from the K/V HF hands it. Views, because a shared
        # pool's tensors are reused by later caches, which tag their own views.
        for layer in self.layers:
            k, v = self.pool.k[layer.layer_idx], self.pool.v[layer.layer_idx]
            layer.set_pools(k.view_as(k), v.view_as(v))

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def _grow(self, min_free: int) -> None:
        self.pool.grow(min_free)
        self._attach()

    def check_states(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> None:
        want = (self.num_kv_heads, self.head_dim)
        if k.dim() != 4 or (k.shape[1], k.shape[3]) != want or v.shape != k.shape:
            raise ValueError(
                f"PagedCache layer {layer_idx}: expected key/value states [B, Hkv={want[0]}, T, "
                f"D={want[1]}], got {tuple(k.shape)} / {tuple(v.shape)}"
            )
        if k.device != self.device:
            raise ValueError(
                f"PagedCache is on {self.device} but layer {layer_idx} is on {k.device}"
            )

    # --- the per-forward plan -------------------------------------------------------------

    def plan_for(self, layer: PagedLayer, batch: int, q_len: int, mask: Any) -> StepPlan:
        """The slot plan of the forward that ``layer`` is in (built by its first layer)."""
        p = self._plan
        if p is not None and (p.hf_start, p.batch, p.q_len) == (layer.hf_len, batch, q_len):
            return p
        if any(other.hf_len != layer.hf_len for other in self.layers):
            lens = sorted({other.hf_len for other in self.layers})
            raise RuntimeError(
                f"PagedCache: layers are out of step (lengths {lens}); a forward was interrupted "
                "or some attention layer did not run 'infopt_paged'. Call reset()."
            )
        self._plan = self._build_plan(layer.hf_len, batch, q_len, mask)
        return self._plan

    def _build_plan(self, hf_start: int, batch: int, q_len: int, mask: Any) -> StepPlan:
        from .hf import real_token_mask

        if self.seq_ids is None:
            self.seq_ids = [self.manager.add_sequence() for _ in range(batch)]
            self.pads = [0] * batch
        if len(self.seq_ids) != batch:
            raise ValueError(f"PagedCache holds {len(self.seq_ids)} sequences, got batch {batch}")
        valid = real_token_mask(mask, batch, q_len, hf_start)  # host bool lists [B][T]
        new_pads, counts = [], {}
        for b, row in enumerate(valid):
            n_real = sum(row)
            pad = q_len - n_real
            if row != [False] * pad + [True] * n_real:
                raise NotImplementedError(
                    f"infopt_paged: row {b} of the attention mask has padding after real tokens; "
                    "only left padding is supported (tokenizer.padding_side = 'left')"
                )
            sid = self.seq_ids[b]
            if pad and self.manager.seqs[sid].num_tokens:
                raise NotImplementedError(
                    f"infopt_paged: row {b} got padding after it already holds tokens"
                )
            new_pads.append(self.pads[b] + pad)
            counts[sid] = n_real
        if mask is not None:
            from .hf import check_mask

            check_mask(mask, hf_start, q_len, new_pads)
        elif any(new_pads):
            raise ValueError("infopt_paged: got no attention mask but earlier steps had padding")
        for sid, n in counts.items():  # bounded-memory policies free blocks before the step
            self.policy.evict(self.manager, sid, n)
        if self.growable and not self.manager.can_append(counts):
            self._grow(sum(self.manager.blocks_needed(s, n) for s, n in counts.items()))
        slot_plan = self.manager.append(counts)  # OutOfBlocksError here changes nothing
        self.pads = new_pads
        self.pool.copy_blocks(slot_plan.copies)  # copy-on-write of shared partial blocks
        return self._tensors(hf_start, batch, q_len, valid, slot_plan.slots)

    def _tensors(self, hf_start, batch, q_len, valid, slots) -> StepPlan:
        seqs = [self.manager.seqs[s] for s in self.seq_ids]
        max_blocks = max(1, max(len(s.blocks) for s in seqs))
        table = torch.zeros(batch, max_blocks, dtype=torch.int32)  # padding entries are never read
        for b, s in enumerate(seqs):
            table[b, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        n_real = [sum(row) for row in valid]
        qsl = [0]
        for n in n_real:
            qsl.append(qsl[-1] + n)
        all_valid = all(n == q_len for n in n_real)
        index = None
        if not all_valid:
            flat = [b * q_len + t for b, row in enumerate(valid) for t, ok in enumerate(row) if ok]
            index = torch.tensor(flat, dtype=torch.long, device=self.device)
        flat_slots = [x for s in self.seq_ids for x in slots[s]]
        dev = self.device
        return StepPlan(
            hf_start=hf_start,
            batch=batch,
            q_len=q_len,
            valid_index=index,
            slots=torch.tensor(flat_slots, dtype=torch.long, device=dev),
            block_tables=table.to(dev),
            seq_lens=torch.tensor([s.num_tokens for s in seqs], dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            decode=all_valid and q_len == 1,
        )

    # --- transformers Cache API (batch-level edits) ---------------------------------------

    def _set_hf_len(self, n: int) -> None:
        for layer in self.layers:
            layer.hf_len, layer.pending = n, None
        self._plan = None

    def reset(self) -> None:
        """Free every sequence; the pools stay allocated for reuse."""
        for sid in self.seq_ids or []:
            self.manager.free_sequence(sid)
            self.policy.forget(sid)
        self.seq_ids, self.pads = None, []
        self._set_hf_len(0)

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many trailing tokens; ``>= 0``: keep that many positions (legacy)."""
        hf_len = self.get_seq_length()
        target = hf_len + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        if target >= hf_len:
            return
        drop = hf_len - target
        for sid in self.seq_ids or []:
            seq = self.manager.seqs[sid]
            if drop > seq.num_tokens:
                raise ValueError(f"cannot crop {drop} tokens: a row holds only {seq.num_tokens}")
            self.manager.truncate(sid, seq.num_tokens - drop)
            self.policy.truncate(sid, seq.num_tokens)
        self._set_hf_len(target)

    def _reselect(self, rows: list[int]) -> None:
        # New rows share their source rows' blocks (refcounted); appends copy-on-write.
        if self.seq_ids is None:
            return
        old_ids, old_pads = self.seq_ids, self.pads
        self.seq_ids = [self.manager.fork(old_ids[r]) for r in rows]
        for r, sid in zip(rows, self.seq_ids):
            self.policy.fork(old_ids[r], sid)
        self.pads = [old_pads[r] for r in rows]
        for sid in old_ids:
            self.manager.free_sequence(sid)
            self.policy.forget(sid)
        self._plan = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reselect([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reselect([r for r in range(len(self.seq_ids or [])) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reselect([int(i) for i in torch.as_tensor(indices).tolist()])

    def observe_attention(self, layer_idx: int, q: torch.Tensor, plan: StepPlan, scale: float):
        """For H2O: add the attention probability each stored token got from this step's packed
        queries ``q [N, Hq, D]`` (summed over heads and queries) to its sequence's score. Reads
        the stored (dequantized) keys, so it sees exactly what the kernels attended to."""
        k_pool = self.pool.k[layer_idx]
        k_scale, _ = self.pool.scales(layer_idx)
        hkv, d = self.num_kv_heads, self.head_dim
        group = q.shape[1] // hkv
        qsl = plan.query_start_loc.tolist()
        for b, sid in enumerate(self.seq_ids or []):
            n = qsl[b + 1] - qsl[b]
            if n == 0:
                continue
            seq = self.manager.seqs[sid]
            length = seq.num_tokens
            blocks = torch.tensor(seq.blocks, dtype=torch.long, device=self.device)
            k = k_pool[blocks].reshape(-1, hkv, d)[:length].float()
            if k_scale is not None:
                k = k * k_scale[blocks].reshape(-1, hkv)[:length, :, None]
            k = k.repeat_interleave(group, dim=1)  # [L, Hq, D]
            logits = torch.einsum("nhd,lhd->hnl", q[qsl[b] : qsl[b + 1]].float(), k) * scale
            pos = torch.arange(length - n, length, device=self.device)
            causal = torch.arange(length, device=self.device)[None, :] <= pos[:, None]
            probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)  # [Hq, n, L]
            self.policy.add_scores(sid, probs.sum((0, 1)))

    # --- prefix caching (a pool with a PrefixCachingAllocator) ----------------------------

    def reuse_prefix(self, input_ids: torch.Tensor, padded: bool = False, expand: int = 1) -> int:
        """Start every row of an empty cache on the cached blocks of its prompt's longest cached
        prefix; returns the tokens reused per row (HF then runs the prefill on the rest).

        input_ids ``[B, T]``. All rows reuse the same count (HF keeps one cache length): the
        smallest match, capped at ``T - 1`` so the last prompt token is still computed (its
        logits start generation). A match ending inside a block shares that block and the first
        append copies it (copy-on-write). ``padded=True`` (rows with left padding) skips the
        lookup: every prompt token counts as a miss. ``expand``: HF will run each prompt as that
        many consecutive rows (``max(num_beams, num_return_sequences)``); they share the blocks.
        """
        alloc = self.manager.allocator
        if not isinstance(alloc, PrefixCachingAllocator):
            raise ValueError("reuse_prefix needs a pool built with KVConfig(prefix_caching=True)")
        if self.seq_ids is not None:
            raise RuntimeError("reuse_prefix needs an empty cache (call it before generate)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
        if not isinstance(expand, int) or expand < 1:
            raise ValueError(f"expand must be a positive int, got {expand!r}")
        rows = input_ids.tolist()
        batch, t = input_ids.shape
        bs = self.block_size
        matches = [] if padded else [alloc.match(block_hashes(r, bs)) for r in rows]
        reuse = 0 if padded or t == 0 else min(min(len(m) for m in matches) * bs, t - 1)
        used_blocks = -(-reuse // bs)
        st = alloc.stats
        st.requests += batch
        st.hit_tokens += batch * reuse
        st.miss_tokens += batch * (t - reuse)
        st.hit_blocks += batch * used_blocks
        st.miss_blocks += batch * (-(-t // bs) - used_blocks)
        if reuse == 0:
            return 0
        self.seq_ids = []
        for m in matches:
            for _ in range(expand):
                alloc.acquire(m[:used_blocks])
                self.seq_ids.append(self.manager.adopt(m[:used_blocks], reuse))
        self.pads = [0] * batch * expand
        self._set_hf_len(reuse)
        return reuse

    def release(self, rows_tokens: list[list[int]] | None = None) -> None:
        """Name each row's full blocks by their tokens (``rows_tokens[b]``: row b's real tokens,
        at least what it stored, padding stripped) so later requests can reuse them, then free
        every sequence (:meth:`reset`). Without a prefix-caching pool or tokens it only frees."""
        alloc = self.manager.allocator
        if rows_tokens is not None and isinstance(alloc, PrefixCachingAllocator):
            if len(rows_tokens) != len(self.seq_ids or []):
                raise ValueError(
                    f"release got tokens for {len(rows_tokens)} rows, the cache holds "
                    f"{len(self.seq_ids or [])}"
                )
            bs = self.block_size
            for sid, toks in zip(self.seq_ids or [], rows_tokens):
                seq = self.manager.seqs[sid]
                n_full = min(seq.num_tokens, len(toks)) // bs
                alloc.register(seq.blocks[:n_full], block_hashes(toks[: n_full * bs], bs))
        self.reset()

    # --- accounting -----------------------------------------------------------------------

    def seq_lens(self) -> list[int]:
        """Real (stored) tokens per batch row."""
        return [self.manager.seqs[s].num_tokens for s in self.seq_ids or []]

    def memory_stats(self) -> dict[str, Any]:
        """Bytes of K+V over all layers: ``reserved`` (the pools), ``allocated`` (blocks held by
        sequences), ``used`` (slots holding tokens), ``waste = allocated - used`` and
        ``waste_pct = 100 * waste / allocated`` (the partial last blocks). ``bytes_per_token``
        counts an int8/fp8 pool's scales; ``model_dtype_bytes_per_token`` is what the same token
        costs at the model's dtype (the ratio of the two is the quantized pool's saving)."""
        alloc = self.manager.allocator
        allocated_slots, used_slots = self.manager.token_counts()
        allocated = allocated_slots * self.bytes_per_token
        used = used_slots * self.bytes_per_token
        return {
            "block_size": self.block_size,
            "num_blocks": alloc.num_blocks,
            "free_blocks": alloc.num_free,
            "cached_free_blocks": getattr(alloc, "num_cached_free", 0),
            "cache_dtype": str(self.pool.storage_dtype).removeprefix("torch."),
            "bytes_per_token": self.bytes_per_token,
            "model_dtype_bytes_per_token": self.pool.model_dtype_bytes_per_token,
            "reserved_bytes": self.pool.reserved_bytes(),
            "allocated_bytes": allocated,
            "used_bytes": used,
            "waste_bytes": allocated - used,
            "waste_pct": 100.0 * (allocated - used) / allocated if allocated else 0.0,
        }
