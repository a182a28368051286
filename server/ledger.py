"""Where every completion's outcome is booked once: the Prometheus series and the telemetry record.

`Completer.run` hands each outcome here, finished or stopped, so that what the dashboards count
and what the database keeps come from the same facts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

from ghostpen.server.completion import Outcome
from ghostpen.server.errors import StoreUnavailable
from ghostpen.server.metrics import Metrics
from ghostpen.server.telemetry.records import CaptureRecord, CompletionRecord

Record = Callable[[CompletionRecord, CaptureRecord | None], asyncio.Future[None]]


class Ledger:
    """`record` queues a completion's record and returns a future resolved once it is committed;
    a finished completion waits for it up to `commit_wait_s`, so that its final chunk normally
    leaves only once the record is safe. A store that is down never holds a completion longer.
    `captures(tenant)`: whether the text of that tenant's completions is kept too (consent)."""

    def __init__(
        self,
        metrics: Metrics,
        record: Record,
        commit_wait_s: float,
        captures: Callable[[str], bool] = lambda tenant: False,
    ) -> None:
        self._metrics = metrics
        self._record = record
        self._commit_wait_s = commit_wait_s
        self._captures = captures

    def stopped(self, outcome: Outcome) -> None:
        metrics = self._metrics
        if outcome.stopped != "error":
            metrics.cancellations.labels(outcome.engine, outcome.stopped).inc()
        if outcome.completion_tokens:  # generated for nobody
            wasted = metrics.wasted_tokens.labels(outcome.engine, outcome.model_id)
            wasted.inc(outcome.completion_tokens)

    async def finished(self, outcome: Outcome) -> None:
        metrics, job = self._metrics, outcome.job
        template = outcome.template
        metrics.observe(
            outcome.engine,
            outcome.model_id,
            template.template_id,
            outcome.finish.value,
            outcome.timings,
            outcome.completion_tokens,
        )
        now_ms = int(time.time() * 1000)
        committed = self._record(
            CompletionRecord(
                completion_id=job.completion_id,
                created_ms=now_ms,
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
                user_id=job.owner.user,
                team=job.owner.team,
                tenant=job.owner.tenant,
                confidence=outcome.confidence,
                withheld=outcome.withheld,
                experiment=job.assignment.experiment,
                arm=job.assignment.arm,
            ),
            _capture(outcome, now_ms)
            if outcome.text and self._captures(job.owner.tenant)
            else None,
        )
        with contextlib.suppress(TimeoutError, StoreUnavailable):  # kept and written again
            await asyncio.wait_for(asyncio.shield(committed), self._commit_wait_s)


def _capture(outcome: Outcome, created_ms: int) -> CaptureRecord:
    job, prompt = outcome.job, outcome.job.prompt
    context = [
        {
            "path": item.chunk.path,
            "start_line": item.chunk.start_line,
            "end_line": item.chunk.end_line,
            "text": item.chunk.text,
        }
        for item in prompt.context
    ]
    return CaptureRecord(
        completion_id=job.completion_id,
        created_ms=created_ms,
        user_id=job.owner.user,
        tenant=job.owner.tenant,
        template_id=outcome.template.template_id,
        repo=prompt.repo,
        path=job.document.path,
        language=job.document.language or "unknown",
        prefix=prompt.prefix,
        suffix=prompt.suffix,
        healed=prompt.healed,
        context=json.dumps(context),
        shown=outcome.text,
    )
