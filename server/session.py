"""One editor window's session: its workspace and its requests in flight, latest wins."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ghostpen.context.chunker import Chunk
from ghostpen.context.postprocess import Finish
from ghostpen.context.prompt import Document
from ghostpen.server.chunker_process import ChunkerProcess
from ghostpen.server.completion import Completer, CompletionEvent, CompletionJob, RequestSpec
from ghostpen.server.errors import (
    DuplicateRequest,
    EngineFailure,
    GhostpenError,
    UnknownRequest,
)
from ghostpen.server.identity import Identity
from ghostpen.server.settings import Settings
from ghostpen.server.workspace import FileChange, Workspace, check_cursor

FINISHED_KEPT = 64  # recently finished request ids, so that a late cancel is not an error
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hello:
    workspace: str  # the repository's name or root, for the prompt


@dataclass(frozen=True)
class FileRequest:
    """A completion at a cursor in a file the session holds, at the version named."""

    spec: RequestSpec
    path: str
    version: int
    cursor: int


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class FileAck:
    path: str
    version: int
    evicted: tuple[str, ...]


@dataclass(frozen=True)
class RequestError:
    """An error to send on the stream, naming what it answers."""

    request_id: str
    path: str
    error: GhostpenError
    event_id: str = ""


@dataclass(frozen=True)
class _Running:
    task: asyncio.Task[None]
    completion_id: str
    path: str


Inbound = Hello | FileChange | FileRequest | Cancel
Outbound = CompletionEvent | FileAck | RequestError


class Session:
    def __init__(
        self,
        session_id: str,
        completer: Completer,
        chunker: ChunkerProcess,
        settings: Settings,
        send: Callable[[Outbound], None],
        owner: Identity,
        affinity: str = "",
    ) -> None:
        self.session_id = session_id
        self.owner = owner
        # The engine's cache key: the client's affinity outlives its reconnects, so the prompt
        # cache stays warm across them; one user's key is never another's.
        self.cache_key = f"{owner.user}/{affinity}" if affinity else session_id
        self.repo = ""
        self._completer = completer
        self._chunker = chunker
        self._send = send
        self.workspace = Workspace(settings.limits)
        self._inflight: dict[str, _Running] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._last_context: tuple[Chunk, ...] = ()
        self._refreshing: asyncio.Task[None] | None = None
        self._closed = False  # no more chunking: the stream is gone

    def handle(self, message: Inbound) -> FileAck | None:
        """Apply one client message; a GhostpenError refuses it and the session goes on."""
        match message:
            case Hello(workspace):
                self.repo = workspace
            case FileChange():
                return self.update(message)
            case FileRequest():
                self.start(message)
            case Cancel(request_id):
                self.cancel(request_id)
        return None

    def update(self, change: FileChange) -> FileAck:
        evicted = self.workspace.apply(change)
        self._refresh_soon()  # files change only here: the next request finds fresh chunks
        return FileAck(change.path, change.version, tuple(evicted))

    def start(self, request: FileRequest) -> None:
        """Validate against the workspace, supersede what is in flight, and start serving."""
        request_id = request.spec.request_id
        if request_id in self._inflight:
            raise DuplicateRequest(f"request id {request_id!r} is already in flight")
        held = self.workspace.get(request.path, request.version)
        check_cursor(request.path, held.text, request.cursor)
        for running in list(self._inflight):
            self._stop(running, "superseded")
        document = Document(held.path, held.language, held.text, request.cursor)
        prompt = self._completer.prompt(
            self.repo, document, self.workspace.chunks(), self._last_context
        )
        job = self._completer.job(
            request.spec, document, prompt, self.owner, cache_key=self.cache_key
        )
        self._last_context = tuple(ranked.chunk for ranked in job.prompt.context)
        task = asyncio.create_task(self._serve(job))
        self._inflight[request_id] = _Running(task, job.completion_id, request.path)
        task.add_done_callback(partial(self._done, request_id))

    def cancel(self, request_id: str) -> None:
        """Idempotent for requests that were started: a cancel racing the final chunk is moot."""
        if request_id not in self._inflight:
            if request_id in self._finished:
                return
            raise UnknownRequest(f"no request {request_id!r} is in flight (it may have finished)")
        self._stop(request_id, "client")

    async def drain(self) -> None:
        """Wait for the requests in flight (the client closed its side of the stream); a
        cancelled wait leaves them running."""
        while self._inflight:
            await asyncio.wait([r.task for r in self._inflight.values()])

    async def close(self, error: GhostpenError | None = None, reason: str = "disconnect") -> None:
        """The stream is gone: stop everything in the engine, booked as `reason`. With `error`
        (the stream is being ended for it), each request in flight gets it as its terminal
        message."""
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        self._chunker.forget(self.session_id)
        for request_id, running in list(self._inflight.items()):
            if error is not None and not running.task.done():
                self._send(RequestError(request_id, running.path, error))
            self._stop(request_id, reason)
        await self.drain()

    def _stop(self, request_id: str, reason: str) -> None:
        """Cancel with the reason (the completer books it) and answer at once: a cancelled task
        sends nothing more, so its final chunk always precedes its successor's."""
        running = self._inflight.get(request_id)
        if running is None or running.task.done() or not running.task.cancel(reason):
            return
        if reason in ("client", "superseded"):  # otherwise the stream is gone or ends now
            self._send(
                CompletionEvent(request_id, running.completion_id, "", True, Finish.CANCELLED)
            )

    async def _serve(self, job: CompletionJob) -> None:
        try:
            async for event in self._completer.run(job):
                self._send(event)
        except GhostpenError as error:
            self._send(RequestError(job.request_id, job.document.path, error))
        except Exception as exc:
            log.exception("request %s failed", job.request_id)
            self._send(RequestError(job.request_id, job.document.path, EngineFailure(str(exc))))

    def _refresh_soon(self) -> None:
        """Chunk what the workspace has not chunked yet, in the chunker process, one file at a
        time per session, however fast its files change."""
        if not self._closed and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self._refresh())

    async def _refresh(self) -> None:
        """Until every held version is chunked: versions that arrive meanwhile are seen, as
        the list is read again after each file. A failure is logged; the next update tries
        again."""
        try:
            while not self._closed and (pending := self.workspace.unchunked()):
                held = pending[0]
                held.set_chunks(await self._chunker.chunks(self.session_id, held))
        except GhostpenError as error:
            log.error("chunking session %s's files failed: %s", self.session_id, error)
        except Exception:
            log.exception("chunking session %s's files failed", self.session_id)

    def _done(self, request_id: str, _task: asyncio.Task[None]) -> None:
        """Bookkeeping in a done callback: it runs even for a task cancelled before it started."""
        self._inflight.pop(request_id, None)
        self._finished[request_id] = None
        if len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)
