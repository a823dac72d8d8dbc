"""Timing and memory probes used by the bench runner.

Timing goes *through* ``model.generate`` with a streamer, so wrapped models (paged KV cache,
speculative decoding, ...) are measured exactly the way users call them. HF calls
``streamer.put(prompt_ids)`` once before prefill, then ``put(new_ids)`` after every decoding
step (several ids at once for speculative decoding), then ``end()``. Each ``put`` copies the
ids to the host, which synchronizes the device, so host timestamps are honest on CUDA too.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class TimingStreamer:
    """A ``generate`` streamer that records when each chunk of new tokens arrived.

    Args:
        prompt_ids: the prompt, shape ``[prompt_len]`` (batch 1); the first ``put`` that equals
            it is treated as the prompt echo and not counted as generated.
        clock: monotonic seconds; injectable so tests can drive it deterministically.
    """

    def __init__(self, prompt_ids: torch.Tensor, clock: Callable[[], float] = time.perf_counter):
        self._prompt = prompt_ids.reshape(-1).cpu()
        self._clock = clock
        self.start: float | None = None
        self.chunks: list[tuple[float, int]] = []  # (arrival time, number of new tokens)
        self.ended = False
        self._seen_prompt = False

    def begin(self) -> None:
        """Mark t=0 (call right before ``generate``)."""
        self.start = self._clock()

    def put(self, value: torch.Tensor) -> None:
        now = self._clock()
        value = value.reshape(-1)  # batch 1: [n] or [1, n] -> [n]
        if not self._seen_prompt and not self.chunks:
            self._seen_prompt = True
            if value.numel() == self._prompt.numel() and torch.equal(value.cpu(), self._prompt):
                return
        self.chunks.append((now, value.numel()))

    def end(self) -> None:
        self.ended = True

    @property
    def n_new(self) -> int:
        """Number of generated tokens streamed."""
        return sum(n for _, n in self.chunks)

    def ttft_s(self) -> float:
        """Seconds from :meth:`begin` to the first chunk of new tokens (prefill + first step)."""
        if self.start is None or not self.chunks:
            raise RuntimeError("no new tokens were streamed")
        return self.chunks[0][0] - self.start

    def decode_tok_s(self) -> float:
        """Tokens/s after the first chunk: ``(n_new - first_chunk) / (t_last - t_first)``.

        With one token per step this is ``(n_new - 1) / (t_last - t_first)``; tokens that
        arrive together with the first chunk (speculative decoding) are prefill output and are
        excluded along with it.
        """
        if len(self.chunks) < 2:
            raise RuntimeError("decode rate needs at least two streamed chunks")
        (t0, n0), (t1, _) = self.chunks[0], self.chunks[-1]
        if t1 <= t0:
            raise RuntimeError("clock did not advance during decoding")
        return (self.n_new - n0) / (t1 - t0)


@dataclasses.dataclass
class GenTiming:
    """One timed ``generate`` call (batch 1)."""

    ttft_s: float
    decode_tok_s: float
    n_new: int
    total_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _SuppressIds(LogitsProcessor):
    """HF ``LogitsProcessor``: logits of ``ids`` set to -inf at every step.

    The timed runs must produce exactly ``new_tokens`` tokens, i.e. EOS suppressed throughout.
    HF's ``min_new_tokens`` does that by building ``arange(vocab)`` and an ``isin`` mask every
    step: ~2.7 ms per token with Qwen2.5's 152k vocabulary on the 2-core CPU, a harness cost
    that every row paid (1% of an fp32 1.5B step, 4% of an int4 one). One index_fill_ does the
    same job in microseconds.
    """

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill_(-1, self.ids.to(scores.device), float("-inf"))


def _eos_suppression(model: Any, new_tokens: int) -> dict[str, Any]:
    """generate() kwargs that suppress EOS for the whole run: a ``_SuppressIds`` processor for
    HF's generate, ``min_new_tokens`` where the generate function implements it natively
    (infopt.speculative's, which takes no processors) or the model names no EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    native = getattr(model.generate, "infopt_native_min_new_tokens", False)
    if eos is None or native:
        return {"min_new_tokens": new_tokens}
    ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
    return {"logits_processor": LogitsProcessorList([_SuppressIds(ids)])}


def timed_generate(
    model: Any,
    input_ids: torch.Tensor,
    new_tokens: int,
    *,
    pad_token_id: int,
    clock: Callable[[], float] = time.perf_counter,
) -> GenTiming:
    """Greedy-generate exactly ``new_tokens`` tokens for ``input_ids`` ([1, prompt_len]).

    Raises ``RuntimeError`` if the model produced a different number of tokens: a row whose
    token count differs from the others would not be comparable.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to measure a decode rate, got {new_tokens}")
    device = input_ids.device
    streamer = TimingStreamer(input_ids, clock=clock)
    eos_kwargs = _eos_suppression(model, new_tokens)
    _sync(device)
    streamer.begin()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        streamer=streamer,
        # EOS suppressed for the whole run, so every row does the same work.
        **eos_kwargs,
    )
    _sync(device)
    total = clock() - streamer.start
    produced = out.shape[-1] - input_ids.shape[-1]
    if produced != new_tokens or streamer.n_new != new_tokens:
        raise RuntimeError(
            f"generate produced {produced} tokens ({streamer.n_new} streamed), "
            f"expected exactly {new_tokens}"
        )
    return GenTiming(streamer.ttft_s(), streamer.decode_tok_s(), new_tokens, total)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "min", "max"}`` of a non-empty sequence."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


# --- memory -----------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM). Linux >= 4.0; False where unsupported."""
    if _proc_status_kb("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory over a ``with`` block.

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, excludes the allocator's
    cache). On CPU: process peak RSS, read from the kernel's high-water mark (VmHWM, reset on
    entry) where Linux allows it, so nothing perturbs the timing; otherwise a psutil sampler
    thread every ``interval_s`` (can miss spikes shorter than the interval). ``method`` says
    which was used. ``peak_bytes`` is absolute: it includes everything the process holds.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self.method = "cuda.max_memory_allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _reset_hwm():
            self.method = "rss.VmHWM"
        else:
            self.method = f"rss.sampled@{self.interval_s * 1e3:g}ms"
            self.peak_bytes = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process(os.getpid())
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            self.peak_bytes = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now, on the same scale as :class:`PeakMemory` for ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return current_rss_bytes()
