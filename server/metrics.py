"""Prometheus series for live dashboards: requests, cancellations, errors, and per-stage latency."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ghostpen.server.engines.base import STEP_BUCKETS, EngineStats

LOOP_PROBE_S = 0.05  # how often the event loop's lag is sampled
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True)
class Timings:
    """Seconds from the request's arrival; queue_s is the wait for the engine alone."""

    context_s: float
    queue_s: float
    first_token_s: float
    total_s: float
    engine_s: float  # from handing the prompt to the engine until its last delta


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ("engine", "model", "template")
        self.requests = Counter(
            "ghostpen_completions",
            "Completion requests by how they finished.",
            [*labels, "finish"],
            registry=self.registry,
        )
        self.cancellations = Counter(
            "ghostpen_cancellations",
            "Requests stopped before they finished, by cause.",
            ["engine", "reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "ghostpen_errors",
            "Requests and messages refused or failed, by gRPC status.",
            ["rpc", "code"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "ghostpen_stage_seconds",
            "Latency by stage: context, queue, first_token, total.",
            [*labels, "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        event_labels = ("model", "template", "language", "engine")
        self.completion_events = Counter(
            "ghostpen_completion_events",
            "Editor events on served completions: shown, accepted, partially_accepted, rejected.",
            [*event_labels, "kind"],
            registry=self.registry,
        )
        self.accepted_chars = Counter(
            "ghostpen_accepted_chars",
            "Characters accepted, wholly or partly.",
            event_labels,
            registry=self.registry,
        )
        self.retention = Histogram(
            "ghostpen_retention_fraction",
            "Fraction of accepted text still in the file, by seconds after acceptance.",
            [*event_labels, "after_s"],
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
            registry=self.registry,
        )
        self.wasted_tokens = Counter(
            "ghostpen_wasted_tokens",
            "Tokens generated for requests that were cancelled, superseded or dropped.",
            ["engine", "model"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "ghostpen_completion_tokens",
            "Tokens generated for completions that finished.",
            labels,
            registry=self.registry,
        )

        self.engine_ipc_seconds = Histogram(
            "ghostpen_engine_ipc_seconds",
            "Time a token delta takes from the engine process to the server's event loop.",
            buckets=(0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.05),
            registry=self.registry,
        )

        self.upstream_seconds = Histogram(
            "ghostpen_upstream_seconds",
            "The remote engine's upstreams: latency to the first token and to the last.",
            ["upstream", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "ghostpen_upstream_errors",
            "Requests an upstream failed, by reason: refused, status, broken.",
            ["upstream", "reason"],
            registry=self.registry,
        )
        self.upstream_in_flight = Gauge(
            "ghostpen_upstream_in_flight",
            "Requests streaming from each upstream now.",
            ["upstream"],
            registry=self.registry,
        )
        self.upstream_healthy = Gauge(
            "ghostpen_upstream_healthy",
            "1 while the upstream's last health check passed, else 0.",
            ["upstream"],
            registry=self.registry,
        )

        self.loop_lag_seconds = Histogram(
            "ghostpen_event_loop_lag_seconds",
            f"How late the event loop wakes from a {LOOP_PROBE_S * 1000:.0f} ms sleep: how long "
            "every other client waited on whatever held it.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=self.registry,
        )

    async def watch_loop(self) -> None:
        """Sample the event loop's lag until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(LOOP_PROBE_S)
            self.loop_lag_seconds.observe(max(0.0, loop.time() - asked - LOOP_PROBE_S))

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Export the engine's scheduler state, read at each scrape."""
        self.registry.register(_EngineCollector(stats))

    def observe(
        self, engine: str, model: str, template: str, finish: str, timings: Timings, tokens: int
    ) -> None:
        self.requests.labels(engine, model, template, finish).inc()
        self.completion_tokens.labels(engine, model, template).inc(tokens)
        for stage, seconds in (
            ("context", timings.context_s),
            ("queue", timings.queue_s),
            ("first_token", timings.first_token_s),
            ("total", timings.total_s),
        ):
            self.stage_seconds.labels(engine, model, template, stage).observe(seconds)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        stats = self._stats()
        gauges = (
            ("queue_depth", "Requests waiting for a KV sequence.", stats.waiting),
            ("running", "Requests being read or decoded.", stats.running),
            (
                "sequences_resident",
                "Sessions whose KV cache is resident.",
                stats.sequences_resident,
            ),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(f"ghostpen_engine_{name}", text, value=value)
        kv = GaugeMetricFamily(
            "ghostpen_engine_kv_tokens", "KV cache tokens, used and free.", labels=["state"]
        )
        kv.add_metric(["used"], stats.kv_tokens_used)
        kv.add_metric(["free"], stats.kv_tokens_capacity - stats.kv_tokens_used)
        yield kv
        counters = (
            ("evictions", "Sessions' KV sequences evicted to make room.", stats.evictions),
            (
                "prompt_tokens_read",
                "Prompt tokens read, cancelled ones too.",
                stats.tokens_prefilled,
            ),
            ("tokens_generated", "Tokens generated, cancelled ones too.", stats.tokens_generated),
            ("restarts", "Engine process restarts after a crash.", stats.restarts),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(f"ghostpen_engine_{name}", text, value=value)
        if stats.step_buckets:
            cumulative, buckets = 0, []
            for bound, count in zip((*STEP_BUCKETS, float("inf")), stats.step_buckets, strict=True):
                cumulative += count
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            yield HistogramMetricFamily(
                "ghostpen_engine_step_tokens",
                "Tokens per engine step (one llama_decode): batch size.",
                buckets=buckets,
                sum_value=stats.step_tokens,
            )
