"""The gRPC servicer: protobuf in, domain messages to the session and completer, protobuf out.

Protobuf stops here. Every refusal is a GhostpenError turned into a status in one place
(`_error_message` on the Session stream, `_abort` on Complete).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from ghostpen.context.languages import language_of
from ghostpen.context.postprocess import Finish, Mode
from ghostpen.context.prompt import Document
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.completion import Completer, CompletionEvent, CompletionJob, remaining_s
from ghostpen.server.errors import GhostpenError, InternalError, InvalidInput, LimitExceeded
from ghostpen.server.metrics import Metrics
from ghostpen.server.session import FileAck, Outbound, RequestError, RequestSpec, Session
from ghostpen.server.settings import Settings
from ghostpen.server.telemetry.ingest import Telemetry
from ghostpen.server.telemetry.records import TelemetryEvent
from ghostpen.server.workspace import ChunkCache, FileChange, TextEdit, check_size

log = logging.getLogger(__name__)

_MODES = {
    pb.MODE_AUTO: Mode.AUTO,
    pb.MODE_SINGLE_LINE: Mode.SINGLE_LINE,
    pb.MODE_MULTI_LINE: Mode.MULTI_LINE,
}
_FINISH = {
    Finish.STOP: pb.FINISH_REASON_STOP,
    Finish.LENGTH: pb.FINISH_REASON_LENGTH,
    Finish.LINE_END: pb.FINISH_REASON_LINE_END,
    Finish.BLOCK_END: pb.FINISH_REASON_BLOCK_END,
    Finish.SUFFIX_OVERLAP: pb.FINISH_REASON_SUFFIX_OVERLAP,
    Finish.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


class CompletionService(pb_grpc.CompletionServicer):
    def __init__(
        self, completer: Completer, telemetry: Telemetry, settings: Settings, metrics: Metrics
    ) -> None:
        self._completer = completer
        self._telemetry = telemetry
        self._max_events = settings.telemetry.max_events_per_report
        self._settings = settings
        self._limits = settings.limits
        self._metrics = metrics
        self._chunk_cache = ChunkCache(settings.context.chunk_max_lines)

    async def Session(
        self, request_iterator: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        outbound: asyncio.Queue[pb.ServerMessage | None] = asyncio.Queue()
        session = Session(
            self._completer,
            self._settings,
            self._metrics,
            lambda item: outbound.put_nowait(self._to_proto(item)),
        )
        reader = asyncio.create_task(self._read(session, request_iterator, outbound))
        try:
            while (message := await outbound.get()) is not None:
                yield message
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await session.close()

    async def _read(
        self,
        session: Session,
        request_iterator: AsyncIterator[pb.ClientMessage],
        outbound: asyncio.Queue[pb.ServerMessage | None],
    ) -> None:
        acks: set[asyncio.Task[None]] = set()
        try:
            async for message in request_iterator:
                received = time.monotonic()
                if message.WhichOneof("kind") == "event":
                    task = asyncio.create_task(self._ack_event(message.event, outbound))
                    acks.add(task)
                    task.add_done_callback(acks.discard)
                    continue
                try:
                    reply = self._handle(session, message, received)
                except Exception as exc:
                    if not isinstance(exc, GhostpenError):
                        log.exception("session message failed")
                        exc = InternalError(f"internal error: {exc}")
                    request_id = message.completion_request.request_id or message.cancel.request_id
                    outbound.put_nowait(
                        self._error_message(RequestError(request_id, message.file_update.path, exc))
                    )
                else:
                    if reply is not None:
                        outbound.put_nowait(reply)
            await asyncio.gather(*acks)
            await session.drain()
        finally:
            outbound.put_nowait(None)

    async def _ack_event(
        self, message: pb.TelemetryEvent, outbound: asyncio.Queue[pb.ServerMessage | None]
    ) -> None:
        try:
            [duplicate] = await self._telemetry.report([_event(message)])
        except GhostpenError as error:
            reply = self._error_message(RequestError("", "", error))
            reply.error.event_id = message.event_id
        else:
            reply = pb.ServerMessage(
                event_ack=pb.EventAck(event_id=message.event_id, duplicate=duplicate)
            )
        outbound.put_nowait(reply)

    async def Report(
        self, request: pb.ReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportResponse:
        try:
            if len(request.events) > self._max_events:
                raise LimitExceeded(
                    f"{len(request.events)} events in one report; the limit is "
                    f"max_events_per_report={self._max_events}"
                )
            duplicates = await self._telemetry.report([_event(e) for e in request.events])
        except GhostpenError as error:
            await self._abort(context, "Report", error)
        return pb.ReportResponse(
            acks=[
                pb.EventAck(event_id=e.event_id, duplicate=duplicate)
                for e, duplicate in zip(request.events, duplicates, strict=True)
            ]
        )

    def _handle(
        self, session: Session, message: pb.ClientMessage, received: float
    ) -> pb.ServerMessage | None:
        kind = message.WhichOneof("kind")
        if kind == "hello":
            session.repo = message.hello.workspace[: self._limits.max_path_chars]
            return pb.ServerMessage(
                welcome=pb.Welcome(
                    session_id=session.session_id,
                    model_id=self._completer.engine.model_id,
                    engine=self._completer.engine.name,
                    max_files=self._limits.max_files,
                    max_file_bytes=self._limits.max_file_bytes,
                    max_tokens_limit=self._limits.max_tokens_limit,
                )
            )
        if kind == "file_update":
            return self._to_proto(session.update(self._file_change(message.file_update)))
        if kind == "completion_request":
            session.start(self._request_spec(message.completion_request, received))
            return None
        if kind == "cancel":
            session.cancel(message.cancel.request_id)
            return None
        raise InvalidInput(
            "empty ClientMessage: set one of hello, file_update, completion_request, cancel, event"
        )

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CompletionChunk]:
        received = time.monotonic()
        try:
            job = self._complete_job(request, context, received)
        except GhostpenError as error:
            await self._abort(context, "Complete", error)
        try:
            async for event in self._completer.run(job):
                yield self._chunk(event)
        except asyncio.CancelledError:
            self._metrics.cancellations.labels(self._completer.engine.name, "disconnect").inc()
            raise
        except GhostpenError as error:
            await self._abort(context, "Complete", error)

    def _complete_job(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext, received: float
    ) -> CompletionJob:
        self._check_ids(request.request_id, request.path)
        self._check_max_tokens(request.max_tokens)
        if len(request.context_files) > self._limits.max_context_files:
            raise LimitExceeded(
                f"{len(request.context_files)} context files; the limit is "
                f"max_context_files={self._limits.max_context_files}"
            )
        prefix = _decode(request.prefix, f"prefix of {request.path!r}")
        suffix = _decode(request.suffix, f"suffix of {request.path!r}")
        check_size(request.path, prefix + suffix, self._limits)
        language = language_of(request.path, request.language)
        chunks = []
        for item in request.context_files:
            text = _decode(item.text, repr(item.path))
            check_size(item.path, text, self._limits)
            chunks.extend(
                self._chunk_cache.chunks(item.path, language_of(item.path, item.language), text)
            )
        left = remaining_s(request.deadline_unix_ms, self._limits.default_timeout_ms, time.time())
        grpc_left = context.time_remaining()
        if grpc_left is not None:
            left = min(left, grpc_left)
        document = Document(request.path, language, prefix + suffix, len(prefix))
        prompt = self._completer.prompt(request.workspace, document, chunks)
        return CompletionJob(
            request_id=request.request_id,
            completion_id=uuid.uuid4().hex,
            document=document,
            prompt=prompt,
            mode=_MODES.get(request.mode, Mode.AUTO),
            max_tokens=request.max_tokens,
            received=received,
            prompted=time.monotonic(),
            deadline=received + left,
            adapter=request.adapter,
        )

    def _request_spec(self, request: pb.CompletionRequest, received: float) -> RequestSpec:
        self._check_ids(request.request_id, request.path)
        self._check_max_tokens(request.max_tokens)
        if request.mode not in _MODES:
            raise InvalidInput(f"unknown mode {request.mode}")
        return RequestSpec(
            request_id=request.request_id,
            path=request.path,
            version=request.version,
            cursor=request.cursor_offset,
            mode=_MODES[request.mode],
            max_tokens=request.max_tokens,
            adapter=request.adapter,
            deadline_s=remaining_s(
                request.deadline_unix_ms, self._limits.default_timeout_ms, time.time()
            ),
            received=received,
        )

    def _file_change(self, update: pb.FileUpdate) -> FileChange:
        self._check_path(update.path)
        if update.version == 0:
            raise InvalidInput(f"file update for {update.path!r} has no version (must be >= 1)")
        content = update.WhichOneof("content")
        if content == "text":
            text = _decode(update.text, repr(update.path))
            return FileChange(update.path, update.language, update.version, text=text)
        if content == "edits":
            edits = tuple(
                TextEdit(edit.start, edit.end, _decode(edit.text, f"an edit to {update.path!r}"))
                for edit in update.edits.edits
            )
            return FileChange(
                update.path,
                update.language,
                update.version,
                edits=edits,
                base_version=update.base_version,
            )
        raise InvalidInput(f"file update for {update.path!r} has neither text nor edits")

    def _check_ids(self, request_id: str, path: str) -> None:
        if not request_id:
            raise InvalidInput("request_id is empty")
        if len(request_id) > self._limits.max_request_id_chars:
            raise InvalidInput(
                f"request_id has {len(request_id)} characters; the limit is "
                f"max_request_id_chars={self._limits.max_request_id_chars}"
            )
        self._check_path(path)

    def _check_path(self, path: str) -> None:
        if not path:
            raise InvalidInput("path is empty")
        if len(path) > self._limits.max_path_chars:
            raise InvalidInput(
                f"path has {len(path)} characters; the limit is "
                f"max_path_chars={self._limits.max_path_chars}"
            )

    def _check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens > self._limits.max_tokens_limit:
            raise LimitExceeded(
                f"max_tokens {max_tokens} is over the limit max_tokens_limit="
                f"{self._limits.max_tokens_limit}"
            )

    def _to_proto(self, item: Outbound) -> pb.ServerMessage:
        if isinstance(item, CompletionEvent):
            return pb.ServerMessage(chunk=self._chunk(item))
        if isinstance(item, FileAck):
            return pb.ServerMessage(
                file_ack=pb.FileAck(path=item.path, version=item.version, evicted=item.evicted)
            )
        return self._error_message(item)

    def _error_message(self, item: RequestError) -> pb.ServerMessage:
        code = item.error.status
        self._metrics.errors.labels("Session", code.name).inc()
        return pb.ServerMessage(
            error=pb.Error(
                request_id=item.request_id,
                path=item.path,
                code=code.value[0],
                status=code.name,
                message=str(item.error),
            )
        )

    async def _abort(
        self, context: grpc.aio.ServicerContext, rpc: str, error: GhostpenError
    ) -> None:
        self._metrics.errors.labels(rpc, error.status.name).inc()
        await context.abort(error.status, str(error))

    def _chunk(self, event: CompletionEvent) -> pb.CompletionChunk:
        chunk = pb.CompletionChunk(
            request_id=event.request_id,
            completion_id=event.completion_id,
            text=event.text,
            final=event.final,
        )
        if event.final:
            engine, template = self._completer.engine, self._completer.template
            chunk.finish_reason = _FINISH[event.finish or Finish.STOP]
            chunk.model_id = event.model
            chunk.engine = engine.name
            chunk.template_id = template.template_id
            chunk.template_hash = template.content_hash
            chunk.prompt_tokens = event.prompt_tokens
            chunk.completion_tokens = event.completion_tokens
            chunk.cached_prompt_tokens = event.cached_prompt_tokens
            if event.timings is not None:
                chunk.timings.CopyFrom(
                    pb.Timings(
                        context_ms=event.timings.context_s * 1000,
                        queue_ms=event.timings.queue_s * 1000,
                        first_token_ms=event.timings.first_token_s * 1000,
                        total_ms=event.timings.total_s * 1000,
                        engine_ms=event.timings.engine_s * 1000,
                    )
                )
        return chunk


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None


_UNITS = {pb.PartiallyAccepted.UNIT_WORD: "word", pb.PartiallyAccepted.UNIT_LINE: "line"}
_REASONS = {pb.Rejected.REASON_DISMISSED: "dismissed", pb.Rejected.REASON_TYPED_OVER: "typed_over"}


def _event(message: pb.TelemetryEvent) -> TelemetryEvent:
    """Protobuf to domain; an event without a kind becomes kind "" and fails its check."""
    kind = message.WhichOneof("kind") or ""
    common = {
        "event_id": message.event_id,
        "completion_id": message.completion_id,
        "kind": kind,
        "client_ms": message.client_time_unix_ms,
        "received_ms": int(time.time() * 1000),
    }
    if kind == "accepted":
        body = message.accepted
        return TelemetryEvent(
            **common, ms_since_shown=body.ms_since_shown, accepted_chars=body.accepted_chars
        )
    if kind == "partially_accepted":
        body = message.partially_accepted
        return TelemetryEvent(
            **common,
            ms_since_shown=body.ms_since_shown,
            accepted_chars=body.accepted_chars,
            unit=_UNITS.get(body.unit, "unspecified"),
        )
    if kind == "rejected":
        body = message.rejected
        return TelemetryEvent(
            **common,
            ms_since_shown=body.ms_since_shown,
            reason=_REASONS.get(body.reason, "unspecified"),
        )
    if kind == "retention":
        body = message.retention
        return TelemetryEvent(
            **common,
            after_s=body.after_s,
            fraction=body.retained_fraction,
            present=body.present,
            file_closed=body.file_closed,
        )
    return TelemetryEvent(**common)
