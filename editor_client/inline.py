"""What the agent shows at the cursor: from the cache when the developer types through a
suggestion, from a request already in flight when the new position extends it, otherwise from
a new request sent once the adaptive debounce has seen a pause."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

from ghostpen.editor_client.cache import Anchor, CompletionCache, Suggestion
from ghostpen.editor_client.client import Completion, SessionClient
from ghostpen.editor_client.debounce import AdaptiveDebounce, automatic_request_allowed
from ghostpen.editor_client.settings import ClientSettings

LATENCY_SAMPLES = 1000  # the most recent kept: an editing day must not grow the agent


@dataclass
class InlineStats:
    """Counts and client-side latencies, for the benchmarks and `ghostpen/stats`."""

    calls: int = 0
    from_cache: int = 0
    from_in_flight: int = 0
    not_at_completion_point: int = 0
    debounced: int = 0  # automatic calls that a further keystroke made unnecessary
    requests: int = 0
    empty: int = 0  # requests that came back with nothing to show
    # Call to request queued, less the debounce and any wait on a request already in flight.
    before_send_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    # Final chunk to suggestion.
    after_receive_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))


@dataclass
class _InFlight:
    anchor: Anchor
    task: asyncio.Task[Completion | None]


class InlineCompleter:
    def __init__(self, settings: ClientSettings, client: SessionClient) -> None:
        self._settings = settings
        self._client = client
        self._debounce = AdaptiveDebounce(settings)
        self._cache = CompletionCache(settings.cache_entries)
        self._keystrokes = 0
        self._in_flight: _InFlight | None = None
        self.stats = InlineStats()

    def keystroke(self) -> None:
        self._keystrokes += 1
        self._debounce.keystroke(time.monotonic() * 1000)

    async def complete(self, path: str, cursor: int, automatic: bool) -> Suggestion | None:
        started = time.monotonic()
        self.stats.calls += 1
        tracked = self._client.files.get(path)
        if tracked is None or tracked.skipped:
            return None
        anchor = Anchor(path, tracked.text[:cursor], tracked.text[cursor:])
        if hit := self._cache.get(anchor):
            self.stats.from_cache += 1
            return hit
        if (in_flight := self._in_flight) and in_flight.anchor.typed_since(anchor) is not None:
            waiting = time.monotonic()
            completion = await asyncio.shield(in_flight.task)
            started += time.monotonic() - waiting  # the server's time, not the agent's
            if completion is not None:
                self._cache.put(in_flight.anchor, completion.completion_id, completion.text)
                if hit := self._cache.get(anchor):
                    self.stats.from_in_flight += 1
                    return dataclasses.replace(hit, source="in-flight")
        elif in_flight is not None:
            self._client.cancel_current()
        waited = 0.0
        if automatic:
            line_before = anchor.before[anchor.before.rfind("\n") + 1 :]
            line_after = anchor.after.split("\n", 1)[0]
            if not automatic_request_allowed(
                line_before, line_after, self._settings.max_chars_after_cursor
            ):
                self.stats.not_at_completion_point += 1
                return None
            keystrokes = self._keystrokes
            asleep = time.monotonic()
            await asyncio.sleep(self._debounce.delay_ms(line_before, line_after) / 1000)
            waited = time.monotonic() - asleep  # as slept: the loop's timers may wake early
            if self._keystrokes != keystrokes:
                self.stats.debounced += 1
                return None
        return await self._request(anchor, cursor, started + waited)

    async def _request(self, anchor: Anchor, cursor: int, ready: float) -> Suggestion | None:
        task = asyncio.create_task(self._client.complete(anchor.path, cursor))
        self._in_flight = _InFlight(anchor, task)
        self.stats.requests += 1
        completion = await asyncio.shield(task)
        if self._in_flight is not None and self._in_flight.task is task:
            self._in_flight = None
        if completion is None:
            return None
        self.stats.before_send_ms.append((completion.sent_at - ready) * 1000)
        if not completion.text:
            self.stats.empty += 1
            return None
        self._cache.put(anchor, completion.completion_id, completion.text)
        self.stats.after_receive_ms.append((time.monotonic() - completion.received_at) * 1000)
        return Suggestion(completion.completion_id, completion.text, "server")
