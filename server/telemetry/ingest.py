"""Take editor events: check them, join them to their completions, store, then count them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ghostpen.server.metrics import Metrics
from ghostpen.server.telemetry.records import CompletionRecord, TelemetryEvent
from ghostpen.server.telemetry.writer import TelemetryWriter


class Telemetry:
    def __init__(self, writer: TelemetryWriter, metrics: Metrics, max_id_chars: int) -> None:
        self._writer = writer
        self._metrics = metrics
        self._max_id_chars = max_id_chars

    def record(self, completion: CompletionRecord) -> asyncio.Future[None]:
        """Resolves once the record is committed."""
        return self._writer.record(completion)

    async def report(self, events: Sequence[TelemetryEvent]) -> list[bool]:
        """Store the events (all or, on a bad one, none). Returns, per event, whether it is a
        duplicate: stored before, or repeated earlier in `events`."""
        for event in events:
            event.check(self._max_id_chars)
        completions = await self._writer.completions_for(list(events))
        before = await self._writer.submit(list(events))
        seen: set[str] = set()
        duplicate = []
        for event in events:
            repeated = event.event_id in before or event.event_id in seen
            seen.add(event.event_id)
            duplicate.append(repeated)
            if not repeated:
                self._count(event, completions[event.completion_id])
        return duplicate

    def _count(self, event: TelemetryEvent, completion: CompletionRecord) -> None:
        labels = (completion.model, completion.template_id, completion.language, completion.engine)
        if event.kind == "retention":
            self._metrics.retention.labels(*labels, str(event.after_s)).observe(event.fraction)
            return
        self._metrics.completion_events.labels(*labels, event.kind).inc()
        if event.accepted_chars:
            self._metrics.accepted_chars.labels(*labels).inc(event.accepted_chars)
