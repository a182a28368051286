"""Protobuf stops here: wire messages checked and turned into domain messages, results turned back,
and the one table of gRPC status codes. Nothing past this module sees protobuf or gRPC codes.

Requests are parsed by our own deserializers (`handlers`), so that bytes which are not the
message they claim to be reach the servicer as `Corrupt` and are answered INVALID_ARGUMENT with a
message, instead of grpc's bare UNKNOWN.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from ghostpen.context.postprocess import Finish, Mode
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.server.completion import CompletionEvent, RequestSpec, remaining_s
from ghostpen.server.context_process import InlineFile
from ghostpen.server.errors import (
    CursorOutOfRange,
    DeadlinePassed,
    DuplicateRequest,
    EngineFailure,
    EngineUnavailable,
    GhostpenError,
    InternalError,
    InvalidInput,
    LimitExceeded,
    PermissionDenied,
    PromptTooLong,
    ShuttingDown,
    StaleVersion,
    StoreUnavailable,
    Unauthenticated,
    UnknownFile,
    UnknownRequest,
    over_limit,
)
from ghostpen.server.inline import InlineRequest
from ghostpen.server.session import (
    Cancel,
    FileAck,
    FileRequest,
    Hello,
    Inbound,
    Outbound,
    RequestError,
)
from ghostpen.server.settings import LimitSettings
from ghostpen.server.telemetry.records import TelemetryEvent
from ghostpen.server.workspace import FileChange, TextEdit, check_size

SERVICE = pb.DESCRIPTOR.services_by_name["Completion"]

STATUS: dict[type[GhostpenError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PromptTooLong: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnknownFile: grpc.StatusCode.NOT_FOUND,
    UnknownRequest: grpc.StatusCode.NOT_FOUND,
    StaleVersion: grpc.StatusCode.FAILED_PRECONDITION,
    CursorOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    DeadlinePassed: grpc.StatusCode.DEADLINE_EXCEEDED,
    DuplicateRequest: grpc.StatusCode.ALREADY_EXISTS,
    EngineUnavailable: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    EngineFailure: grpc.StatusCode.INTERNAL,
    InternalError: grpc.StatusCode.INTERNAL,
}

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
    Finish.WITHHELD: pb.FINISH_REASON_WITHHELD,
    Finish.REPETITION: pb.FINISH_REASON_REPETITION,
}
_UNITS = {pb.PartiallyAccepted.UNIT_WORD: "word", pb.PartiallyAccepted.UNIT_LINE: "line"}
_REASONS = {pb.Rejected.REASON_DISMISSED: "dismissed", pb.Rejected.REASON_TYPED_OVER: "typed_over"}


def status_of(error: GhostpenError) -> grpc.StatusCode:
    """The status of the most specific class in the table; INTERNAL for anything else."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class Corrupt:
    """Bytes that did not parse as the message the method takes."""

    message_type: str
    reason: str

    def error(self) -> InvalidInput:
        return InvalidInput(f"the bytes sent are not a valid {self.message_type}: {self.reason}")


