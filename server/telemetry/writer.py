"""The one writer: batches completions and events into transactions off the completion path.

`record` is fire-and-forget (a completion's metadata must not slow the completion);
`submit` resolves once the events are committed, so an acknowledgement means stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from ghostpen.server.errors import UnknownRequest
from ghostpen.server.telemetry.records import CompletionRecord, TelemetryEvent
from ghostpen.server.telemetry.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Batch:
    completions: list[CompletionRecord] = field(default_factory=list)
    events: list[TelemetryEvent] = field(default_factory=list)
    waiters: list[tuple[list[TelemetryEvent], asyncio.Future[set[str]]]] = field(
        default_factory=list
    )


class TelemetryWriter:
    def __init__(self, store: Store, batch_max: int, known_max: int) -> None:
        self.store = store
        self._batch_max = batch_max
        self._known_max = known_max
        self._queue: asyncio.Queue[CompletionRecord | tuple] = asyncio.Queue()
        self._known: OrderedDict[str, CompletionRecord] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="telemetry")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def record(self, completion: CompletionRecord) -> None:
        self._remember(completion)
        self._queue.put_nowait(completion)

    async def completions_for(self, events: list[TelemetryEvent]) -> dict[str, CompletionRecord]:
        """The completion of every event; UnknownRequest names the first that has none."""
        found = {
            e.completion_id: self._known[e.completion_id]
            for e in events
            if e.completion_id in self._known
        }
        missing = {e.completion_id for e in events} - found.keys()
        if missing:
            loop = asyncio.get_running_loop()
            stored = await loop.run_in_executor(
                self._executor, self.store.known_completions, missing
            )
            found.update(stored)
        for event in events:
            if event.completion_id not in found:
                raise UnknownRequest(
                    f"event {event.event_id!r} is for completion {event.completion_id!r}, "
                    "which this server never served"
                )
        return found

    async def read(self, query: Callable[[Store], T]) -> T:
        """Run a read on the store's thread, between writes (a connection is not shared)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, query, self.store)

    async def submit(self, events: list[TelemetryEvent]) -> set[str]:
        """Wait until the events are committed; returns the ids that were stored before
        (by an earlier submission)."""
        future: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((events, future))
        return await future

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self.store.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while len(items) < self._batch_max and not self._queue.empty():
                items.append(self._queue.get_nowait())
            batch = _Batch()
            for item in items:
                if isinstance(item, CompletionRecord):
                    batch.completions.append(item)
                else:
                    batch.events.extend(item[0])
                    batch.waiters.append(item)
            try:
                duplicates = await loop.run_in_executor(
                    self._executor, self.store.write, batch.completions, batch.events
                )
            except Exception as exc:
                log.exception("telemetry write of %d items failed", len(items))
                for _, future in batch.waiters:
                    if not future.done():
                        future.set_exception(exc)
            else:
                claimed = set(duplicates)  # an id belongs to the first submitter that sent it
                for events, future in batch.waiters:
                    ids = {e.event_id for e in events}
                    if not future.done():
                        future.set_result(ids & claimed)
                    claimed |= ids
            finally:
                for _ in items:
                    self._queue.task_done()

    def _remember(self, completion: CompletionRecord) -> None:
        self._known[completion.completion_id] = completion
        if len(self._known) > self._known_max:
            self._known.popitem(last=False)
