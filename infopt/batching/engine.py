"""``Engine``: continuous batching over any HF causal LM.

    >>> from infopt.batching import Engine, EngineConfig, SamplingParams
    >>> engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=32))
    >>> outs = engine.generate(["Hello", "The capital of France is"],
    ...                        SamplingParams(max_tokens=32, temperature=0))
    >>> outs[1].text, outs[1].metrics.ttft

One step: pending requests and aborts are taken in -> the :class:`Scheduler` plans
(:class:`StepPlan`) -> the :class:`ModelRunner` runs one forward -> the scheduler advances
the computed tokens -> the :class:`Sampler` picks the next tokens -> stop checks -> snapshots.
Two ways to drive it: call :meth:`Engine.step` (or :meth:`Engine.generate`) yourself, or
:meth:`Engine.start` a background loop; :meth:`Engine.add_request` and :meth:`Engine.abort` are
safe from any thread in both cases (they only queue work for the stepping thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .params import EngineConfig, SamplingParams
from .plan import StepPlan
from .request import FinishReason, Request, RequestOutput, RequestStatus
from .runner import ModelRunner, text_config
from .sampler import Sampler
from .scheduler import Scheduler
from .spec import build_proposer, verify

__all__ = ["Engine", "EngineStats"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Counters of one engine (``blocks_*`` are KV blocks of ``block_size`` tokens)."""

    num_running: int
    num_waiting: int
    num_finished: int
    num_blocks: int
    blocks_used: int
    peak_blocks_used: int
    num_preemptions: int
    prefix_hit_rate: float
    num_steps: int
    num_generated_tokens: int


