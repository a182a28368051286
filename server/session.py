"""One editor window's session: its workspace and its requests in flight, latest wins."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ghostpen.context.chunker import Chunk
from ghostpen.context.postprocess import Finish, Mode
from ghostpen.context.prompt import Document
from ghostpen.server.completion import Completer, CompletionEvent, CompletionJob
from ghostpen.server.errors import DuplicateRequest, EngineFailure, GhostpenError, UnknownRequest
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import Settings
from ghostpen.server.workspace import FileChange, Workspace, check_cursor

FINISHED_KEPT = 64  # recently finished request ids, so that a late cancel is not an error
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    path: str
    version: int
    cursor: int
    mode: Mode
    max_tokens: int
    adapter: str  # "": the base model
    deadline_s: float  # seconds left, as the edge computed it on arrival
    received: float  # time.monotonic()


@dataclass(frozen=True)
class FileAck:
    path: str
    version: int
    evicted: tuple[str, ...]


@dataclass(frozen=True)
class RequestError:
    request_id: str
    path: str
    error: GhostpenError


Outbound = CompletionEvent | FileAck | RequestError


class Session:
    def __init__(
        self,
        completer: Completer,
        settings: Settings,
        metrics: Metrics,
        send: Callable[[Outbound], None],
    ) -> None:
        self.session_id = uuid.uuid4().hex
        self.repo = ""
        self._completer = completer
        self._metrics = metrics
        self._send = send
        self.workspace = Workspace(settings.limits, settings.context.chunk_max_lines)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._cancel_reasons: dict[str, str] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._last_context: tuple[Chunk, ...] = ()

    def update(self, change: FileChange) -> FileAck:
        evicted = self.workspace.apply(change)
        return FileAck(change.path, change.version, tuple(evicted))

    def start(self, spec: RequestSpec) -> None:
        """Validate against the workspace, supersede what is in flight, and start serving."""
        if spec.request_id in self._inflight:
            raise DuplicateRequest(f"request id {spec.request_id!r} is already in flight")
        held = self.workspace.get(spec.path, spec.version)
        check_cursor(spec.path, held.text, spec.cursor)
        for request_id in list(self._inflight):
            self._stop(request_id, "superseded")
        document = Document(held.path, held.language, held.text, spec.cursor)
        prompt = self._completer.prompt(
            self.repo, document, self.workspace.chunks(stale_ok=True), self._last_context
        )
        self._last_context = tuple(ranked.chunk for ranked in prompt.context)
        job = CompletionJob(
            request_id=spec.request_id,
            completion_id=uuid.uuid4().hex,
            document=document,
            prompt=prompt,
            mode=spec.mode,
            max_tokens=spec.max_tokens,
            received=spec.received,
            prompted=time.monotonic(),
            deadline=spec.received + spec.deadline_s,
            cache_key=self.session_id,
            adapter=spec.adapter,
        )
        self._inflight[spec.request_id] = asyncio.create_task(self._serve(job))
        # Runs once the request waits on the engine: the next keystroke finds fresh chunks.
        asyncio.get_running_loop().call_soon(self.workspace.refresh)

    def cancel(self, request_id: str) -> None:
        """Idempotent for requests that were started: a cancel racing the final chunk is moot."""
        if request_id not in self._inflight:
            if request_id in self._finished:
                return
            raise UnknownRequest(f"no request {request_id!r} is in flight (it may have finished)")
        self._stop(request_id, "client")

    async def drain(self) -> None:
        """Wait for the requests in flight (the client closed its side of the stream)."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def close(self) -> None:
        """The stream is gone: stop everything in the engine."""
        for request_id in list(self._inflight):
            self._stop(request_id, "disconnect")
        await self.drain()

    def _stop(self, request_id: str, reason: str) -> None:
        task = self._inflight.get(request_id)
        if task is not None and not task.done():
            self._cancel_reasons[request_id] = reason
            task.cancel()

    async def _serve(self, job: CompletionJob) -> None:
        try:
            async for event in self._completer.run(job):
                self._send(event)
        except asyncio.CancelledError:
            reason = self._cancel_reasons.pop(job.request_id, "disconnect")
            self._metrics.cancellations.labels(self._completer.engine.name, reason).inc()
            if reason != "disconnect":
                self._send(
                    CompletionEvent(
                        job.request_id,
                        job.completion_id,
                        "",
                        True,
                        Finish.CANCELLED,
                        completion_tokens=0,
                    )
                )
        except GhostpenError as error:
            self._send(RequestError(job.request_id, job.document.path, error))
        except Exception as exc:
            log.exception("request %s failed", job.request_id)
            self._send(RequestError(job.request_id, job.document.path, EngineFailure(str(exc))))
        finally:
            self._inflight.pop(job.request_id, None)
            self._cancel_reasons.pop(job.request_id, None)
            self._finished[job.request_id] = None
            if len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
