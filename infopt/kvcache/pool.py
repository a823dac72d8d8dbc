"""``KVPool``: the block-paged K/V tensors of every layer plus the host-side block manager.

A pool can outlive the :class:`~infopt.kvcache.paged_cache.PagedCache` objects that use it: with
prefix caching the wrapped model owns one pool and each ``generate`` call gets a fresh cache on
top of it, so full blocks computed by one request are found by the next.

Per layer: ``k[i]`` / ``v[i]`` ``[num_blocks, block_size, Hkv, D]`` (the paged layout of
:mod:`infopt.ops.paged_attention`), in the model's dtype or, for ``cache_dtype="int8"/"fp8"``,
quantized with ``k_scale[i]`` / ``v_scale[i]`` fp32 ``[num_blocks, block_size, Hkv]`` (one scale
per token and KV head). Block ids are shared by all layers, so one allocation per step serves the
whole model.
"""

from __future__ import annotations

import os

import torch

from .allocator import BlockAllocator, BlockManager
from .config import KVConfig
from .kvquant import quantize_kv
from .prefix import PrefixCachingAllocator

_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

__all__ = ["KVMemoryError", "KVPool", "available_bytes", "check_pool_fits"]


class KVMemoryError(MemoryError, ValueError):
    """The KV pool a config asks for does not fit in the device's free memory (raised before
    anything is allocated; a ``ValueError`` too, since the config's size is what is wrong)."""


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown): CUDA's free memory
    plus what PyTorch's caching allocator holds unused; on CPU the kernel's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_pool_fits(nbytes: int, device: torch.device | str, what: str) -> None:
    """Raise :class:`KVMemoryError` if ``nbytes`` exceed what ``device`` has available.

    Why before allocating: ``torch.empty`` of a pool sized by a typo (``num_blocks=10**9``)
    fails with an empty ``MemoryError`` or, with overcommit, only when the pages are touched
    mid-generate.
    """
    avail = available_bytes(device)
    if avail is not None and nbytes > avail:
        raise KVMemoryError(
            f"{what} needs {nbytes} bytes ({nbytes / 2**30:.2f} GiB) of KV cache on "
            f"{torch.device(device)}, but only {avail} bytes ({avail / 2**30:.2f} GiB) are "
            "available; lower KVConfig.num_blocks / max_tokens, or bound it with max_bytes"
        )


def pool_bytes_per_token(
    config: KVConfig, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """K and V (and their fp32 scales for int8/fp8 pools) of every layer for one token."""
    storage = _STORAGE.get(config.cache_dtype, dtype)
    elem = torch.empty((), dtype=storage).element_size()
    per_head = head_dim * elem + (4 if config.cache_dtype in _STORAGE else 0)
    return 2 * num_layers * num_kv_heads * per_head


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
        # The unit of all memory accounting.
        self.bytes_per_token = pool_bytes_per_token(
            config, num_layers, num_kv_heads, head_dim, dtype
        )
        model_elem = torch.empty((), dtype=dtype).element_size()
        self.model_dtype_bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * model_elem
        num_blocks = config.resolve_num_blocks(self.bytes_per_token * self.block_size, tokens_hint)
        check_pool_fits(
            num_blocks * self.block_size * self.bytes_per_token, self.device,
            f"a pool of {num_blocks} blocks x {self.block_size} tokens x "
            f"{self.bytes_per_token} bytes/token",
        )  # fmt: skip
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
        # Old and new tensors coexist while copying: only the new ones must still fit.
        check_pool_fits(
            new * self.block_size * self.bytes_per_token, self.device,
            f"growing the pool to {new} blocks x {self.block_size} tokens x "
            f"{self.bytes_per_token} bytes/token",
        )  # fmt: skip
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
