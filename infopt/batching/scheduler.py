"""The scheduler: host-only, no tensors. Each step it decides how many tokens every request
computes, under a token budget, and emits a :class:`~infopt.batching.plan.StepPlan`.

There are no prefill and decode phases (the shape of vLLM's v1 scheduler): a request has
``num_tokens`` known tokens (prompt + outputs) of which ``num_computed_tokens`` have K/V in the
pool, and a step computes some of the rest. A decode is the case "one left"; a prefill chunk is
"many left, budget-limited"; a prefix-cache hit starts a request with tokens already computed.

Order within a step (FIFO by admission):

1. running requests with one token left (decodes), then running requests still prefilling,
   each given ``min(left, budget)`` tokens;
2. waiting requests (new or preempted), admitted while ``max_num_seqs`` and the budget allow
   and the pool has blocks for their first chunk (after prefix hits).

When a running request cannot get the blocks it needs, the newest running request is
preempted (its blocks freed, its K/V recomputed when it is readmitted), repeatedly, until the
allocation fits; if it is itself the newest it is preempted. No new request is admitted in a
step that preempted.

Sliding windows: when every layer attends through a window, blocks that fall out of the
largest window for good are released after each step (their table entries become ``-1``,
planned as block ``0``, which the kernels never read).
"""

from __future__ import annotations

import contextlib
import hashlib
from array import array
from collections import deque

from ..kvcache.allocator import BlockAllocator
from ..kvcache.prefix import PrefixCachingAllocator
from .params import EngineConfig
from .plan import StepPlan
from .request import Request, RequestStatus

__all__ = ["Scheduler"]


