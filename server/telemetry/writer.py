"""The one writer: batches completions and events into transactions off the completion path.

`record` returns a future that resolves once the completion's record is committed; the completer
waits on it (briefly) before the final chunk goes out, so an editor's later events find it even
after a SIGKILL. `submit` resolves once the events are committed, so an acknowledgement means
stored. Records of a batch that failed are written again with the next one, or after `retry_s`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from ghostpen.server.errors import StoreUnavailable, UnknownRequest
from ghostpen.server.telemetry.records import CompletionRecord, TelemetryEvent
from ghostpen.server.telemetry.store import Store
from ghostpen.server.telemetry.store_process import StoreProcess

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    completions: list[CompletionRecord] = field(default_factory=list)
    committed: list[asyncio.Future[None]] = field(default_factory=list)
    events: list[TelemetryEvent] = field(default_factory=list)
    waiters: list[tuple[list[TelemetryEvent], asyncio.Future[set[tuple[str, str]]]]] = field(
        default_factory=list
    )


_RETRY = object()  # a queue item that only wakes the writer to write what failed before


class TelemetryWriter:
    def __init__(self, store: StoreProcess, batch_max: int, known_max: int, retry_s: float) -> None:
        self.store = store
        self._batch_max = batch_max
        self._known_max = known_max
        self._retry_s = retry_s
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._known: OrderedDict[str, CompletionRecord] = OrderedDict()
        self._failed: OrderedDict[str, CompletionRecord] = OrderedDict()  # to write again
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def record(self, completion: CompletionRecord) -> asyncio.Future[None]:
        """Queue the record; the future resolves once it is committed, or fails with the
        store's error (the record is kept and written again)."""
        self._remember(completion)
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        committed.add_done_callback(_retrieved)  # a caller that stopped waiting is no error
        self._queue.put_nowait((completion, committed))
        return committed

    async def completions_for(self, events: list[TelemetryEvent]) -> dict[str, CompletionRecord]:
        """The completion of every event; UnknownRequest names the first that has none."""
        found = {
            e.completion_id: self._known[e.completion_id]
            for e in events
            if e.completion_id in self._known
        }
        missing = {e.completion_id for e in events} - found.keys()
        if missing:
            found.update(await self.store.call(Store.known_completions, missing))
        for event in events:
            if event.completion_id not in found:
                raise UnknownRequest(
                    f"event {event.event_id!r} is for completion {event.completion_id!r}, "
                    "which this server never served"
                )
        return found

    async def submit(self, events: list[TelemetryEvent]) -> set[tuple[str, str]]:
        """Wait until the events are committed; returns the keys (user, event id) that were
        stored before (by an earlier submission)."""
        if not events:  # nothing to write: no batch would ever answer
            return set()
        future: asyncio.Future[set[tuple[str, str]]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((events, future))
        return await future

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.store.close()

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self._batch_max and not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                await self._write(items)
            finally:
                for _ in items:
                    self._queue.task_done()

    async def _write(self, items: list[object]) -> None:
        batch = _Batch(completions=list(self._failed.values()))
        self._failed.clear()
        for item in items:
            if item is _RETRY:
                continue
            body, future = item  # type: ignore[misc]
            if isinstance(body, CompletionRecord):
                batch.completions.append(body)
                batch.committed.append(future)
            else:
                batch.events.extend(body)
                batch.waiters.append((body, future))
        if not batch.completions and not batch.events:
            return
        try:
            duplicates = await self.store.call(
                Store.write_rows,
                [c.row() for c in batch.completions],
                [e.row() for e in batch.events],
            )
        except StoreUnavailable as error:
            self._failed_batch(batch, error)
        except Exception as exc:  # a bug of ours; the callers still get an answer
            log.exception("telemetry write of %d items failed", len(items))
            self._failed_batch(batch, StoreUnavailable(f"telemetry write failed: {exc}"))
        else:
            for future in batch.committed:
                if not future.done():
                    future.set_result(None)
            claimed = set(duplicates)  # a key belongs to the first submitter that sent it
            for events, waiter in batch.waiters:
                keys = {e.key for e in events}
                if not waiter.done():
                    waiter.set_result(keys & claimed)
                claimed |= keys

    def _failed_batch(self, batch: _Batch, error: StoreUnavailable) -> None:
        log.warning(
            "telemetry write failed (%s); %d completion records kept to write again",
            error,
            len(batch.completions),
        )
        for future in [*batch.committed, *(waiter for _, waiter in batch.waiters)]:
            if not future.done():
                future.set_exception(error)
        for completion in batch.completions[-self._known_max :]:
            self._failed[completion.completion_id] = completion
        if batch.completions:
            asyncio.get_running_loop().call_later(self._retry_s, self._queue.put_nowait, _RETRY)

    def _remember(self, completion: CompletionRecord) -> None:
        self._known[completion.completion_id] = completion
        if len(self._known) > self._known_max:
            self._known.popitem(last=False)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