class Engine:
    """Args:
    model: a transformers causal LM (possibly quantized by ``wrap_model(quant=...)``). The
        engine switches its attention implementation to ``"infopt_paged"`` (plain forwards
        still run HF's sdpa).
    tokenizer: used to encode string prompts, decode outputs and find EOS; ``None`` allows
        token-id prompts only (``text`` stays empty, stop strings are refused).
    config: :class:`EngineConfig` (defaults when ``None``).
    """

    def __init__(self, model: Any, tokenizer: Any = None, config: EngineConfig | None = None):
        config = config if config is not None else EngineConfig()
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.config = config
        self.tokenizer = tokenizer
        cfg = text_config(model)
        limit = getattr(cfg, "max_position_embeddings", None)
        self.max_model_len = config.max_model_len or limit or 2048
        if limit and self.max_model_len > limit:
            raise ValueError(
                f"EngineConfig.max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={limit}"
            )
        self.model = model
        self.runner = ModelRunner(model, config, self.max_model_len)
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.sampler = Sampler(self.eos_token_ids)
        self.scheduler = Scheduler(config, self.runner.pool.allocator, self.runner.windows)
        self.proposer = None
        if config.speculative is not None:
            self.proposer = build_proposer(config.speculative, model, config, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[Request] = []
        self._pending_aborts: list[str] = []
        self._failed: list[Request] = []
        # request id -> callback receiving each snapshot (called on the stepping thread)
        self._subscribers: dict[str, Callable[[RequestOutput], None]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop_error: BaseException | None = None
        self.num_finished = 0
        self.num_steps = 0
        self.num_generated = 0

    def enable_compile(self, config: Any) -> None:
        """Run decode-only steps through a compiled forward (a
        :class:`~infopt.batching.compiled.CompileConfig`; see :mod:`infopt.batching.compiled`).
        Call before any request runs."""
        if self.requests or self._pending:
            raise RuntimeError("enable_compile: the engine has requests; call it before any run")
        self.runner.enable_compile(config, self.config.max_num_seqs, self.max_model_len)
        self.config = dataclasses.replace(self.config, compile=config)

    # --- requests ---------------------------------------------------------------------------

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "prompt is a string but the engine has no tokenizer; pass token ids"
                )
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        ids = list(prompt)
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt must be a string or a non-empty list of token ids (ints)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, "
                             f"{self.vocab_size})")
        return ids

    def _check_fits(self, ids: list[int], sampling: SamplingParams) -> None:
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens; the engine's max_model_len is "
                f"{self.max_model_len} (prompt + at least one new token must fit)"
            )
        if sampling.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer to decode the output")
        if self.scheduler.evict_window is None:
            bs = self.config.block_size
            need = -(-(len(ids) + 1) // bs)
            if need > self.runner.pool.num_blocks:
                raise ValueError(
                    f"prompt of {len(ids)} tokens needs {need} KV blocks but the pool has "
                    f"{self.runner.pool.num_blocks} (block_size {bs}); raise "
                    "EngineConfig.num_blocks or memory_fraction"
                )

    def add_request(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        arrival_time: float | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> str:
        """Queue one request; returns its id. Thread-safe.

        ``on_output``, if given, receives every snapshot of this request (new tokens, then the
        finished one) on the thread that runs the steps: keep it short (e.g. hand the output
        to an asyncio loop with ``call_soon_threadsafe``).

        Raises ``ValueError`` (nothing queued) for a bad prompt or sampling parameters, a prompt
        that does not fit ``max_model_len`` or the whole KV pool, or a duplicate ``request_id``.
        """
        return self._add(prompt, sampling, request_id, arrival_time, on_output)[0]

    def _add(self, prompt, sampling, request_id=None, arrival_time=None, on_output=None,
             subscribe=False):
        sampling = sampling if sampling is not None else SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        ids = self._tokenize(prompt)
        self._check_fits(ids, sampling)
        sub: queue.Queue[RequestOutput] | None = queue.Queue() if subscribe else None
        if sub is not None:
            on_output = sub.put
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self.requests or any(r.request_id == rid for r in self._pending):
                raise ValueError(f"request_id {rid!r} is already in use")
            req = Request(rid, ids, sampling, arrival_time)
            if on_output is not None:  # before the loop can see the request: nothing missed
                self._subscribers[rid] = on_output
            self._pending.append(req)
            self._wake.notify()
        return rid, sub

    def abort(self, request_id: str) -> None:
        """Stop a request (finish reason ``"abort"``) and free its blocks at the next step."""
        with self._lock:
            self._pending_aborts.append(request_id)
            self._wake.notify()

    def has_unfinished(self) -> bool:
        with self._lock:
            pending = bool(self._pending or self._pending_aborts)
        return pending or self.scheduler.has_work() or bool(self._failed)

    # --- one step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step. Returns a snapshot of every request that got new tokens,
        finished, or failed in it."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine runs a background loop; don't call step() as well")
        touched: dict[str, Request] = {}
        with self._lock:
            pending, self._pending = self._pending, []
            aborts, self._pending_aborts = self._pending_aborts, []
        for req in pending:
            self.requests[req.request_id] = req
            self.scheduler.add(req)
        for rid in aborts:
            req = self.requests.get(rid)
            if req is not None and not req.finished:
                self._finish(req, FinishReason.ABORT)
                touched[rid] = req
        for req in self._failed:
            touched[req.request_id] = req
        self._failed = []
        plan, impossible = self.scheduler.schedule()
        for req in impossible:
            req.error = (
                f"request {req.request_id} needs more KV blocks than the whole pool holds "
                f"({self.runner.pool.num_blocks} blocks of {self.config.block_size} tokens at "
                f"{req.num_tokens} tokens); raise EngineConfig.num_blocks or memory_fraction"
            )
            self._finish(req, FinishReason.ERROR, scheduler_done=True)
            touched[req.request_id] = req
        if not plan.is_empty:
            self._run(plan, touched)
        return [self._publish(r) for r in touched.values()]

    def _run(self, plan: StepPlan, touched: dict[str, Request]) -> None:
        now = time.monotonic()
        for rid in plan.request_ids:
            m = self.requests[rid].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        logits = self.runner.execute(plan)
        emitted, rejected = self._sample(plan, logits)
        self.scheduler.on_step_done(plan, self.requests, rejected)
        now = time.monotonic()
        self.num_steps += 1
        for req, toks in emitted:
            for tok in toks:
                req.output_token_ids.append(tok)
                self.num_generated += 1
                m = req.metrics
                m.num_generated += 1
                if m.first_token_time is None:
                    m.first_token_time = now
                m.last_token_time = now
                self._check_stop(req, tok)
                if req.finished:  # tokens after a stop are dropped
                    break
            touched[req.request_id] = req
        self._propose()

    def _sample(self, plan: StepPlan, logits: torch.Tensor):
        """``[(request, emitted tokens)]`` in plan order and ``{request: rejected drafts}``."""
        plain = [i for i, rid in enumerate(plan.sample_request_ids)
                 if rid not in plan.spec_drafts]
        reqs = [self.requests[plan.sample_request_ids[i]] for i in plain]
        tokens = self.sampler(logits[plain] if len(plain) < len(logits) else logits, reqs)
        out = {req.request_id: (req, [tok]) for req, tok in zip(reqs, tokens)}
        rejected: dict[str, int] = {}
        row = 0
        ids = plan.sample_request_ids
        while row < len(ids):
            rid = ids[row]
            drafts = plan.spec_drafts.get(rid)
            if drafts is None:
                row += 1
                continue
            req = self.requests[rid]
            toks = verify(self.sampler, logits[row : row + len(drafts) + 1], req, drafts)
            rejected[rid] = len(drafts) + 1 - len(toks)
            req.metrics.num_draft_tokens += len(drafts)
            req.metrics.num_accepted_tokens += len(toks) - 1
            out[rid] = (req, toks)
            row += len(drafts) + 1
        return [out[rid] for rid in dict.fromkeys(ids)], rejected

    def _propose(self) -> None:
        """Drafts for the next step of every decoding request (none in a large batch)."""
        if self.proposer is None:
            return
        running = self.scheduler.running
        release = getattr(self.proposer, "release", None)
        if release is not None:  # draft pools: drop finished / aborted requests' sequences
            release({r.request_id for r in running})
        if len(running) > self.config.spec_disable_batch_size:
            return
        items = []
        for req in running:
            if req.num_tokens - req.num_computed_tokens != 1:
                continue  # still prefilling
            room = min(req.sampling.max_tokens - len(req.output_token_ids),
                       self.max_model_len - req.num_tokens) - 1
            items.append((req, room))
        batch = getattr(self.proposer, "propose_batch", None)
        if batch is not None:  # one batched draft forward per draft token
            for (req, _), drafts in zip(items, batch(items)):
                req.spec_token_ids = drafts
            return
        for req, room in items:
            req.spec_token_ids = self.proposer.propose(req, room)

    def _check_stop(self, req: Request, tok: int) -> None:
        sp = req.sampling
        n = len(req.output_token_ids)
        if n >= sp.min_tokens:
            if not sp.ignore_eos and tok in self.eos_token_ids:
                self._finish(req, FinishReason.STOP)
                return
            if tok in sp.stop_token_ids:
                req.stop_reason = tok
                self._finish(req, FinishReason.STOP)
                return
            if sp.stop:
                text = self._decode(req.output_token_ids)
                hits = [(text.find(s), s) for s in sp.stop if s in text]
                if hits:
                    idx, s = min(hits)
                    req.text, req.stop_reason = text[:idx], s
                    self._finish(req, FinishReason.STOP, keep_text=True)
                    return
        if n >= sp.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(req, FinishReason.LENGTH)

    def _finish(self, req: Request, reason: FinishReason, *, keep_text: bool = False,
                scheduler_done: bool = False) -> None:
        if not scheduler_done:
            self.scheduler.finish(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.metrics.finished_time = time.monotonic()
        if not keep_text:
            req.text = self._decode(req.output_token_ids)
        self.num_finished += 1

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _publish(self, req: Request) -> RequestOutput:
        sub = self._subscribers.get(req.request_id)
        if sub is not None and not req.finished:
            req.text = self._decode(req.output_token_ids)  # streamed text follows the tokens
        out = req.snapshot()
        if sub is not None:
            try:
                sub(out)
            except Exception:  # a broken consumer must not stop the other requests
                _log.exception("on_output callback of %s failed; aborting it", req.request_id)
                if not req.finished:
                    self.abort(req.request_id)
        if req.finished:
            # Finished requests leave the table once reported (the caller holds the output).
            self.requests.pop(req.request_id, None)
            self._subscribers.pop(req.request_id, None)
        return out

    # --- convenience drivers ----------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion; outputs in input order.

        A prompt that cannot run (too long for ``max_model_len`` or the pool, bad tokens)
        gets an output with ``finish_reason == "error"`` and the message in ``error``; the
        others finish normally. Bad ``SamplingParams`` raise ``ValueError`` before anything
        runs.
        """
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of strings or token-id lists")
        if sampling is None or isinstance(sampling, SamplingParams):
            params = [sampling or SamplingParams()] * len(prompts)
        else:
            params = list(sampling)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        rids: list[str] = []
        results: dict[str, RequestOutput] = {}
        subs: dict[str, queue.Queue[RequestOutput]] = {}
        background = self._thread is not None
        for prompt, sp in zip(prompts, params):
            try:
                rid, sub = self._add(prompt, sp, subscribe=background)
                rids.append(rid)
                if sub is not None:
                    subs[rid] = sub
            except ValueError as e:
                rid = f"req-{next(self._ids)}"
                rids.append(rid)
                results[rid] = _error_output(rid, prompt, str(e))
        waiting = set(rids) - set(results)
        bar = _progress(len(waiting), use_tqdm)
        if background:
            for rid, sub in subs.items():
                while True:
                    out = self._get(sub)
                    if out.finished:
                        results[rid] = out
                        bar.update(1)
                        break
        else:
            while waiting:
                for out in self.step():
                    if out.finished and out.request_id in waiting:
                        results[out.request_id] = out
                        waiting.discard(out.request_id)
                        bar.update(1)
        bar.close()
        return [results[rid] for rid in rids]

    def stream(
        self, prompt: str | Sequence[int], sampling: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Add one request and yield its snapshots as tokens arrive (``new_token_ids`` holds
        each delta); the last one has ``finished=True``. Drives :meth:`step` itself unless a
        background loop runs. Closing the iterator early aborts the request."""
        rid, sub = self._add(prompt, sampling, subscribe=True)
        done = False
        try:
            while not done:
                if self._thread is None:
                    while sub.empty():
                        self.step()
                out = self._get(sub)
                done = out.finished
                yield out
        finally:
            if not done:
                self.abort(rid)

    def _get(self, sub: queue.Queue[RequestOutput]) -> RequestOutput:
        while True:
            with contextlib.suppress(queue.Empty):
                return sub.get(timeout=0.1)
            if self._loop_error is not None:
                raise RuntimeError("the engine loop failed") from self._loop_error
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the engine loop stopped with the request unfinished")

    # --- background loop ------------------------------------------------------------------

    def start(self) -> None:
        """Run steps on a background thread whenever there is work (idempotent)."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="infopt-engine", daemon=True)
        self._thread.start()

    def stop(self, *, abort_unfinished: bool = True, timeout: float | None = 30.0) -> None:
        """Stop the background loop: unfinished requests are aborted (or, with
        ``abort_unfinished=False``, finished first)."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            if abort_unfinished:
                self._pending_aborts.extend(self.requests)
                self._pending_aborts.extend(r.request_id for r in self._pending)
            self._stopping = True
            self._wake.notify()
        thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._pending or self._pending_aborts or self._failed
                               or self.scheduler.has_work() or self._stopping):
                        self._wake.wait()
                    if self._stopping and not (self._pending or self._pending_aborts
                                               or self.scheduler.has_work()):
                        return
                self.step()
        except BaseException as e:  # surfaced to waiting callers by _get
            self._loop_error = e

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- stats --------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        sched = self.scheduler
        alloc = sched.allocator
        stats = getattr(alloc, "stats", None)
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting) + len(self._pending),
            num_finished=self.num_finished,
            num_blocks=alloc.num_blocks,
            blocks_used=sched.blocks_used,
            peak_blocks_used=sched.peak_blocks_used,
            num_preemptions=sched.num_preemptions,
            prefix_hit_rate=stats.hit_rate if stats is not None else 0.0,
            num_steps=self.num_steps,
            num_generated_tokens=self.num_generated,
        )


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _error_output(rid: str, prompt: Any, message: str) -> RequestOutput:
    from .request import RequestMetrics

    now = time.monotonic()
    ids = tuple(prompt) if not isinstance(prompt, str) else ()
    return RequestOutput(rid, ids, (), (), "", True, FinishReason.ERROR.value, None, message,
                         None, RequestMetrics(now, finished_time=now))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="infopt engine", unit="req")
