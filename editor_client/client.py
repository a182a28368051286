"""SessionClient: the editor's one Session stream to the server, kept alive for it.

Nothing here blocks the editor: file changes and telemetry are queued, a completion is awaited
by the caller's own task and comes back as None whenever there is nothing to show (no
connection, superseded, refused). The stream reconnects with exponential backoff; on a new
session the recent files go again whole, and telemetry not yet acknowledged is sent again (the
server stores a repeated event id once).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ghostpen.editor_client.recent_files import RecentFiles
from ghostpen.editor_client.settings import ClientSettings
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
AFFINITY_HEADER = "x-ghostpen-affinity"

CLIENT_NAME = "ghostpen-agent/0.1"
OUT_OF_STEP = frozenset({"FAILED_PRECONDITION", "NOT_FOUND"})  # the server's copy of a file


@dataclass(frozen=True)
class Completion:
    request_id: str
    completion_id: str
    text: str
    finish_reason: str
    server_total_ms: float
    sent_at: float  # time.monotonic() when the request was queued for the stream
    received_at: float  # ...when its final chunk arrived


@dataclass
class _Pending:
    future: asyncio.Future[Completion | None]
    sent_at: float
    parts: list[str] = field(default_factory=list)

    def resolve(self, completion: Completion | None) -> None:
        if not self.future.done():
            self.future.set_result(completion)


class SessionClient:
    def __init__(
        self,
        settings: ClientSettings,
        files: RecentFiles,
        notify: Callable[[str], None],
        workspace: str = "",
    ) -> None:
        self._settings = settings
        self.files = files
        self._notify = notify
        self._workspace = workspace
        self._outgoing: asyncio.Queue[pb.ClientMessage | None] | None = None  # while connected
        self._pending: dict[str, _Pending] = {}
        self._current: str | None = None
        self._events: OrderedDict[str, pb.TelemetryEvent] = OrderedDict()
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._backoff = settings.reconnect_initial_s
        self.welcome: pb.Welcome | None = None
        self.sessions = 0  # streams opened so far: more than one means it reconnected
        self.failed_attempts = 0  # sessions that could not open or ended: retries so far
        self._outage_reported = False  # said once per outage, not once per retry
        # Sent with every stream, the same across reconnects: a balancer in front of several
        # replicas (nginx, deploy/nginx/ghostpen.conf) hashes on it to keep us on one replica.
        self.affinity = uuid.uuid4().hex

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def correction_limit(self) -> int:
        """The longest correction the server takes: 0 unless it said it keeps this user's text
        for training (Welcome)."""
        if self.welcome is None or not self.welcome.capture_text:
            return 0
        return self.welcome.max_correction_chars

    async def close(self) -> None:
        """Stop the session, waiting at most close_timeout_s: grpc's asyncio channel can fail
        to finish a cancelled connection attempt, and an editor's shutdown must not hang."""
        if self._task:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=self._settings.close_timeout_s)
            if not done:
                log.warning(
                    "the session did not stop in %.1f s; left", self._settings.close_timeout_s
                )
        self._disconnected()

    @property
    def connected(self) -> bool:
        return self._outgoing is not None

    @property
    def unacknowledged_events(self) -> int:
        return len(self._events)

    def sync_files(self) -> None:
        """Send what the server lacks of the recent files (called after each editor change)."""
        if self._outgoing is not None:
            for message in self.files.pending_updates():
                self._outgoing.put_nowait(message)

    async def complete(
        self, path: str, cursor: int, mode: pb.Mode.ValueType = pb.MODE_AUTO
    ) -> Completion | None:
        """The completion at `cursor` of `path`; a newer call supersedes this one (None)."""
        tracked = self.files.get(path)
        if self._outgoing is None or tracked is None or tracked.skipped:
            return None
        self.files.touch(path)
        self.sync_files()
        self.cancel_current()
        request_id = f"r{next(self._ids)}"
        pending = _Pending(asyncio.get_running_loop().create_future(), time.monotonic())
        self._pending[request_id] = pending
        self._current = request_id
        deadline = int(time.time() * 1000) + self._settings.request_timeout_ms
        request = pb.CompletionRequest(
            request_id=request_id,
            path=path,
            version=tracked.version,
            cursor_offset=cursor,
            mode=mode,
            max_tokens=self._settings.max_tokens,
            deadline_unix_ms=deadline,
            adapter=self._settings.adapter,
        )
        self._outgoing.put_nowait(pb.ClientMessage(completion_request=request))
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._cancel(request_id)
            raise

    def cancel_current(self) -> None:
        if self._current is not None:
            self._cancel(self._current)

    def report(self, event: pb.TelemetryEvent) -> None:
        """Queue a telemetry event; it is kept, and sent again after a reconnect, until acked."""
        self._events[event.event_id] = event
        while len(self._events) > self._settings.max_pending_events:
            dropped, _ = self._events.popitem(last=False)
            log.warning("telemetry event %s dropped: over max_pending_events", dropped)
        if self._outgoing is not None:
            self._outgoing.put_nowait(pb.ClientMessage(event=event))

    def _cancel(self, request_id: str) -> None:
        if self._current == request_id:
            self._current = None
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        pending.resolve(None)
        if self._outgoing is not None:
            self._outgoing.put_nowait(pb.ClientMessage(cancel=pb.Cancel(request_id=request_id)))

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
                reason = "the server ended the session"
            except grpc.aio.AioRpcError as error:
                reason = f"{error.code().name}: {error.details()}"
            except (TimeoutError, ConnectionError) as error:
                reason = str(error) or "no welcome in time"
            self._disconnected()
            self.failed_attempts += 1
            if not self._outage_reported:
                self._outage_reported = True
                self._notify(
                    f"ghostpen: server {self._settings.server} unavailable ({reason}); "
                    "retrying in the background"
                )
            await asyncio.sleep(self._backoff * random.uniform(0.8, 1.2))
            self._backoff = min(self._backoff * 2, self._settings.reconnect_max_s)

    def _channel(self) -> grpc.aio.Channel:
        settings = self._settings
        if not settings.tls:
            return grpc.aio.insecure_channel(settings.server)
        try:
            roots = Path(settings.tls_ca).read_bytes() if settings.tls_ca else None
        except OSError as exc:
            raise ConnectionError(f"tls_ca {settings.tls_ca!r} cannot be read: {exc}") from exc
        return grpc.aio.secure_channel(settings.server, grpc.ssl_channel_credentials(roots))

    async def _session(self) -> None:
        token = self._settings.token
        metadata = ((AFFINITY_HEADER, self.affinity),)
        metadata += (("authorization", f"Bearer {token}"),) if token else ()
        async with self._channel() as channel:
            outgoing: asyncio.Queue[pb.ClientMessage | None] = asyncio.Queue()
            hello = pb.Hello(client=CLIENT_NAME, workspace=self._workspace)
            outgoing.put_nowait(pb.ClientMessage(hello=hello))
            call = pb_grpc.CompletionStub(channel).Session(_drain(outgoing), metadata=metadata)
            first = await asyncio.wait_for(call.read(), self._settings.connect_timeout_s)
            if first is grpc.aio.EOF or not first.HasField("welcome"):
                raise ConnectionError("the server did not welcome the session")
            welcome = self.welcome = first.welcome
            self.files.limit(welcome.max_files, welcome.max_file_bytes, welcome.max_session_bytes)
            self.files.forget_all_on_server()
            self._outgoing = outgoing
            self._backoff = self._settings.reconnect_initial_s
            self.sessions += 1
            if self._outage_reported:
                self._outage_reported = False
                self._notify(f"ghostpen: reconnected to {self._settings.server}")
            self.sync_files()
            for event in self._events.values():
                outgoing.put_nowait(pb.ClientMessage(event=event))
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    self._dispatch(message)
            finally:
                outgoing.put_nowait(None)

    def _disconnected(self) -> None:
        self._outgoing = None
        for pending in self._pending.values():
            pending.resolve(None)
        self._pending.clear()
        self._current = None

    def _dispatch(self, message: pb.ServerMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "chunk":
            self._chunk(message.chunk)
        elif kind == "error":
            self._error(message.error)
        elif kind == "file_ack":
            for path in message.file_ack.evicted:
                self.files.forget_on_server(path)
        elif kind == "event_ack":
            self._events.pop(message.event_ack.event_id, None)

    def _chunk(self, chunk: pb.CompletionChunk) -> None:
        pending = self._pending.get(chunk.request_id)
        if pending is None:
            return
        pending.parts.append(chunk.text)
        if not chunk.final:
            return
        del self._pending[chunk.request_id]
        if self._current == chunk.request_id:
            self._current = None
        if chunk.finish_reason == pb.FINISH_REASON_CANCELLED:
            pending.resolve(None)
            return
        withheld = chunk.finish_reason == pb.FINISH_REASON_WITHHELD  # the server's show gate
        pending.resolve(
            Completion(
                request_id=chunk.request_id,
                completion_id=chunk.completion_id,
                text="" if withheld else "".join(pending.parts),
                finish_reason=pb.FinishReason.Name(chunk.finish_reason),
                server_total_ms=chunk.timings.total_ms,
                sent_at=pending.sent_at,
                received_at=time.monotonic(),
            )
        )

    def _error(self, error: pb.Error) -> None:
        if error.event_id:
            self._events.pop(error.event_id, None)
            log.warning("telemetry event %s refused: %s", error.event_id, error.message)
        about_file = not error.request_id or error.status in OUT_OF_STEP
        if error.path and about_file:
            # The server's copy is missing or out of step: the file goes whole next time.
            self.files.forget_on_server(error.path)
        if pending := self._pending.pop(error.request_id, None):
            if self._current == error.request_id:
                self._current = None
            log.info("request %s: %s %s", error.request_id, error.status, error.message)
            pending.resolve(None)


async def _drain(queue: asyncio.Queue[pb.ClientMessage | None]) -> AsyncIterator[pb.ClientMessage]:
    while (message := await queue.get()) is not None:
        yield message