def handlers(servicer: object) -> grpc.GenericRpcHandler:
    """The Completion service's methods, bound to `servicer`'s methods of the same names."""
    methods = {}
    for method in SERVICE.methods:
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        methods[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_parser(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, methods)


def _parser(message_class: type[Message]) -> Callable[[bytes], Message | Corrupt]:
    def parse(data: bytes) -> Message | Corrupt:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Corrupt(message_class.DESCRIPTOR.full_name, str(exc) or "unparsable")

    return parse


# Requests in


def client_message(
    message: pb.ClientMessage | Corrupt, limits: LimitSettings, received: float, user: str
) -> Inbound | TelemetryEvent | RequestError:
    """One Session message of `user`'s as a domain message, or the error that refuses it."""
    if isinstance(message, Corrupt):
        return RequestError("", "", message.error())
    kind = message.WhichOneof("kind")
    try:
        if kind == "hello":
            return Hello(message.hello.workspace[: limits.max_path_chars])
        if kind == "file_update":
            return file_change(message.file_update, limits)
        if kind == "completion_request":
            return file_request(message.completion_request, limits, received)
        if kind == "cancel":
            return Cancel(message.cancel.request_id)
        if kind == "event":
            return telemetry_event(message.event, user, limits)
        raise InvalidInput(
            "empty ClientMessage: set one of hello, file_update, completion_request, cancel, event"
        )
    except GhostpenError as error:
        return RequestError(
            message.completion_request.request_id or message.cancel.request_id,
            message.file_update.path or message.completion_request.path,
            error,
            event_id=message.event.event_id,
        )


def file_change(update: pb.FileUpdate, limits: LimitSettings) -> FileChange:
    _check_path(update.path, limits)
    _check_language(update.language, limits)
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


def file_request(
    request: pb.CompletionRequest, limits: LimitSettings, received: float
) -> FileRequest:
    return FileRequest(
        spec=_spec(request, limits, received),
        path=request.path,
        version=request.version,
        cursor=request.cursor_offset,
    )


def inline_request(
    request: pb.CompleteRequest | Corrupt,
    limits: LimitSettings,
    received: float,
    grpc_left: float | None,
) -> InlineRequest:
    """A Complete call as a domain request; its deadline is the earlier of the request's own and
    the call's gRPC deadline."""
    if isinstance(request, Corrupt):
        raise request.error()
    spec = _spec(request, limits, received, grpc_left)
    if len(request.context_files) > limits.max_context_files:
        raise LimitExceeded(
            over_limit(
                f"{len(request.context_files)} context files",
                "max_context_files",
                limits.max_context_files,
            )
        )
    _check_language(request.language, limits)
    prefix = _decode(request.prefix, f"prefix of {request.path!r}")
    suffix = _decode(request.suffix, f"suffix of {request.path!r}")
    check_size(request.path, prefix + suffix, limits)
    context = []
    for item in request.context_files:
        _check_path(item.path, limits)
        _check_language(item.language, limits)
        text = _decode(item.text, repr(item.path))
        check_size(item.path, text, limits)
        context.append(InlineFile(item.path, item.language, text))
    return InlineRequest(
        spec=spec,
        repo=request.workspace[: limits.max_path_chars],
        document=InlineFile(request.path, request.language, prefix + suffix),
        cursor=len(prefix),
        context=tuple(context),
    )


def report_events(
    request: pb.ReportRequest | Corrupt, max_events: int, user: str, limits: LimitSettings
) -> list[TelemetryEvent]:
    if isinstance(request, Corrupt):
        raise request.error()
    if len(request.events) > max_events:
        raise LimitExceeded(
            over_limit(
                f"{len(request.events)} events in one report", "max_events_per_report", max_events
            )
        )
    return [telemetry_event(e, user, limits) for e in request.events]


def telemetry_event(message: pb.TelemetryEvent, user: str, limits: LimitSettings) -> TelemetryEvent:
    """An event `user` sent; one without a kind becomes kind "" and fails its check."""
    kind = message.WhichOneof("kind") or ""
    common = {
        "event_id": message.event_id,
        "completion_id": message.completion_id,
        "kind": kind,
        "client_ms": message.client_time_unix_ms,
        "received_ms": int(time.time() * 1000),
        "user_id": user,
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
            final_text=_correction(body, message.event_id, limits) if body.final_text else None,
        )
    return TelemetryEvent(**common)


def _correction(body: pb.Retention, event_id: str, limits: LimitSettings) -> str:
    text = _decode(body.final_text, f"final_text of event {event_id!r}")
    if len(text) > limits.max_correction_chars:
        raise LimitExceeded(
            over_limit(
                f"final_text of event {event_id!r} ({len(text)} characters)",
                "max_correction_chars",
                limits.max_correction_chars,
            )
        )
    return text


AFFINITY_HEADER = "x-ghostpen-affinity"


def affinity(metadata: Sequence[tuple[str, str | bytes]] | None, limits: LimitSettings) -> str:
    """The client's affinity header (proto/ghostpen.proto), "" when it sent none."""
    value = str(dict(metadata or ()).get(AFFINITY_HEADER, ""))
    if len(value) > limits.max_affinity_chars:
        raise InvalidInput(
            over_limit(
                f"{AFFINITY_HEADER} has {len(value)} characters",
                "max_affinity_chars",
                limits.max_affinity_chars,
            )
        )
    return value


def _spec(
    request: pb.CompletionRequest | pb.CompleteRequest,
    limits: LimitSettings,
    received: float,
    grpc_left: float | None = None,
) -> RequestSpec:
    """What both RPCs ask, checked the same way."""
    if not request.request_id:
        raise InvalidInput("request_id is empty")
    if len(request.request_id) > limits.max_request_id_chars:
        raise InvalidInput(
            over_limit(
                f"request_id has {len(request.request_id)} characters",
                "max_request_id_chars",
                limits.max_request_id_chars,
            )
        )
    _check_path(request.path, limits)
    if request.max_tokens > limits.max_tokens_limit:
        raise LimitExceeded(
            over_limit(
                f"max_tokens {request.max_tokens} is too many",
                "max_tokens_limit",
                limits.max_tokens_limit,
            )
        )
    if request.mode not in _MODES:
        raise InvalidInput(
            f"unknown mode {request.mode}; the modes are "
            + ", ".join(f"{pb.Mode.Name(value)} ({value})" for value in _MODES)
        )
    left = remaining_s(request.deadline_unix_ms, limits.default_timeout_ms, time.time())
    if grpc_left is not None:
        left = min(left, grpc_left)
    return RequestSpec(
        request_id=request.request_id,
        mode=_MODES[request.mode],
        max_tokens=request.max_tokens,
        adapter=request.adapter,
        deadline_s=left,
        received=received,
    )


def _check_path(path: str, limits: LimitSettings) -> None:
    if not path:
        raise InvalidInput("path is empty")
    if len(path) > limits.max_path_chars:
        raise InvalidInput(
            over_limit(f"path has {len(path)} characters", "max_path_chars", limits.max_path_chars)
        )


def _check_language(language: str, limits: LimitSettings) -> None:
    if len(language) > limits.max_language_chars:
        raise InvalidInput(
            over_limit(
                f"language has {len(language)} characters",
                "max_language_chars",
                limits.max_language_chars,
            )
        )


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None


# Results out


def welcome(
    session_id: str, model_id: str, engine: str, limits: LimitSettings, capture_text: bool
) -> pb.ServerMessage:
    return pb.ServerMessage(
        welcome=pb.Welcome(
            session_id=session_id,
            model_id=model_id,
            engine=engine,
            max_files=limits.max_files,
            max_file_bytes=limits.max_file_bytes,
            max_session_bytes=limits.max_session_bytes,
            max_tokens_limit=limits.max_tokens_limit,
            capture_text=capture_text,
            max_correction_chars=limits.max_correction_chars,
        )
    )


def message_of(error: GhostpenError, limit: int) -> str:
    """The error's text cut to `limit` characters: a message may quote what the client sent, and
    a status travels in trailers, which grpc refuses past 16 KB."""
    text = str(error)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def server_message(item: Outbound, limits: LimitSettings) -> pb.ServerMessage:
    if isinstance(item, CompletionEvent):
        return pb.ServerMessage(chunk=chunk(item))
    if isinstance(item, FileAck):
        return pb.ServerMessage(
            file_ack=pb.FileAck(path=item.path, version=item.version, evicted=item.evicted)
        )
    code = status_of(item.error)
    return pb.ServerMessage(
        error=pb.Error(
            request_id=item.request_id,
            path=item.path,
            code=code.value[0],
            status=code.name,
            message=message_of(item.error, limits.max_error_chars),
            event_id=item.event_id,
        )
    )


def event_ack(event_id: str, duplicate: bool) -> pb.ServerMessage:
    return pb.ServerMessage(event_ack=pb.EventAck(event_id=event_id, duplicate=duplicate))


def report_response(
    events: Sequence[TelemetryEvent], duplicates: Sequence[bool]
) -> pb.ReportResponse:
    return pb.ReportResponse(
        acks=[
            pb.EventAck(event_id=e.event_id, duplicate=duplicate)
            for e, duplicate in zip(events, duplicates, strict=True)
        ]
    )


def deleted_captured(completions: int, corrections: int) -> pb.DeleteCapturedTextResponse:
    return pb.DeleteCapturedTextResponse(completions=completions, corrections=corrections)


def chunk(event: CompletionEvent) -> pb.CompletionChunk:
    message = pb.CompletionChunk(
        request_id=event.request_id,
        completion_id=event.completion_id,
        text=event.text,
        final=event.final,
    )
    if event.final:
        message.finish_reason = _FINISH[event.finish or Finish.STOP]
    outcome = event.outcome
    if outcome is not None:
        message.model_id = outcome.model
        message.engine = outcome.engine
        message.template_id = outcome.template.template_id
        message.template_hash = outcome.template.content_hash
        message.prompt_tokens = outcome.prompt_tokens
        message.completion_tokens = outcome.completion_tokens
        message.cached_prompt_tokens = outcome.cached_tokens
        message.upstream = outcome.upstream
        message.moved_from = outcome.moved_from
        timings = outcome.timings
        message.timings.CopyFrom(
            pb.Timings(
                context_ms=timings.context_s * 1000,
                queue_ms=timings.queue_s * 1000,
                first_token_ms=timings.first_token_s * 1000,
                total_ms=timings.total_s * 1000,
                engine_ms=timings.engine_s * 1000,
            )
        )
    return message
