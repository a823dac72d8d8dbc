"""``ModelRunner``: one forward of a HF causal LM per :class:`StepPlan`.

The plan's flat ragged batch becomes ``input_ids`` / ``position_ids`` ``[1, N]`` (no padding);
the slot mapping, block tables, sequence lengths and query offsets go into a
:class:`~infopt.kvcache.forward.ForwardContext` that the ``"infopt_paged"`` attention function
reads; ``logits_to_keep`` asks the model for the sampled rows only.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from ..kvcache.config import KVConfig
from ..kvcache.forward import ForwardContext, PagedRows, forward_context
from ..kvcache.hf import attention_shapes, switch_to_paged
from ..kvcache.pool import KVPool
from .compiled import CompiledDecode, CompileFailed
from .params import EngineConfig
from .plan import StepPlan

__all__ = ["ModelRunner", "layer_windows", "text_config"]

# Shortest first prefill that runs on SDPA instead of the paged kernel (tokens).
_FRESH_MIN = 32

# Layer kinds the paged kernels implement (causal attention over all or the last W keys).
_LAYER_KINDS = ("full_attention", "sliding_attention")


def text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def layer_windows(model: Any) -> tuple[int | None, ...]:
    """Sliding window of each layer from a HF config (``None``: full attention).

    ``layer_types`` (Gemma 2/3, Qwen2, ...) decides per layer; without it a ``sliding_window``
    applies to every layer (Mistral-style) unless ``use_sliding_window`` is False.
    """
    cfg = text_config(model)
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        unknown = sorted(set(types) - set(_LAYER_KINDS))
        if unknown:
            raise NotImplementedError(
                f"{type(model).__name__} has layer types {unknown}; the engine runs "
                f"{list(_LAYER_KINDS)} layers only"
            )
        if "sliding_attention" in types and not window:
            raise ValueError("config has sliding_attention layers but no sliding_window")
        return tuple(window if t == "sliding_attention" else None for t in types[:n])
    if window and getattr(cfg, "use_sliding_window", True):
        return (int(window),) * n
    return (None,) * n


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ModelRunner:
    """Owns the model's attention switch and the KV pool; runs plans.

    Args:
        model: a transformers ``*ForCausalLM`` whose attention dispatches through
            ``AttentionInterface`` (every model with ``_supports_attention_backend``).
        config: pool size, block size, KV dtype.
        max_model_len: longest sequence (bounds the default pool size).
    """

    def __init__(self, model: Any, config: EngineConfig, max_model_len: int):
        if not all(hasattr(model, a) for a in ("config", "set_attn_implementation")):
            raise TypeError(
                "the engine needs a transformers PreTrainedModel (config, "
                f"set_attn_implementation); got {type(model).__name__}"
            )
        cfg = text_config(model)
        if getattr(cfg, "is_encoder_decoder", False):
            raise NotImplementedError(f"{type(model).__name__}: encoder-decoder models")
        self.model = model
        self.windows = layer_windows(model)
        switch_to_paged(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if not self.dtype.is_floating_point:
            self.dtype = torch.float32
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        layers, kv_heads, head_dim = attention_shapes(model)
        self.pool = self._build_pool(config, layers, kv_heads, head_dim, max_model_len)
        self.compiled: CompiledDecode | None = None
        if config.compile is not None:
            self.enable_compile(config.compile, config.max_num_seqs, max_model_len)

    def enable_compile(self, config: Any, max_num_seqs: int, max_model_len: int) -> None:
        """Decode-only steps from now on run :class:`CompiledDecode` (``config``: a
        ``CompileConfig``)."""
        if self.compiled is not None:
            raise RuntimeError("the decode step is already compiled")
        self.compiled = CompiledDecode(self.model, self.pool, config, max_num_seqs,
                                       max_model_len, self.windows)

    def _build_pool(self, config: EngineConfig, layers: int, kv_heads: int, head_dim: int,
                    max_model_len: int) -> KVPool:
        kv = dict(
            block_size=config.block_size,
            cache_dtype=config.kv_cache_dtype,
            prefix_caching=config.enable_prefix_caching,
        )
        shapes = dict(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                      dtype=self.dtype, device=self.device)
        probe = KVPool(KVConfig(num_blocks=1, **kv), **shapes)  # bytes per token only
        per_block = probe.bytes_per_token * config.block_size
        avail = _available_memory(self.device)
        if config.num_blocks is not None:
            num_blocks = config.num_blocks
            if num_blocks * per_block > 0.95 * avail:
                raise ValueError(
                    f"EngineConfig.num_blocks={num_blocks} needs "
                    f"{num_blocks * per_block / 2**30:.2f} GiB of KV cache but only "
                    f"{avail / 2**30:.2f} GiB is available on {self.device}; lower num_blocks or "
                    "set memory_fraction"
                )
        else:
            fraction = config.memory_fraction if config.memory_fraction is not None else 0.2
            cap = config.max_num_seqs * -(-max_model_len // config.block_size) + 1
            num_blocks = min(int(fraction * avail) // per_block, cap)
            if num_blocks < 1:
                raise ValueError(
                    f"memory_fraction={fraction} of {avail / 2**30:.2f} GiB free holds no KV block "
                    f"({per_block} bytes each); raise memory_fraction or set num_blocks"
                )
        self.bytes_per_block = per_block
        return KVPool(KVConfig(num_blocks=num_blocks, **kv), **shapes)

    def _split_fresh(self, plan: StepPlan, ctx: ForwardContext, table: torch.Tensor) -> None:
        """Mark first prefills of at least ``_FRESH_MIN`` tokens for SDPA (see ForwardContext);
        shorter ones gain nothing over the paged kernel and stay in its batch."""
        qsl = plan.query_start_loc
        fresh = [i for i, (n, end) in enumerate(zip(plan.num_scheduled, plan.seq_lens))
                 if n == end and n >= _FRESH_MIN]
        if not fresh:
            return
        ctx.fresh = tuple((qsl[i], qsl[i + 1]) for i in fresh)
        fresh_set = set(fresh)
        rest = [i for i in range(plan.num_seqs) if i not in fresh_set]
        if not rest:
            return
        dev = self.device
        rows = [r for i in rest for r in range(qsl[i], qsl[i + 1])]
        counts = [plan.num_scheduled[i] for i in rest]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        idx = torch.tensor(rest, dtype=torch.long)
        ctx.rest = PagedRows(
            rows=torch.tensor(rows, dtype=torch.long, device=dev),
            block_tables=table.index_select(0, idx).to(dev),
            seq_lens=torch.tensor([plan.seq_lens[i] for i in rest], dtype=torch.int32,
                                  device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan's forward. Returns fp32 logits ``[len(plan.sample_rows), vocab]``."""
        if self.compiled is not None:
            if self.compiled.accepts(plan):
                try:
                    return self.compiled.execute(plan)
                except CompileFailed:
                    pass  # logged once; this and every later step run eager
            self.compiled.num_eager_steps += 1
        dev = self.device
        ids = torch.tensor(plan.token_ids, dtype=torch.long, device=dev)[None]
        pos = torch.tensor(plan.positions, dtype=torch.long, device=dev)[None]
        width = max(len(t) for t in plan.block_tables)
        table = torch.zeros(plan.num_seqs, width, dtype=torch.int32)
        for i, row in enumerate(plan.block_tables):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        ctx = ForwardContext(
            pool=self.pool,
            slot_mapping=torch.tensor(plan.slot_mapping, dtype=torch.long, device=dev),
            block_tables=table.to(dev),
            seq_lens=torch.tensor(plan.seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(plan.query_start_loc, dtype=torch.int32, device=dev),
            layer_windows=plan.layer_windows,
        )
        self._split_fresh(plan, ctx, table)
        keep = torch.tensor(plan.sample_rows, dtype=torch.long, device=dev)
        if plan.block_copies:
            self.pool.copy_blocks(plan.block_copies)
        with forward_context(ctx):
            if self._logits_to_keep:
                out = self.model(input_ids=ids, position_ids=pos, use_cache=False,
                                 logits_to_keep=keep)
                logits = out.logits[0]
            else:
                out = self.model(input_ids=ids, position_ids=pos, use_cache=False)
                logits = out.logits[0].index_select(0, keep)
        return logits.float()
