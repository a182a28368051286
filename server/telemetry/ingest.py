"""Take editor events: check them, join them to their completions, store, then count them.

An event is taken only from the user its completion was served to, and accepts at most the
characters that completion showed: a client cannot write into another user's numbers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence

from ghostpen.server.errors import InvalidInput, PermissionDenied
from ghostpen.server.identity import Identity
from ghostpen.server.metrics import Metrics
from ghostpen.server.telemetry.records import CaptureRecord, CompletionRecord, TelemetryEvent
from ghostpen.server.telemetry.writer import TelemetryWriter


class Telemetry:
    """`captures(tenant)`: whether that tenant consented to keeping text (capture_text); a
    correction from anyone else is dropped on arrival."""

    def __init__(
        self,
        writer: TelemetryWriter,
        metrics: Metrics,
        max_id_chars: int,
        captures: Callable[[str], bool],
    ) -> None:
        self._writer = writer
        self._metrics = metrics
        self._max_id_chars = max_id_chars
        self.captures = captures

    def record(
        self, completion: CompletionRecord, capture: CaptureRecord | None
    ) -> asyncio.Future[None]:
        """Resolves once the record (and the captured text, if any) is committed."""
        return self._writer.record(completion, capture)

    async def delete_captured(self, owner: Identity) -> tuple[int, int]:
        """Delete all of `owner`'s captured text; how many completions' text and corrections."""
        return await self._writer.delete_captured(owner.tenant, owner.user)

    async def report(self, owner: Identity, events: Sequence[TelemetryEvent]) -> list[bool]:
        """Store `owner`'s events (all or, on a bad one, none). Returns, per event, whether it
        is a duplicate: stored before, or repeated earlier in `events`."""
        for event in events:
            event.check(self._max_id_chars)
        if not self.captures(owner.tenant):
            events = [dataclasses.replace(e, final_text=None) for e in events]
        completions = await self._writer.completions_for(list(events))
        for event in events:
            _check_owned(owner, event, completions[event.completion_id])
        before = await self._writer.submit(list(events))
        seen: set[tuple[str, str]] = set()
        duplicate = []
        for event in events:
            repeated = event.key in before or event.key in seen
            seen.add(event.key)
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


def _check_owned(owner: Identity, event: TelemetryEvent, completion: CompletionRecord) -> None:
    if (completion.user_id, completion.tenant) != (owner.user, owner.tenant):
        raise PermissionDenied(
            f"event {event.event_id!r} is for completion {event.completion_id!r}, which was "
            "served to another user"
        )
    if event.accepted_chars is not None and event.accepted_chars > completion.chars:
        raise InvalidInput(
            f"event {event.event_id!r} accepts {event.accepted_chars} characters of completion "
            f"{event.completion_id!r}, which showed {completion.chars}"
        )
