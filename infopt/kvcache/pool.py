"""``KVPool``: the block-paged K/V tensors of every layer plus the host-side block manager.

A pool can outlive the :class:`~infopt.kvcache.cache.PagedCache` objects that use it: with prefix
caching the wrapped model owns one pool and each ``generate`` call gets a fresh cache on top of
it, so full blocks computed by one request are found by the next.

Per layer: ``k[i]`` / ``v[i]`` ``[num_blocks, block_size, Hkv, D]`` (the paged layout of
:mod:`infopt.ops.paged_attention`), in the model's dtype or, for ``cache_dtype="int8"/"fp8"``,
quantized with ``k_scale[i]`` / ``v_scale[i]`` fp32 ``[num_blocks, block_size, Hkv]`` (one scale
per token and KV head). Block ids are shared by all layers, so one allocation per step serves the
whole model.
"""

from __future__ import annotations

import torch

from .allocator import BlockAllocator, BlockManager
from .config import KVConfig
from .kvquant import quantize_kv
from .prefix import PrefixCachingAllocator

_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

__all__ = ["KVPool"]


class KVPool:
    """K/V storage for ``num_layers`` layers and the :class:`BlockManager` that hands it out.

    Args:
        config: block size, pool size, prefix caching.
        num_layers, num_kv_heads, head_dim: the model's attention shapes.
        dtype, device: the model's K/V dtype and device.
        tokens_hint: pool size in tokens when ``config`` fixes none.
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
    ):
        self.config = config
        self.block_size = config.block_size
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)  # the model's K/V dtype
        self.storage_dtype = _STORAGE.get(config.cache_dtype, dtype)
        self.quantized = config.cache_dtype in _STORAGE
        elem = torch.empty((), dtype=self.storage_dtype).element_size()
        # K and V (and their fp32 scales) of every layer for one token: the unit of all memory
        # accounting.
        per_head = head_dim * elem + (4 if self.quantized else 0)
        self.bytes_per_token = 2 * num_layers * num_kv_heads * per_head
        model_elem = torch.empty((), dtype=dtype).element_size()
        self.model_dtype_bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * model_elem
        num_blocks = config.resolve_num_blocks(self.bytes_per_token * self.block_size, tokens_hint)
        self.growable = not config.fixed
        if config.prefix_caching:
            alloc: BlockAllocator = PrefixCachingAllocator(
                num_blocks, self.block_size, ttl_s=config.prefix_ttl_s
            )
        else:
            alloc = BlockAllocator(num_blocks, self.block_size)
        self.manager = BlockManager(alloc)
        self.k = [self._new(num_blocks) for _ in range(num_layers)]
        self.v = [self._new(num_blocks) for _ in range(num_layers)]
        n_sc = num_layers if self.quantized else 0
        self.k_scale = [self._new(num_blocks, scale=True) for _ in range(n_sc)]
        self.v_scale = [self._new(num_blocks, scale=True) for _ in range(n_sc)]

    def _new(self, num_blocks: int, scale: bool = False) -> torch.Tensor:
        # Uninitialized: the kernels only read slots below each sequence's length.
        shape = (num_blocks, self.block_size, self.num_kv_heads)
        if scale:
            return torch.empty(shape, dtype=torch.float32, device=self.device)
        return torch.empty((*shape, self.head_dim), dtype=self.storage_dtype, device=self.device)

    def _all(self) -> list[tuple[list[torch.Tensor], bool]]:
        return [(self.k, False), (self.v, False), (self.k_scale, True), (self.v_scale, True)]

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(k_scale, v_scale)`` of ``layer`` (``(None, None)`` for an unquantized pool)."""
        if not self.quantized:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    @property
    def allocator(self) -> BlockAllocator:
        return self.manager.allocator

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def prefix_caching(self) -> bool:
        return isinstance(self.allocator, PrefixCachingAllocator)

    def grow(self, min_free: int) -> None:
        """At least ``min_free`` free blocks by (at least) doubling; tensors are reallocated."""
        alloc = self.allocator
        new = max(2 * alloc.num_blocks, alloc.num_used + min_free)
        old = alloc.num_blocks
        for tensors, is_scale in self._all():
            for i, t in enumerate(tensors):
                grown = self._new(new, scale=is_scale)
                grown[:old].copy_(t)
                tensors[i] = grown
        alloc.grow(new)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply copy-on-write ``(src, dst)`` block copies in every layer."""
        for src, dst in copies:
            for tensors, _ in self._all():
                for t in tensors:
                    t[dst].copy_(t[src])

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[N, Hkv, D]`` at flat slots ``[N]`` (``block * bs + offset``)."""
        hkv, d = self.num_kv_heads, self.head_dim
        if not self.quantized:
            self.k[layer].view(-1, hkv, d).index_copy_(0, slots, k.to(self.dtype))
            self.v[layer].view(-1, hkv, d).index_copy_(0, slots, v.to(self.dtype))
            return
        for x, pool, sc in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            qx, scale = quantize_kv(x, self.storage_dtype)
            # index_copy_ has no float8 kernel on CPU: copy the raw bytes (same element size).
            dst = pool[layer].view(-1, hkv, d)
            if qx.dtype == torch.float8_e4m3fn:
                dst, qx = dst.view(torch.uint8), qx.view(torch.uint8)
            dst.index_copy_(0, slots, qx)
            sc[layer].view(-1, hkv).index_copy_(0, slots, scale)

    def reserved_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.bytes_per_token
