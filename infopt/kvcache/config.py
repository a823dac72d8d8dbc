"""``KVConfig``: the versioned description of a KV-cache layout, and its ``wrap_model`` option.

Fields: block size and pool size; ``cache_dtype`` (model dtype, int8 or fp8 pools);
``policy`` with its parameters (full, StreamingLLM sinks + window, H2O budget + window); prefix
caching with an optional TTL. Every field is validated on construction, with errors naming the
field and its accepted values. Aliases for ``wrap_model(kv=...)`` live in ``KV_ALIASES``.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import InfoptConfig, register_config

__all__ = ["KV_ALIASES", "KVConfig"]

# Accepted values of cache_dtype and policy (validated in __post_init__).
SUPPORTED_CACHE_DTYPES = ("auto", "int8", "fp8")
SUPPORTED_POLICIES = ("full", "streaming", "h2o")


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
        cache_dtype: element type of the pool; ``"auto"`` = the model's dtype; ``"int8"`` /
            ``"fp8"`` (float8_e4m3fn) store K and V quantized with one fp32 scale per token and
            KV head (see :mod:`infopt.kvcache.kvquant`).
        policy: which tokens are kept; ``"full"`` keeps all of them.
        prefix_caching: keep full blocks content-addressed in a pool owned by the wrapped model,
            so a request reuses the K/V of its longest cached prompt prefix (see
            :mod:`infopt.kvcache.prefix`).
        prefix_ttl_s: seconds an unreferenced cached block survives (``None``: until the pool
            needs the memory, LRU). Only with ``prefix_caching``.
        n_sink, window: ``policy="streaming"`` (StreamingLLM): keep the first ``n_sink`` tokens
            (rounded up to whole blocks) and at least the last ``window`` tokens; blocks between
            are freed. ``policy="h2o"``: ``window`` recent tokens always kept.
        budget: ``policy="h2o"``: tokens kept per sequence; blocks of the lowest accumulated
            attention outside the recent window are freed to stay under it.

    At most one of ``num_blocks`` / ``max_tokens`` / ``max_bytes`` may be set. With none, the pool
    is sized per ``generate`` call to ``batch x max_length`` tokens and grows (by doubling) if a
    direct ``forward`` needs more. A fixed pool never grows: running out raises
    :class:`~infopt.kvcache.OutOfBlocksError`.
    """

    # 2: prefix_caching / prefix_ttl_s, cache_dtype int8/fp8, policy streaming/h2o with
    # n_sink/window/budget (version-1 dicts load unchanged: the new fields default to off).
    VERSION = 2

    block_size: int = 16
    num_blocks: int | None = None
    max_tokens: int | None = None
    max_bytes: int | None = None
    cache_dtype: str = "auto"
    policy: str = "full"
    prefix_caching: bool = False
    prefix_ttl_s: float | None = None
    n_sink: int = 4
    window: int | None = None
    budget: int | None = None

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
                f"KVConfig.cache_dtype={self.cache_dtype!r} is not supported; accepted: "
                f"{list(SUPPORTED_CACHE_DTYPES)}"
            )
        if self.policy not in SUPPORTED_POLICIES:
            raise ValueError(
                f"KVConfig.policy={self.policy!r} is not supported; accepted: "
                f"{list(SUPPORTED_POLICIES)}"
            )

        if not isinstance(self.prefix_caching, bool):
            raise TypeError(
                f"KVConfig.prefix_caching must be a bool, got {type(self.prefix_caching).__name__}"
            )
        ttl = self.prefix_ttl_s
        if ttl is not None:
            if not self.prefix_caching:
                raise ValueError("KVConfig.prefix_ttl_s needs prefix_caching=True")
            if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
                raise ValueError(
                    f"KVConfig.prefix_ttl_s must be a positive number of seconds or None, got "
                    f"{ttl!r}"
                )

        self._check_policy()

    def _check_policy(self) -> None:
        def positive(name: str, v: object, zero: bool = False) -> None:
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero else 1):
                raise ValueError(
                    f"KVConfig.{name} must be a {'non-negative' if zero else 'positive'} int for "
                    f"policy={self.policy!r}, got {v!r}"
                )

        if self.policy == "full":
            if self.window is not None or self.budget is not None:
                raise ValueError(
                    "KVConfig.window/budget apply to policy='streaming' or 'h2o' only, got "
                    f"window={self.window!r} budget={self.budget!r} with policy='full'"
                )
            return
        if self.prefix_caching:
            raise ValueError(
                f"KVConfig: policy={self.policy!r} evicts tokens from the middle of sequences, "
                "so their blocks cannot be named by a prefix; use prefix_caching=False"
            )
        positive("window", self.window)
        if self.policy == "streaming":
            positive("n_sink", self.n_sink, zero=True)
            if self.budget is not None:
                raise ValueError(
                    "KVConfig.budget is for policy='h2o'; streaming uses n_sink+window"
                )
        else:
            positive("budget", self.budget)
            if self.budget < self.window + 2 * self.block_size:
                raise ValueError(
                    f"KVConfig.budget={self.budget} must be >= window + 2 * block_size = "
                    f"{self.window + 2 * self.block_size} (room for heavy-hitter blocks)"
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
KV_ALIASES = {
    "paged": lambda: KVConfig(),
    "paged-prefix": lambda: KVConfig(prefix_caching=True),
    "paged-int8": lambda: KVConfig(cache_dtype="int8"),
    "paged-fp8": lambda: KVConfig(cache_dtype="fp8"),
}
