"""The one writer: batches completions and events into transactions off the completion path.

`record` returns a future that resolves once the completion's record is committed; the completer
waits on it (briefly) before the final chunk goes out, so an editor's later events find it even
after a SIGKILL. `submit` resolves once the events are committed, so an acknowledgement means
stored. Records of a batch that failed are written again with the next one, or after `retry_s`.
A deletion of captured text goes through the same queue, so that text queued before it is
written first and deleted with the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from ghostpen.server.errors import StoreUnavailable, UnknownRequest
from ghostpen.server.telemetry.records import (
    CaptureRecord,
    CompletionRecord,
    TelemetryEvent,
    corrections,
)
from ghostpen.server.telemetry.store import Store
from ghostpen.server.telemetry.store_process import StoreProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Delete:
    """Delete captured text (Store.delete_captured's arguments)."""

    tenant: str  # "*": every tenant
    user_id: str | None  # None: every user of the tenant
    before_ms: int | None = None  # None: whenever captured

    def covers(self, capture: CaptureRecord) -> bool:
        return (
            self.tenant in ("*", capture.tenant)
            and self.user_id in (None, capture.user_id)
            and (self.before_ms is None or capture.created_ms < self.before_ms)
        )


_Record = tuple[CompletionRecord, CaptureRecord | None]


@dataclass
class _Batch:
    completions: list[_Record] = field(default_factory=list)
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
        self._failed: OrderedDict[str, _Record] = OrderedDict()  # to write again
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def record(
        self, completion: CompletionRecord, capture: CaptureRecord | None = None
    ) -> asyncio.Future[None]:
        """Queue the record, and its captured text if any; the future resolves once both are
        committed, or fails with the store's error (they are kept and written again)."""
        self._remember(completion)
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        committed.add_done_callback(_retrieved)  # a caller that stopped waiting is no error
        self._queue.put_nowait(((completion, capture), committed))
        return committed

    async def delete_captured(
        self, tenant: str, user_id: str | None, before_ms: int | None = None
    ) -> tuple[int, int]:
        """Delete captured text (Store.delete_captured) once everything queued before is
        written. Returns how many completions' text and corrections went."""
        future: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)
        self._queue.put_nowait((_Delete(tenant, user_id, before_ms), future))
        return await future

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
        deletes: list[tuple[_Delete, asyncio.Future[tuple[int, int]]]] = []
        for item in items:
            if item is _RETRY:
                continue
            body, future = item  # type: ignore[misc]
            if isinstance(body, _Delete):
                deletes.append((body, future))
            elif isinstance(body, tuple):
                batch.completions.append(body)
                batch.committed.append(future)
            else:
                batch.events.extend(body)
                batch.waiters.append((body, future))
        if batch.completions or batch.events:
            await self._write_batch(batch, len(items))
        for delete, future in deletes:
            for key, (completion, capture) in list(self._failed.items()):  # not written again
                if capture is not None and delete.covers(capture):
                    self._failed[key] = (completion, None)
            try:
                deleted = await self.store.call(
                    Store.delete_captured, delete.tenant, delete.user_id, delete.before_ms
                )
            except Exception as exc:
                if not future.done():  # its caller may have stopped waiting
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(deleted)

    async def _write_batch(self, batch: _Batch, items: int) -> None:
        try:
            duplicates = await self.store.call(
                Store.write_rows,
                [completion.row() for completion, _ in batch.completions],
                [e.row() for e in batch.events],
                [capture.row() for _, capture in batch.completions if capture is not None],
                corrections(batch.events),
            )
        except StoreUnavailable as error:
            self._failed_batch(batch, error)
        except Exception as exc:  # a bug of ours; the callers still get an answer
            log.exception("telemetry write of %d items failed", items)
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
        for record in batch.completions[-self._known_max :]:
            self._failed[record[0].completion_id] = record
        if batch.completions:
            asyncio.get_running_loop().call_later(self._retry_s, self._queue.put_nowait, _RETRY)

    def _remember(self, completion: CompletionRecord) -> None:
        self._known[completion.completion_id] = completion
        if len(self._known) > self._known_max:
            self._known.popitem(last=False)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
