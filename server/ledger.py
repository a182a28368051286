"""Where every completion's outcome is booked once: the Prometheus series and the telemetry record.

`Completer.run` hands each outcome here, finished or stopped, so that what the dashboards count
and what the database keeps come from the same facts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ghostpen.server.completion import Outcome
from ghostpen.server.metrics import Metrics
from ghostpen.server.telemetry.records import CompletionRecord


class Ledger:
    def __init__(self, metrics: Metrics, record: Callable[[CompletionRecord], None]) -> None:
        self._metrics = metrics
        self._record = record

    def __call__(self, outcome: Outcome) -> None:
        metrics, job = self._metrics, outcome.job
        if outcome.stopped:
            if outcome.stopped != "error":
                metrics.cancellations.labels(outcome.engine, outcome.stopped).inc()
            if outcome.completion_tokens:  # generated for nobody
                wasted = metrics.wasted_tokens.labels(outcome.engine, outcome.model_id)
                wasted.inc(outcome.completion_tokens)
            return
        template = outcome.template
        metrics.observe(
            outcome.engine,
            outcome.model_id,
            template.template_id,
            outcome.finish.value,
            outcome.timings,
            outcome.completion_tokens,
        )
        self._record(
            CompletionRecord(
                completion_id=job.completion_id,
                created_ms=int(time.time() * 1000),
                model=outcome.model,
                template_id=template.template_id,
                template_hash=template.content_hash,
                engine=outcome.engine,
                language=job.document.language or "unknown",
                mode=outcome.mode.value,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                first_token_ms=outcome.timings.first_token_s * 1000,
                total_ms=outcome.timings.total_s * 1000,
                finish=outcome.finish.value,
                chars=outcome.chars,
            )
        )
