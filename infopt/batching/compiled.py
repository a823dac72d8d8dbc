"""A compiled decode step for the engine's model runner (``wrap_model(compile=...)``).

On a small model most of a decode step is not arithmetic: HF's Python per layer, dozens of
small ops and their dispatch cost as much as the weights take to read. :class:`CompiledDecode`
runs decode-only steps (every sequence computes one token, no block copies) through
``torch.compile`` over fixed shapes:

- the batch is padded up to a bucket (``CompileConfig.batch_buckets``), one graph per bucket;
  padded rows write their K/V into a scratch block reserved from the pool and are never
  sampled;
- the plan goes into per-bucket buffers of fixed capacity (``input_ids``/``positions``
  ``[1, B]``, slot mapping ``[B]``, block tables ``[B, max_blocks]``, lengths ``[B]``) updated
  in place, so every call sees the same tensors and no guard or graph changes between steps;
- the forward context that the ``"infopt_paged"`` attention reads holds those buffers, so the
  compiled graph reads the plan at run time; the paged attention and quantized linears are
  ``infopt::*`` custom ops with fake implementations, which compile as opaque calls.

Prefills, chunked prefills, speculative verification and batches beyond the largest bucket run
eager (the same runner, the same kernels): they are few per request and dominated by GEMMs.
On CUDA the default mode is ``"reduce-overhead"`` (CUDA graphs); on CPU inductor's default.

Compiled artifacts are cached across processes by inductor's FX graph cache, kept under
``CompileConfig.cache_dir`` (default ``~/.cache/infopt/inductor``); the first step of each
bucket pays the compile (``CompiledDecode.compile_seconds`` reports it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from ..config import InfoptConfig, register_config
from ..kvcache.forward import ForwardContext, forward_context
from ..kvcache.pool import KVPool
from ..ops.registry import prime_probes
from .plan import StepPlan

__all__ = ["CompileConfig", "CompileFailed", "CompiledDecode", "default_cache_dir"]

_log = logging.getLogger(__name__)

_BACKENDS = ("inductor", "aot_eager", "eager")
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def default_cache_dir() -> str:
    base = os.environ.get("INFOPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "infopt")
    return os.path.join(base, "inductor")


def _use_cache_dir(path: str) -> None:
    """Point inductor's cache at ``path`` unless the user chose one (``TORCHINDUCTOR_CACHE_DIR``
    set to something other than torch's per-user temp default, which torch writes into the
    environment the first time it looks)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None and os.path.abspath(current) != os.path.abspath(torch_default()):
        return
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path


@register_config
@dataclasses.dataclass(frozen=True)
class CompileConfig(InfoptConfig):
    """How the engine compiles its decode step (``wrap_model(compile=True | "inductor" | cfg)``).

    Attributes:
        backend: ``torch.compile`` backend: ``"inductor"`` (generated kernels), ``"aot_eager"``
            or ``"eager"`` (tracing only; for debugging a model that fails to compile).
        mode: ``torch.compile`` mode; ``None`` picks ``"reduce-overhead"`` (CUDA graphs) on CUDA
            and ``"default"`` on CPU.
        batch_buckets: decode batch sizes with their own graph (ascending); a batch is padded
            to the smallest bucket that holds it; larger batches run eager.
        dynamic: compile one graph with a symbolic batch size instead of one per bucket (fewer
            compiles, slightly slower steps); batches are still padded to buckets.
        cache_dir: inductor's cache directory (reused across processes); ``None``: the default
            under ``~/.cache/infopt`` (``INFOPT_CACHE``); ``""``: leave torch's default.
        warmup: compile every bucket when the engine is built instead of on first use.
        dense_gemv: on CPU, switch the model's float32 ``nn.Linear`` layers to
            :class:`infopt.ops.dense.DenseGemvLinear` (inputs of <= 8 rows through the
            ``dense_gemv`` kernel, which reads the weights 2-3x faster than MKL's sgemm there;
            larger inputs keep ``F.linear``). In place, on the engine's model; outputs change
            only by fp32 summation order.
        lean_guards: skip dynamo's guards on the model's modules and, with inductor, the
            generated code's size / stride / alignment asserts on its inputs. The engine builds
            the model's modules once and only the plan buffers change between steps, so those
            checks can never fail there, yet they cost ~2 ms of a ~14 ms SmolLM2-135M step on a
            2-core CPU (thousands of parameter checks per call). Set False if you change the
            model's modules (replace layers or parameters) after ``wrap_model(compile=...)``.
    """

    # 2: ``lean_guards`` added (version-1 configs compiled with every guard).
    VERSION = 2
    backend: str = "inductor"
    mode: str | None = None
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    dynamic: bool = False
    cache_dir: str | None = None
    warmup: bool = False
    dense_gemv: bool = True
    lean_guards: bool = True

    @classmethod
    def _upgrade_fields(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        if version < 2:
            fields["lean_guards"] = False
        return fields

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(
                f"CompileConfig.backend must be one of {_BACKENDS}, got {self.backend!r}"
            )
        if self.mode not in _MODES:
            raise ValueError(f"CompileConfig.mode must be one of {_MODES}, got {self.mode!r}")
        b = tuple(self.batch_buckets)
        if (not b or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in b)
                or list(b) != sorted(set(b))):
            raise ValueError(
                "CompileConfig.batch_buckets must be a non-empty ascending tuple of distinct "
                f"positive ints, got {self.batch_buckets!r}"
            )
        object.__setattr__(self, "batch_buckets", b)
        for name in ("dynamic", "warmup", "dense_gemv", "lean_guards"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CompileConfig.{name} must be True or False, "
                                 f"got {getattr(self, name)!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ValueError(f"CompileConfig.cache_dir must be a str or None, "
                             f"got {self.cache_dir!r}")


