"""The gRPC servicer, a thin adapter: wire → domain → session or completer → wire.

Every failure reaches the caller through one of two doors: an `Error` message on the Session
stream (`_Stream.send`), or the call's status on Complete and Report (`_abort`). Both count it
and take its status from `wire.status_of`; an exception that is not a GhostpenError is a bug of
ours, logged with its traceback and answered INTERNAL. A Session message that does not parse ends
the stream with INVALID_ARGUMENT, after an Error for each request in flight.

Each call is authenticated first, before its request is looked at; what it creates (sessions,
completions, events) belongs to the caller's Identity.

`drain` is the graceful half of a shutdown: new work is refused UNAVAILABLE, idle sessions end at
once, and what is in flight gets the grace period to finish, then ends UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from functools import partial
from typing import Any, NoReturn

import grpc

from ghostpen.server import wire
from ghostpen.server.arms import Traffic
from ghostpen.server.auth import Authenticator
from ghostpen.server.chunker_process import ChunkerProcess
from ghostpen.server.completion import Completer, CompletionEvent, CompletionJob
from ghostpen.server.errors import (
    DeadlinePassed,
    GhostpenError,
    InternalError,
    LimitExceeded,
    ShuttingDown,
    over_limit,
)
from ghostpen.server.identity import LOCAL, Identity
from ghostpen.server.inline import InlineCompletions
from ghostpen.server.metrics import Metrics
from ghostpen.server.session import (
    Cancel,
    FileRequest,
    Hello,
    Inbound,
    Outbound,
    RequestError,
    Session,
)
from ghostpen.server.settings import LimitSettings, Settings
from ghostpen.server.telemetry.ingest import Telemetry
from ghostpen.server.telemetry.records import TelemetryEvent
from ghostpen.server.workspace import FileChange

log = logging.getLogger(__name__)
FIRST_MESSAGE_WAIT_S = 1.0  # how long a refused stream may take to send its first message


class CompletionService:
    """Registered with `wire.handlers`, which parses requests (a `Corrupt` one included)."""

    def __init__(
        self,
        completer: Completer,
        traffic: Traffic,
        chunker: ChunkerProcess,
        inline: InlineCompletions,
        telemetry: Telemetry,
        settings: Settings,
        metrics: Metrics,
        auth: Authenticator,
    ) -> None:
        self._completer = completer  # Complete calls'; a session's is its arm's (Traffic)
        self._traffic = traffic
        self._chunker = chunker
        self._auth = auth
        self._inline = inline
        self._telemetry = telemetry
        self._settings = settings
        self._limits = settings.limits
        self._max_events = settings.telemetry.max_events_per_report
        self._metrics = metrics
        self._sessions: dict[Session, _Stream] = {}
        self._sessions_of: Counter[str] = Counter()  # open sessions by user
        self._calls_of: Counter[str] = Counter()  # Complete calls in flight by user
        self._jobs: set[asyncio.Task[None]] = set()  # Complete calls' completions
        self._background: set[asyncio.Task[None]] = set()
        self._draining = False
        self._late = _refused()  # what a request still in flight when the grace ran out gets

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, end idle sessions now, and give what is in flight `grace_s` to
        finish; what has not by then ends UNAVAILABLE with a message saying so."""
        self._draining = True
        self._late = ShuttingDown(
            f"the server shut down before the completion finished (shutdown_grace_s={grace_s:g});"
            " retry on another replica or once it is back"
        )

        async def settle(session: Session, stream: _Stream) -> None:
            drained = asyncio.create_task(session.drain())
            _, late = await asyncio.wait({drained, *stream.acks}, timeout=grace_s)
            drained.cancel()
            if late:
                await stream.end(session, self._late, "shutdown")
            else:
                await stream.end(session, _refused())

        async def finish_jobs() -> None:
            if not self._jobs:
                return
            _, running = await asyncio.wait(self._jobs, timeout=grace_s)
            for job in running:
                job.cancel("shutdown")
            await asyncio.gather(*running, return_exceptions=True)

        await asyncio.gather(
            finish_jobs(), *(settle(session, stream) for session, stream in self._sessions.items())
        )

    async def Session(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        owner = await self._identify(context, "Session", request_iterator)
        try:
            self._admit_session(owner)
            affinity = wire.affinity(context.invocation_metadata(), self._limits)
        except GhostpenError as error:
            await self._abort(context, "Session", error)
        stream = _Stream(self._metrics, self._limits)
        session_id = uuid.uuid4().hex
        session = Session(
            session_id,
            self._traffic.completer(owner, affinity or session_id),
            self._chunker,
            self._settings,
            stream.send,
            owner,
            affinity,
        )
        self._sessions[session] = stream
        reader = asyncio.create_task(self._read(session, request_iterator, stream))
        stream.on_overflow(partial(self._cut_off, session, asyncio.current_task()))
        try:
            with _counted(self._sessions_of, owner.user):
                while (message := await stream.queue.get()) is not None:
                    if isinstance(message, GhostpenError):  # the stream ends for it
                        await self._abort(context, "Session", message)
                    yield message
        finally:
            del self._sessions[session]
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await session.close()

    def _admit_session(self, owner: Identity) -> None:
        """A new session, unless draining or past max_sessions or max_sessions_per_user."""
        limits = self._limits
        if self._draining:
            raise _refused()
        if len(self._sessions) >= limits.max_sessions:
            opened = f"{len(self._sessions)} sessions are open"
            raise LimitExceeded(over_limit(opened, "max_sessions", limits.max_sessions))
        _check_per_user(
            owner,
            self._sessions_of,
            "open sessions",
            "max_sessions_per_user",
            limits.max_sessions_per_user,
        )

    def _admit_call(self, owner: Identity) -> None:
        """A new Complete call, unless draining or past max_calls_per_user."""
        if self._draining:
            raise _refused()
        _check_per_user(
            owner,
            self._calls_of,
            "Complete calls in flight",
            "max_calls_per_user",
            self._limits.max_calls_per_user,
        )

    async def _identify(
        self, context: grpc.aio.ServicerContext, rpc: str, requests: AsyncIterator[Any] | None
    ) -> Identity:
        """The caller, or the call ends UNAUTHENTICATED (RESOURCE_EXHAUSTED past the failures
        allowed). A refused stream's first message is read first: grpc's asyncio client reports
        a write that lands after the call ended as INTERNAL, not as our status (grpc/grpc#36066),
        and every client writes at once."""
        metadata = dict(context.invocation_metadata() or ())
        try:
            return self._auth.identify(str(metadata.get("authorization", "")), context.peer())
        except GhostpenError as error:
            if requests is not None:
                with contextlib.suppress(TimeoutError, StopAsyncIteration):
                    async with asyncio.timeout(FIRST_MESSAGE_WAIT_S):
                        await anext(aiter(requests))
            await self._abort(context, rpc, error)

    def _cut_off(self, session: Session, handler: asyncio.Task | None) -> None:
        """A client that does not read: its work stops now, and what it still sends is read and
        dropped (a client blocked on a write would see grpc's INTERNAL instead of our status,
        grpc/grpc#36066). Its stream ends RESOURCE_EXHAUSTED once it reads again, or is
        cancelled after keepalive_timeout_s."""
        closing = asyncio.get_running_loop().create_task(session.close())
        self._background.add(closing)
        closing.add_done_callback(self._background.discard)
        if handler is not None:
            grace = self._settings.server.keepalive_timeout_s
            asyncio.get_running_loop().call_later(grace, handler.cancel)

    async def _read(
        self, session: Session, request_iterator: AsyncIterator[Any], stream: _Stream
    ) -> None:
        messages = aiter(request_iterator)
        idle_s = self._limits.session_idle_s
        try:
            while True:
                try:
                    async with asyncio.timeout(idle_s):
                        message = await anext(messages)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    idle = DeadlinePassed(
                        f"no message for {idle_s:.0f} s (session_idle_s): the session is closed; "
                        "open a new one"
                    )
                    await stream.end(session, idle)
                    return
                if stream.cut:
                    continue
                if isinstance(message, wire.Corrupt):
                    # The client's encoder is broken: what else it sent cannot be trusted.
                    await stream.end(session, message.error())
                    return
                item = wire.client_message(
                    message, self._limits, time.monotonic(), session.owner.user
                )
                if isinstance(item, RequestError):
                    stream.send(item)
                elif isinstance(item, TelemetryEvent):
                    task = asyncio.create_task(self._ack_event(session.owner, item, stream))
                    stream.acks.add(task)
                    task.add_done_callback(stream.acks.discard)
                elif isinstance(item, FileRequest) and self._draining:
                    stream.send(RequestError(*_about(item), _refused()))
                else:
                    self._apply(session, item, stream)
            await asyncio.gather(*stream.acks)
            await session.drain()
        finally:
            stream.queue.put_nowait(None)

    def _apply(self, session: Session, item: Inbound, stream: _Stream) -> None:
        try:
            reply = session.handle(item)
        except Exception as exc:
            stream.send(RequestError(*_about(item), _ours(exc)))
            return
        if isinstance(item, Hello):
            engine = self._completer.engine
            capture = self._telemetry.captures(session.owner.tenant)
            stream.put(
                wire.welcome(
                    session.session_id, engine.model_id, engine.name, self._limits, capture
                )
            )
        elif reply is not None:
            stream.send(reply)

    async def _ack_event(self, owner: Identity, event: TelemetryEvent, stream: _Stream) -> None:
        """Every event gets an answer: its ack once stored, or an Error naming it."""
        try:
            [duplicate] = await self._telemetry.report(owner, [event])
        except Exception as exc:
            stream.send(RequestError("", "", _ours(exc), event_id=event.event_id))
        else:
            stream.put(wire.event_ack(event.event_id, duplicate))

    async def Complete(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        received = time.monotonic()
        owner = await self._identify(context, "Complete", None)
        try:
            self._admit_call(owner)
        except GhostpenError as error:
            await self._abort(context, "Complete", error)
        with _counted(self._calls_of, owner.user):
            try:
                inline = wire.inline_request(
                    request, self._limits, received, context.time_remaining()
                )
                job = await self._inline.job(inline, owner)
            except Exception as exc:
                await self._abort(context, "Complete", exc)
            try:
                async for event in self._served(job):
                    yield wire.chunk(event)
            except asyncio.CancelledError as cancel:
                if cancel.args != ("shutdown",):
                    raise
                await self._abort(context, "Complete", self._late)
            except Exception as exc:
                await self._abort(context, "Complete", exc)

    async def _served(self, job: CompletionJob) -> AsyncIterator[CompletionEvent]:
        """The job's events, produced by a task of its own: a cancel (the client left, or the
        drain ran out of grace) then lands in the completer, never in grpc's write of a chunk."""
        events: asyncio.Queue[CompletionEvent | None] = asyncio.Queue()
        task = asyncio.create_task(_produce(self._completer.run(job), events))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        try:
            while (event := await events.get()) is not None:
                yield event
            task.result()  # the job's error, or CancelledError("shutdown")
        finally:
            task.cancel("disconnect")

    async def Report(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        owner = await self._identify(context, "Report", None)
        try:
            if self._draining:
                raise _refused()
            events = wire.report_events(request, self._max_events, owner.user, self._limits)
            duplicates = await self._telemetry.report(owner, events)
        except Exception as exc:
            await self._abort(context, "Report", exc)
        return wire.report_response(events, duplicates)

    async def DeleteCapturedText(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        owner = await self._identify(context, "DeleteCapturedText", None)
        try:
            if isinstance(request, wire.Corrupt):
                raise request.error()
            completions, corrections = await self._telemetry.delete_captured(owner)
        except Exception as exc:
            await self._abort(context, "DeleteCapturedText", exc)
        return wire.deleted_captured(completions, corrections)

    async def _abort(self, context: grpc.aio.ServicerContext, rpc: str, exc: Exception) -> NoReturn:
        error = _ours(exc)
        status = wire.status_of(error)
        self._metrics.errors.labels(rpc, status.name).inc()
        await context.abort(status, wire.message_of(error, self._limits.max_error_chars))


class _Stream:
    """The Session stream's outbound queue: messages; a GhostpenError ends the call with its
    status, None with OK."""

    def __init__(self, metrics: Metrics, limits: LimitSettings) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._metrics = metrics
        self._limits = limits
        self._overflow: Callable[[], None] | None = None
        self.cut = False  # past max_queued_messages: nothing more is sent
        self.acks: set[asyncio.Task[None]] = set()  # events being stored, to answer

    def on_overflow(self, callback: Callable[[], None]) -> None:
        self._overflow = callback

    async def end(self, session: Session, error: GhostpenError, reason: str = "disconnect") -> None:
        """End the call with `error`'s status, after an Error for each request in flight."""
        await session.close(error, reason)
        self.queue.put_nowait(error)

    def send(self, item: Outbound) -> None:
        if isinstance(item, RequestError):
            self._metrics.errors.labels("Session", wire.status_of(item.error).name).inc()
        self.put(wire.server_message(item, self._limits))

    def put(self, message: Any) -> None:
        """Queue a reply; past max_queued_messages the queue is dropped for one LimitExceeded."""
        if self.cut:
            return
        limit = self._limits.max_queued_messages
        if self.queue.qsize() >= limit:
            self.cut = True
            while not self.queue.empty():
                self.queue.get_nowait()
            waiting = f"{limit} replies wait for a client that does not read them"
            self.queue.put_nowait(LimitExceeded(over_limit(waiting, "max_queued_messages", limit)))
            if self._overflow is not None:
                self._overflow()
            return
        self.queue.put_nowait(message)


async def _produce(
    events: AsyncIterator[CompletionEvent], queue: asyncio.Queue[CompletionEvent | None]
) -> None:
    try:
        async with aclosing(events):
            async for event in events:
                queue.put_nowait(event)
    finally:
        queue.put_nowait(None)


@contextlib.contextmanager
def _counted(counts: Counter[str], user: str) -> Iterator[None]:
    """`user`'s count of something held, this one included, while the block runs."""
    counts[user] += 1
    try:
        yield
    finally:
        counts[user] -= 1
        if not counts[user]:
            del counts[user]


def _check_per_user(
    owner: Identity, counts: Counter[str], what: str, setting: str, limit: int
) -> None:
    # Without authentication everyone is LOCAL: only the server-wide limits bound them.
    if owner != LOCAL and counts[owner.user] >= limit:
        held = f"{counts[owner.user]} {what} of user {owner.user!r}"
        raise LimitExceeded(over_limit(held, setting, limit))


def _refused() -> ShuttingDown:
    return ShuttingDown(
        "the server is shutting down and takes no new work; "
        "retry on another replica or once it is back"
    )


def _about(item: Inbound) -> tuple[str, str]:
    """The request id and path an error about `item` names."""
    match item:
        case FileRequest(spec=spec, path=path):
            return spec.request_id, path
        case FileChange(path=path):
            return "", path
        case Cancel(request_id=request_id):
            return request_id, ""
    return "", ""


def _ours(exc: Exception) -> GhostpenError:
    """A GhostpenError as it is; anything else is a bug of ours, logged."""
    if isinstance(exc, GhostpenError):
        return exc
    log.error("request failed", exc_info=exc)
    return InternalError(f"internal error: {type(exc).__name__}: {exc}")
