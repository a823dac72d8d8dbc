"""``KVConfig``: the versioned description of a KV-cache layout, and its ``wrap_model`` option.

Phase 1 implements the paged cache at the model's dtype with the "full" policy. The fields that
later phases fill in (``cache_dtype`` for int8/fp8 pools, ``policy`` for StreamingLLM sinks /
H2O eviction) exist already and are validated, so configs saved now keep their meaning and new
aliases ("paged-int8", ...) become one line in ``KV_ALIASES``.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import InfoptConfig, register_config

__all__ = ["KV_ALIASES", "KVConfig"]

# Values accepted now; the later phases extend these tuples.
SUPPORTED_CACHE_DTYPES = ("auto",)
SUPPORTED_POLICIES = ("full",)


@register_config
@dataclasses.dataclass(frozen=True)
class KVConfig(InfoptConfig):
    """A paged KV cache.

    Attributes:
        block_size: tokens per block, a power of two (16 is a good default on CPU and GPU).
        num_blocks: fixed pool size in blocks (shared by all layers: one block holds
            ``block_size`` tokens of K and V for every layer).
        max_tokens: fixed pool size in tokens (rounded up to whole blocks).
        max_bytes: fixed pool size in bytes of K+V over all layers (rounded down to whole blocks).
        cache_dtype: element type of the pool; ``"auto"`` = the model's dtype.
        policy: which tokens are kept; ``"full"`` keeps all of them.

    At most one of ``num_blocks`` / ``max_tokens`` / ``max_bytes`` may be set. With none, the pool
    is sized per ``generate`` call to ``batch x max_length`` tokens and grows (by doubling) if a
    direct ``forward`` needs more. A fixed pool never grows: running out raises
    :class:`~infopt.kvcache.OutOfBlocksError`.
    """

    VERSION = 1

    block_size: int = 16
    num_blocks: int | None = None
    max_tokens: int | None = None
    max_bytes: int | None = None
    cache_dtype: str = "auto"
    policy: str = "full"

    def __post_init__(self) -> None:
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0 or bs & (bs - 1):
            raise ValueError(f"KVConfig.block_size must be a power of two, got {bs!r}")
        sizes = {k: getattr(self, k) for k in ("num_blocks", "max_tokens", "max_bytes")}
        given = {k: v for k, v in sizes.items() if v is not None}
        if len(given) > 1:
            raise ValueError(
                f"KVConfig: set at most one of num_blocks/max_tokens/max_bytes, got {given}"
            )
        for k, v in given.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"KVConfig.{k} must be a positive int, got {v!r}")
        if self.cache_dtype not in SUPPORTED_CACHE_DTYPES:
            raise ValueError(
                f"KVConfig.cache_dtype={self.cache_dtype!r} is not supported yet; accepted: "
                f"{list(SUPPORTED_CACHE_DTYPES)} (quantized KV pools are a later phase)"
            )
        if self.policy not in SUPPORTED_POLICIES:
            raise ValueError(
                f"KVConfig.policy={self.policy!r} is not supported yet; accepted: "
                f"{list(SUPPORTED_POLICIES)} (eviction policies are a later phase)"
            )

    @property
    def fixed(self) -> bool:
        """True if the pool size is fixed (it then never grows)."""
        return any(v is not None for v in (self.num_blocks, self.max_tokens, self.max_bytes))

    def resolve_num_blocks(self, bytes_per_block: int, tokens_hint: int | None = None) -> int:
        """Blocks in the pool: the fixed size, else enough for ``tokens_hint`` (>= 1 block)."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.max_tokens is not None:
            return math.ceil(self.max_tokens / self.block_size)
        if self.max_bytes is not None:
            n = self.max_bytes // bytes_per_block
            if n == 0:
                raise ValueError(
                    f"KVConfig.max_bytes={self.max_bytes} is smaller than one block "
                    f"({bytes_per_block} bytes for this model)"
                )
            return n
        return max(1, math.ceil((tokens_hint or self.block_size) / self.block_size))


# String aliases accepted by ``wrap_model(kv=...)``.
KV_ALIASES = {"paged": lambda: KVConfig()}