class Scheduler:
    """FIFO continuous-batching scheduler over one block allocator.

    Args:
        config: budgets (``max_num_seqs``, ``max_num_batched_tokens``) and ``block_size``.
        allocator: the KV pool's block allocator (a :class:`PrefixCachingAllocator` enables
            prefix reuse).
        layer_windows: sliding window per layer (``None``: full attention), from the model.
    """

    def __init__(
        self,
        config: EngineConfig,
        allocator: BlockAllocator,
        layer_windows: tuple[int | None, ...] = (),
    ):
        if allocator.block_size != config.block_size:
            raise ValueError(
                f"allocator block_size {allocator.block_size} != config {config.block_size}"
            )
        self.config = config
        self.allocator = allocator
        self.block_size = config.block_size
        self.layer_windows = tuple(layer_windows)
        windows = self.layer_windows
        # Blocks can be dropped only when *every* layer forgets them (block ids are shared).
        self.evict_window = max(windows) if windows and None not in windows else None
        self.prefix_caching = isinstance(allocator, PrefixCachingAllocator)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.peak_blocks_used = 0

    # --- queue management -----------------------------------------------------------------

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Drop ``req`` from the queues and release its blocks (status set by the caller)."""
        if req in self.running:
            self.running.remove(req)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        self._free_blocks(req)

    def _free_blocks(self, req: Request) -> None:
        # Tail first: with prefix caching, a request's last blocks are evicted before its
        # (more shareable) leading ones.
        held = [b for b in req.blocks if b >= 0]
        self.allocator.free(held[::-1])
        req.blocks = []
        req.num_registered_blocks = 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free_blocks(req)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # --- planning ---------------------------------------------------------------------------

    def _blocks_needed(self, req: Request, n: int) -> int:
        return -(-(req.num_computed_tokens + n) // self.block_size) - len(req.blocks)

    def _try_allocate(self, req: Request, n: int) -> bool:
        need = self._blocks_needed(req, n)
        if need > self.allocator.num_free:
            return False
        if need > 0:
            req.blocks.extend(self.allocator.allocate(need))
        return True

    def schedule(self) -> tuple[StepPlan, list[Request]]:
        """Plan one step. Returns the plan and the requests that cannot run at all (a request
        alone in the engine that needs more blocks than the pool has): the caller fails them."""
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, tuple[Request, int]] = {}
        preempted: list[str] = []
        impossible: list[Request] = []
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for req in decodes + prefills:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if req.spec_token_ids:  # a decode with drafts: verify them in this step
                req.spec_token_ids = req.spec_token_ids[: budget - 1]
                n += len(req.spec_token_ids)
            fits = True
            while not self._try_allocate(req, n):
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:
                    impossible.append(req)
                    fits = False
                    break
                if victim.request_id in scheduled:  # a newer decode scheduled earlier: undo it
                    budget += scheduled.pop(victim.request_id)[1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    fits = False
                    break
            if fits:
                scheduled[req.request_id] = (req, n)
                budget -= n
            else:
                req.spec_token_ids = []
        cached = 0
        copies: list[tuple[int, int]] = []
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            hit = self._prefix_hit(req)
            # Reuse every cached token but the last (its logits are needed); a reuse that ends
            # inside a block shares it until the first write, which goes to a private copy.
            hit_tokens = min(len(hit) * self.block_size, req.num_tokens - 1)
            hit = hit[: -(-hit_tokens // self.block_size)]
            partial = hit_tokens % self.block_size != 0
            n = min(req.num_tokens - hit_tokens, budget)
            need = -(-(hit_tokens + n) // self.block_size) - len(hit) + partial
            revived = sum(1 for b in hit if self.allocator.refcount[b] == 0)
            if need > self.allocator.num_free - revived:
                break  # admission waits for blocks
            self.waiting.popleft()
            if hit:
                self.allocator.acquire(hit)  # type: ignore[attr-defined]
                self.allocator.stats.hit_tokens += hit_tokens  # type: ignore[attr-defined]
            if self.prefix_caching:
                stats = self.allocator.stats  # type: ignore[attr-defined]
                n_prompt = len(req.prompt_token_ids)
                stats.requests += 1
                stats.miss_tokens += n_prompt - min(hit_tokens, n_prompt)
                stats.hit_blocks += len(hit)
                stats.miss_blocks += max(0, -(-n_prompt // self.block_size) - len(hit))
            req.blocks = list(hit)
            if partial:
                (dst,) = self.allocator.allocate(1)
                copies.append((hit[-1], dst))
                self.allocator.free([hit[-1]])
                req.blocks[-1] = dst
            req.num_registered_blocks = hit_tokens // self.block_size
            req.num_computed_tokens = hit_tokens
            if req.metrics.num_preemptions == 0:
                req.metrics.num_cached_tokens = hit_tokens
            cached += hit_tokens
            ok = self._try_allocate(req, n)
            assert ok, "admission checked the free blocks"
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = (req, n)
            budget -= n
        for req in impossible:
            if req in self.running:
                self.running.remove(req)
            self._free_blocks(req)
        self.peak_blocks_used = max(self.peak_blocks_used, self.blocks_used)
        plan = self._build_plan(list(scheduled.values()))
        plan.preempted = preempted
        plan.num_cached_tokens = cached
        plan.block_copies = copies
        return plan, impossible

    def _prefix_hit(self, req: Request) -> list[int]:
        """Cached blocks of the longest full-block prefix of ``req``'s tokens (no references
        taken)."""
        if not self.prefix_caching:
            return []
        self._extend_hashes(req)
        return self.allocator.match(req.block_hashes)  # type: ignore[attr-defined]

    def _extend_hashes(self, req: Request) -> None:
        # The same chain as infopt.kvcache.prefix.block_hashes, extended incrementally.
        bs = self.block_size
        hashes = req.block_hashes
        parent = hashes[-1] if hashes else b""
        for i in range(len(hashes), req.num_tokens // bs):
            chunk = array("q", (req.token_at(j) for j in range(i * bs, (i + 1) * bs)))
            parent = hashlib.blake2b(parent + chunk.tobytes(), digest_size=16).digest()
            hashes.append(parent)

    def _build_plan(self, items: list[tuple[Request, int]]) -> StepPlan:
        bs = self.block_size
        plan = StepPlan([], [], [], [], [], [0], [], [], [], [], self.layer_windows)
        for req, n in items:
            start = req.num_computed_tokens
            end = start + n
            blocks = req.blocks
            plan.request_ids.append(req.request_id)
            plan.num_scheduled.append(n)
            drafts = req.spec_token_ids
            known = req.num_tokens
            for pos in range(start, end):
                plan.token_ids.append(req.token_at(pos) if pos < known else drafts[pos - known])
                plan.positions.append(pos)
                plan.slot_mapping.append(blocks[pos // bs] * bs + pos % bs)
            plan.query_start_loc.append(plan.query_start_loc[-1] + n)
            plan.seq_lens.append(end)
            plan.block_tables.append([max(b, 0) for b in blocks[: -(-end // bs)]])
            if drafts:  # the last real token and every draft: k + 1 rows to verify
                first = plan.query_start_loc[-1] - len(drafts) - 1
                plan.sample_rows.extend(range(first, plan.query_start_loc[-1]))
                plan.sample_request_ids.extend([req.request_id] * (len(drafts) + 1))
                plan.spec_drafts[req.request_id] = drafts
                req.spec_token_ids = []
            elif end == req.num_tokens:
                plan.sample_rows.append(plan.query_start_loc[-1] - 1)
                plan.sample_request_ids.append(req.request_id)
        return plan

    # --- after the forward --------------------------------------------------------------------

    def on_step_done(self, plan: StepPlan, requests: dict[str, Request],
                     rejected: dict[str, int] | None = None) -> None:
        """Advance each scheduled request's computed tokens (less its ``rejected`` drafts, whose
        blocks are released); name newly full blocks (prefix caching) and release blocks every
        layer's window has left behind."""
        bs = self.block_size
        rejected = rejected or {}
        for rid, n in zip(plan.request_ids, plan.num_scheduled):
            req = requests[rid]
            req.num_computed_tokens += n - rejected.get(rid, 0)
            keep = -(-req.num_computed_tokens // bs)
            if len(req.blocks) > keep:  # blocks that held only rejected drafts
                self.allocator.free([b for b in req.blocks[keep:] if b >= 0][::-1])
                del req.blocks[keep:]
            if self.prefix_caching:
                self._extend_hashes(req)
                full = min(req.num_computed_tokens // bs, len(req.block_hashes))
                lo = req.num_registered_blocks
                if full > lo:
                    self.allocator.register(  # type: ignore[attr-defined]
                        req.blocks[lo:full], req.block_hashes[lo:full]
                    )
                    req.num_registered_blocks = full
            if self.evict_window is not None:
                # The next query sits at num_computed_tokens; it reads keys >= that - window + 1.
                first_needed = req.num_computed_tokens - self.evict_window + 1
                for i in range(max(0, first_needed) // bs):
                    if req.blocks[i] >= 0:
                        self.allocator.free([req.blocks[i]])
                        req.blocks[i] = -1

    @property
    def blocks_used(self) -> int:
        alloc = self.allocator
        if self.prefix_caching:
            return alloc.num_blocks - alloc.num_free
        return alloc.num_used
