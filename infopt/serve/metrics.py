"""``GET /metrics``: Prometheus text from ``prometheus_client``.

Each app has its own registry (several servers can live in one process, e.g. in tests).
Engine gauges are read from ``Engine.stats()`` at scrape time; latency histograms are filled
as requests finish. The engine has no speculative decoding, so there is no acceptance metric.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..batching.request import RequestOutput

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                 1.0, 2.5)


class _EngineCollector:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, host: Any):
        self.host = host

    def describe(self) -> list[Metric]:
        return []  # collected lazily: the engine may not exist yet

    def collect(self) -> Iterator[Metric]:
        engine = self.host.engine
        yield GaugeMetricFamily("infopt_model_ready", "1 once the model is loaded and serving",
                                value=1.0 if self.host.state == "ready" else 0.0)
        if engine is None:
            return
        s = engine.stats()
        gauges = [
            ("infopt_num_requests_running", "requests in the running batch", s.num_running),
            ("infopt_num_requests_waiting", "requests queued for admission", s.num_waiting),
            ("infopt_kv_blocks_used", "KV blocks held by requests", s.blocks_used),
            ("infopt_kv_blocks_total", "KV blocks in the pool", s.num_blocks),
            ("infopt_kv_blocks_peak", "most KV blocks held at once", s.peak_blocks_used),
            ("infopt_kv_cache_usage_ratio", "blocks used / pool size",
             s.blocks_used / s.num_blocks if s.num_blocks else 0.0),
            ("infopt_prefix_cache_hit_rate", "share of prompt blocks found in the prefix cache",
             s.prefix_hit_rate),
        ]  # fmt: skip
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))
        counters = [
            ("infopt_engine_requests_finished", "requests the engine finished (any reason)",
             s.num_finished),
            ("infopt_num_preemptions", "requests preempted to free KV blocks",
             s.num_preemptions),
            ("infopt_engine_steps", "engine steps run", s.num_steps),
            ("infopt_engine_generation_tokens", "tokens the engine sampled",
             s.num_generated_tokens),
        ]  # fmt: skip
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=float(value))


class ServerMetrics:
    """The registry of one app plus the per-request observations the handlers make."""

    def __init__(self, host: Any):
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.ttft = Histogram("infopt_time_to_first_token_seconds",
                              "arrival -> first output token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("infopt_time_per_output_token_seconds",
                              "mean time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("infopt_e2e_request_latency_seconds", "arrival -> finished",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("infopt_request_queue_time_seconds",
                               "arrival -> first scheduled", buckets=_LATENCY_BUCKETS,
                               registry=r)
        self.finished = Counter(
            "infopt_request_finished", "requests ended, by reason (stop, length, error, abort: "
            "shutdown, timeout, disconnected)", ["reason"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("infopt_prompt_tokens", "prompt tokens of finished "
                                     "requests", registry=r)
        self.generation_tokens = Counter("infopt_generation_tokens", "output tokens of "
                                         "finished requests", registry=r)
        self.spec_draft = Counter("infopt_spec_draft_tokens", "speculative draft tokens "
                                  "verified (finished requests)", registry=r)
        self.spec_accepted = Counter("infopt_spec_accepted_tokens", "of which the model kept; "
                                     "acceptance = accepted / draft", registry=r)
        self.rejected = Counter("infopt_http_errors", "requests answered with an error status",
                                ["status"], registry=r)
        r.register(_EngineCollector(host))

    def observe(self, out: RequestOutput) -> None:
        """Record one finished request."""
        m = out.metrics
        for hist, value in ((self.ttft, m.ttft), (self.tpot, m.tpot), (self.e2e, m.e2e),
                            (self.queue, m.queue_time)):
            if value is not None:
                hist.observe(value)
        self.finished.labels(out.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.token_ids))
        self.spec_draft.inc(m.num_draft_tokens)
        self.spec_accepted.inc(m.num_accepted_tokens)

    def ended(self, reason: str) -> None:
        """A request that ended without a finished snapshot (timeout, disconnect)."""
        self.finished.labels(reason).inc()

    def render(self) -> bytes:
        return _generate(self.registry)