class CompileFailed(RuntimeError):
    """The decode step could not be compiled for this model (the reason is the message); the
    engine runs eager from then on."""


@dataclasses.dataclass
class _Buffers:
    """One bucket's fixed-capacity plan tensors (on the model's device) and their host mirror.

    ids / pos ``int64 [1, B]``; ctx.slot_mapping ``int64 [B]``; ctx.block_tables
    ``int32 [B, max_blocks]``; ctx.seq_lens ``int32 [B]``; ctx.query_start_loc ``[B + 1]``
    (fixed: one query per row). ``host`` is one int64 numpy array ``[B, 4 + max_blocks]``
    (ids, pos, slot, len, table) filled per step and copied in one go.
    """

    ids: torch.Tensor
    pos: torch.Tensor
    ctx: ForwardContext
    host: np.ndarray
    host_t: torch.Tensor


class CompiledDecode:
    """Decode-only steps of one :class:`~infopt.batching.ModelRunner` through ``torch.compile``.

    Args:
        model: the runner's HF model (attention already switched to ``"infopt_paged"``).
        pool: the runner's KV pool; one block is reserved from its allocator as the scratch
            block padded rows write to.
        config: the :class:`CompileConfig`.
        max_num_seqs: the engine's batch limit (buckets above it are dropped).
        max_model_len: longest sequence (sets the block tables' width).
        windows: each layer's sliding window (``None``: full attention), as the runner plans.
    """

    def __init__(self, model: Any, pool: KVPool, config: CompileConfig, max_num_seqs: int,
                 max_model_len: int, windows: tuple[int | None, ...]):
        self.model = model
        self.pool = pool
        self.config = config
        self.device = pool.device
        self._windows = tuple(windows)
        buckets = [b for b in config.batch_buckets if b <= max_num_seqs]
        if not buckets or buckets[-1] < max_num_seqs <= config.batch_buckets[-1]:
            buckets.append(max_num_seqs)
        self.buckets = tuple(buckets)
        self.max_blocks = -(-max_model_len // pool.block_size)
        if pool.allocator.num_free < 2:
            raise ValueError(
                f"compile=: the KV pool has {pool.allocator.num_free} free blocks; the compiled "
                "decode step reserves one as scratch for padded rows, so num_blocks must be >= 2"
            )
        self.scratch_block = pool.allocator.allocate(1)[0]
        #: float32 linears switched to the dense_gemv kernel (0: none, or not on CPU)
        self.dense_gemv_layers = 0
        if config.dense_gemv and self.device.type == "cpu":
            from ..ops.dense import use_dense_gemv

            self.dense_gemv_layers = use_dense_gemv(model)
            if self.dense_gemv_layers:
                _log.info("compile: %d float32 linear layers use the dense_gemv kernel for "
                          "<= 8 rows", self.dense_gemv_layers)
        self.compile_seconds: dict[int, float] = {}
        self.num_compiled_steps = 0
        self.num_eager_steps = 0
        #: why compiling failed (then every step runs eager); ``None`` while it works
        self.disabled: str | None = None
        self._bufs: dict[int, _Buffers] = {}
        mode = config.mode
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.mode = mode
        if config.cache_dir != "":
            _use_cache_dir(config.cache_dir or default_cache_dir())
        import torch._dynamo as dynamo

        # One graph per bucket, each guarded on its own buffers: keep them all.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 4 * len(buckets))
        if config.lean_guards:
            options: dict[str, Any] = {
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            if config.backend == "inductor":
                # torch.compile takes a mode or options, not both: the mode's options go here.
                from torch._inductor import list_mode_options

                options.update(list_mode_options(mode, config.dynamic))
                options.update(size_asserts=False, alignment_asserts=False, scalar_asserts=False)
            # Without module guards nothing tells two engines' models apart, and dynamo keeps
            # its compiled entries per code object (this method's, shared by every engine):
            # each engine gets its own entries, or one model's graph would run another's.
            self._fn = torch.compile(self._forward, backend=config.backend,
                                     dynamic=config.dynamic, fullgraph=True, options=options,
                                     isolate_recompiles=True)
        else:
            self._fn = torch.compile(self._forward, backend=config.backend, mode=mode,
                                     dynamic=config.dynamic, fullgraph=True)
        if config.warmup:
            for b in self.buckets:
                self._run_bucket(b, None)

    # --- what runs compiled ---------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False)
        return out.logits[0]

    def accepts(self, plan: StepPlan) -> bool:
        """Whether ``plan`` is a decode-only step that fits a bucket."""
        n = plan.num_seqs
        return (
            self.disabled is None
            and 0 < n <= self.buckets[-1]
            and plan.num_tokens == n
            and not plan.block_copies
            and not plan.spec_drafts
            and len(plan.sample_rows) == n
            and max(len(t) for t in plan.block_tables) <= self.max_blocks
        )

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch {n} exceeds the largest compiled bucket {self.buckets[-1]}")

    def _buffers(self, b: int) -> _Buffers:
        bufs = self._bufs.get(b)
        if bufs is not None:
            return bufs
        dev, w = self.device, self.max_blocks
        host = np.zeros((b, 4 + w), dtype=np.int64)
        ctx = ForwardContext(
            pool=self.pool,
            slot_mapping=torch.zeros(b, dtype=torch.long, device=dev),
            block_tables=torch.zeros(b, w, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(b, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=dev),
            layer_windows=self._windows,
        )
        bufs = _Buffers(
            ids=torch.zeros(1, b, dtype=torch.long, device=dev),
            pos=torch.zeros(1, b, dtype=torch.long, device=dev),
            ctx=ctx,
            host=host,
            host_t=torch.from_numpy(host),
        )
        self._bufs[b] = bufs
        return bufs

    def _fill(self, bufs: _Buffers, plan: StepPlan | None) -> int:
        """Copy ``plan`` into the bucket's buffers (padded rows: token 0 at position 0 in the
        scratch block). Returns the number of real rows."""
        h = bufs.host
        n = 0 if plan is None else plan.num_seqs
        h[:, 4:] = 0
        h[n:, 0] = 0
        h[n:, 1] = 0
        h[n:, 2] = self.scratch_block * self.pool.block_size
        h[n:, 3] = 1
        h[n:, 4] = self.scratch_block
        if n:
            h[:n, 0] = plan.token_ids
            h[:n, 1] = plan.positions
            h[:n, 2] = plan.slot_mapping
            h[:n, 3] = plan.seq_lens
            for i, row in enumerate(plan.block_tables):
                h[i, 4 : 4 + len(row)] = row
        t = bufs.host_t
        ctx = bufs.ctx
        bufs.ids[0].copy_(t[:, 0])
        bufs.pos[0].copy_(t[:, 1])
        ctx.slot_mapping.copy_(t[:, 2])
        ctx.seq_lens.copy_(t[:, 3])
        ctx.block_tables.copy_(t[:, 4:])
        return n

    def _run_bucket(self, b: int, plan: StepPlan | None) -> torch.Tensor:
        bufs = self._buffers(b)
        self._fill(bufs, plan)
        first = b not in self.compile_seconds
        if first:
            # Backend probes load extensions under a lock, which tracing cannot enter: run
            # them before tracing (the prefill may not have called every op yet).
            prime_probes(self.device.type)
        t0 = time.perf_counter()
        with forward_context(bufs.ctx):
            if not first:
                return self._fn(bufs.ids, bufs.pos)
            try:
                logits = self._fn(bufs.ids, bufs.pos)
            except Exception as e:  # tracing / code generation failed: nothing ran yet
                self.disabled = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                _log.warning(
                    "compile=: the decode step of %s could not be compiled (%s); running eager",
                    type(self.model).__name__, self.disabled,
                )
                raise CompileFailed(self.disabled) from e
        if first:
            self.compile_seconds[b] = time.perf_counter() - t0
            _log.info("compiled the decode step for batch bucket %d in %.1f s", b,
                      self.compile_seconds[b])
        return logits

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run an accepted plan. Returns fp32 logits ``[B, vocab]``: a decode-only plan samples
        every one of its ``B`` rows (one token per sequence), in batch order."""
        n = plan.num_seqs
        logits = self._run_bucket(self.bucket_for(n), plan)
        self.num_compiled_steps += 1
        # A copy: the graph's output buffer is reused by the next step (CUDA graphs).
        return logits[:n].to(torch.float32, copy=True)
