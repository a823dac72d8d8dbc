"""Requests inside the engine and what the engine hands back.

:class:`Request` is the engine's mutable record of one request (host-only: token ids, how many
of them have K/V in the pool, its blocks, its RNG). :class:`RequestOutput` is the immutable
snapshot users receive, with :class:`RequestMetrics` (queue time, TTFT, TPOT).
"""

from __future__ import annotations

import dataclasses
import enum
import time

import torch

from .params import SamplingParams

__all__ = ["FinishReason", "Request", "RequestMetrics", "RequestOutput", "RequestStatus"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # new, or preempted (its K/V dropped: recomputed on readmission)
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # Engine.abort
    ERROR = "error"  # the request alone failed (see RequestOutput.error)


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (``time.monotonic()`` seconds) of one request.

    ``queue_time``: arrival -> first scheduled; ``ttft``: arrival -> first output token;
    ``tpot``: mean time per output token after the first; ``e2e``: arrival -> finished.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generated: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_draft_tokens: int = 0  # speculative drafts verified
    num_accepted_tokens: int = 0  # of which the target kept

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        if self.num_generated < 2 or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_generated - 1)

    @property
    def e2e(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one output position: the chosen token's and the top ``k``."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A snapshot of one request.

    Attributes:
        request_id: as returned by ``Engine.add_request``.
        prompt_token_ids: the prompt.
        token_ids: every output token so far.
        new_token_ids: the tokens added since the previous snapshot of this request (streaming).
        text: the decoded output (cut before a matched stop string); "" without a tokenizer.
        finished: no more tokens will come.
        finish_reason: a :class:`FinishReason` value once finished, else ``None``.
        stop_reason: the stop string or token id that ended it, if any.
        error: the message when ``finish_reason == "error"``.
        logprobs: one :class:`TokenLogprobs` per output token when requested.
        metrics: timings.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    new_token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    error: str | None
    logprobs: tuple[TokenLogprobs, ...] | None
    metrics: RequestMetrics


class Request:
    """The engine's record of one request (mutated by the scheduler and the engine only)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling = sampling
        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the pool
        self.blocks: list[int] = []  # block table; -1 marks a block freed by sliding windows
        self.block_hashes: list[bytes] = []  # chain digests of its full blocks (prefix caching)
        self.num_registered_blocks = 0  # leading full blocks already named in the prefix index
        self.spec_token_ids: list[int] = []  # drafts to verify in the next step
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        self.metrics = RequestMetrics(arrival)
        seed = sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.logprobs: list[TokenLogprobs] | None = [] if sampling.logprobs is not None else None
        self.text = ""
        self.num_emitted = 0  # output tokens already reported (for new_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def snapshot(self) -> RequestOutput:
        new = tuple(self.output_token_ids[self.num_emitted :])
        self.num_emitted = len(self.output_token_ids)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=tuple(self.prompt_token_ids),
            token_ids=tuple(self.output_token_ids),
            new_token_ids=new,
            text=self.text,
            finished=self.finished,
            finish_reason=None if self.finish_reason is None else self.finish_reason.value,
            stop_reason=self.stop_reason,
            error=self.error,
            logprobs=None if self.logprobs is None else tuple(self.logprobs),
            metrics=dataclasses.replace(self.metrics),
        )
