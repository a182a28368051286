"""Prometheus series for live dashboards: requests, cancellations, errors, and per-stage latency."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

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
