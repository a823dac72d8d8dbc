"""What ``wrap_model(kv=...)`` checks before it changes anything (registered with
:func:`infopt.api.register_check`): a transformers decoder, a layout the chosen path supports,
and a fixed pool size that fits in the device's free memory."""

from __future__ import annotations

from typing import Any

from ..options import register_check
from . import hf as kv_hf
from .config import KVConfig
from .pool import check_pool_fits, pool_bytes_per_token

__all__ = ["check_kv_supported"]


@register_check(KVConfig)
def check_kv_supported(model: Any, config: KVConfig) -> None:
    """Raise ``TypeError`` for a module that is no transformers decoder, the
    ``NotImplementedError`` of :func:`~infopt.kvcache.enable_paged` for layouts an eviction
    policy cannot run on, and :class:`~infopt.kvcache.KVMemoryError` when a fixed pool
    (``num_blocks`` / ``max_tokens`` / ``max_bytes``) exceeds the device's free memory."""
    if not all(hasattr(model, a) for a in ("config", "generate", "set_attn_implementation")):
        raise TypeError(
            "kv=... needs a transformers PreTrainedModel (config, generate, "
            f"set_attn_implementation); got {type(model).__name__}"
        )
    if config.policy != "full":  # eviction policies run on the PagedCache layer only
        kv_hf._check_model(model)
    if not config.fixed:
        return
    param = next(model.parameters(), None)
    if param is None:
        return
    num_layers, num_kv_heads, head_dim = kv_hf.attention_shapes(model)
    per_token = pool_bytes_per_token(config, num_layers, num_kv_heads, head_dim, param.dtype)
    blocks = config.resolve_num_blocks(per_token * config.block_size)
    sizes = {k: getattr(config, k) for k in ("num_blocks", "max_tokens", "max_bytes")}
    given = ", ".join(f"{k}={v}" for k, v in sizes.items() if v is not None)
    check_pool_fits(
        blocks * config.block_size * per_token, param.device,
        f"KVConfig({given}) for {type(model).__name__} ({blocks} blocks x {config.block_size} "
        f"tokens x {per_token} bytes/token)",
    )  # fmt: skip
