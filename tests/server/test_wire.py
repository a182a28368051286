"""The wire module: what a protobuf message becomes, what it is refused with, and the one status
table. Table-driven and without a server."""

from __future__ import annotations

import re

import grpc
import pytest

from ghostpen.context.postprocess import Mode
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.server import errors, wire
from ghostpen.server.session import FileRequest, Hello, RequestError
from ghostpen.server.settings import LimitSettings

LIMITS = LimitSettings(max_request_id_chars=8, max_path_chars=16, max_context_files=1)


def all_subclasses(kind: type) -> set[type]:
    found = set()
    for sub in kind.__subclasses__():
        found |= {sub} | all_subclasses(sub)
    return found


def test_every_error_has_a_status_and_only_the_two_bases_fall_back() -> None:
    leaves = all_subclasses(errors.GhostpenError) - {errors.RecoverableError, errors.FatalError}
    assert leaves == set(wire.STATUS)
    assert wire.status_of(errors.StoreUnavailable("x")) is grpc.StatusCode.UNAVAILABLE
    assert wire.status_of(errors.GhostpenError("x")) is grpc.StatusCode.INTERNAL


def test_errors_are_split_by_whether_the_caller_can_recover() -> None:
    fatal = {errors.EngineFailure, errors.InternalError}
    for kind in wire.STATUS:
        assert issubclass(kind, errors.FatalError) == (kind in fatal), kind
        assert issubclass(kind, errors.RecoverableError) == (kind not in fatal), kind


def test_the_errors_module_knows_nothing_of_grpc() -> None:
    with open(errors.__file__) as module:
        source = module.read()
    assert "grpc" not in source.split('"""', 2)[2]


@pytest.mark.parametrize(
    ("request_fields", "status", "needle"),
    [
        ({"request_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty"),
        ({"request_id": "x" * 9}, grpc.StatusCode.INVALID_ARGUMENT, "max_request_id_chars=8"),
        ({"path": ""}, grpc.StatusCode.INVALID_ARGUMENT, "path is empty"),
        ({"path": "p" * 17}, grpc.StatusCode.INVALID_ARGUMENT, "max_path_chars=16"),
        ({"max_tokens": 10_000}, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_tokens_limit=512"),
        ({"mode": 7}, grpc.StatusCode.INVALID_ARGUMENT, "unknown mode 7; the modes are"),
        ({"deadline_unix_ms": 1}, grpc.StatusCode.DEADLINE_EXCEEDED, "before the request"),
    ],
)
def test_both_rpcs_check_a_request_the_same_way(
    request_fields: dict, status: grpc.StatusCode, needle: str
) -> None:
    fields = {"request_id": "r1", "path": "a.py", **request_fields}
    session_item = wire.client_message(
        pb.ClientMessage(completion_request=pb.CompletionRequest(version=1, **fields)),
        LIMITS,
        0.0,
        "u",
    )
    assert isinstance(session_item, RequestError)
    with pytest.raises(errors.GhostpenError) as complete_error:
        wire.inline_request(pb.CompleteRequest(**fields), LIMITS, 0.0, None)
    for error in (session_item.error, complete_error.value):
        assert wire.status_of(error) is status and needle in str(error), error
    same = [re.sub(r"\d+", "N", str(e)) for e in (session_item.error, complete_error.value)]
    assert same[0] == same[1]  # the same words (a deadline's milliseconds move on)


def test_a_session_request_becomes_a_file_request() -> None:
    message = pb.CompletionRequest(
        request_id="r1", path="a.py", version=3, cursor_offset=5, mode=pb.MODE_MULTI_LINE
    )
    item = wire.client_message(pb.ClientMessage(completion_request=message), LIMITS, 12.0, "u")
    assert isinstance(item, FileRequest)
    assert (item.path, item.version, item.cursor) == ("a.py", 3, 5)
    assert (item.spec.request_id, item.spec.mode, item.spec.received) == (
        "r1",
        Mode.MULTI_LINE,
        12.0,
    )
    assert item.spec.deadline_s == LIMITS.default_timeout_ms / 1000


def test_a_complete_call_takes_the_earlier_deadline_and_a_bounded_workspace() -> None:
    request = pb.CompleteRequest(
        request_id="r1",
        path="a.py",
        prefix=b"x = ",
        suffix=b"\n",
        workspace="w" * 100,
        context_files=[pb.ContextFile(path="b.py", text=b"y = 1\n")],
    )
    inline = wire.inline_request(request, LIMITS, 0.0, grpc_left=0.25)
    assert inline.spec.deadline_s == 0.25
    assert inline.repo == "w" * 16  # as Hello's is: max_path_chars
    assert (inline.document.text, inline.cursor) == ("x = \n", 4)
    assert [f.path for f in inline.context] == ["b.py"]


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (pb.CompleteRequest(request_id="r", path="a.py", prefix=b"\xff"), "not valid UTF-8"),
        (
            pb.CompleteRequest(request_id="r", path="a.py", context_files=[pb.ContextFile()] * 2),
            "max_context_files=1",
        ),
        (
            pb.CompleteRequest(request_id="r", path="a.py", context_files=[pb.ContextFile()]),
            "path is empty",
        ),
        (pb.CompleteRequest(request_id="r", path="a.py", language="x" * 65), "max_language_chars"),
        (
            pb.CompleteRequest(
                request_id="r",
                path="a.py",
                context_files=[pb.ContextFile(path="b", language="x" * 65)],
            ),
            "max_language_chars=64",
        ),
    ],
)
def test_inline_files_are_checked(message: pb.CompleteRequest, needle: str) -> None:
    with pytest.raises(errors.GhostpenError, match=needle):
        wire.inline_request(message, LIMITS, 0.0, None)


def test_corrupt_bytes_become_a_clear_invalid_argument() -> None:
    parse = wire._parser(pb.ClientMessage)
    corrupt = parse(b"\x0a\xff\xff\xff")  # field 1, a length running past the end
    assert isinstance(corrupt, wire.Corrupt)
    item = wire.client_message(corrupt, LIMITS, 0.0, "u")
    assert isinstance(item, RequestError)
    assert wire.status_of(item.error) is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ghostpen.v1.ClientMessage" in str(item.error)
    assert parse(pb.ClientMessage(hello=pb.Hello()).SerializeToString()) == pb.ClientMessage(
        hello=pb.Hello()
    )


def test_handlers_cover_every_method_of_the_service() -> None:
    handler = wire.handlers(object.__new__(_Servicer))
    for method in wire.SERVICE.methods:
        details = _Details(f"/{wire.SERVICE.full_name}/{method.name}")
        found = handler.service(details)
        assert found is not None, method.name
        assert (found.request_streaming, found.response_streaming) == (
            method.client_streaming,
            method.server_streaming,
        )


def test_hello_and_an_empty_message() -> None:
    hello = wire.client_message(
        pb.ClientMessage(hello=pb.Hello(workspace="w" * 40)), LIMITS, 0.0, "u"
    )
    assert hello == Hello("w" * 16)
    empty = wire.client_message(pb.ClientMessage(), LIMITS, 0.0, "u")
    assert isinstance(empty, RequestError) and "set one of" in str(empty.error)


def test_an_error_names_its_event() -> None:
    message = wire.server_message(
        RequestError("", "", errors.StoreUnavailable("disk full"), event_id="e1"), LIMITS
    )
    assert (message.error.status, message.error.event_id) == ("UNAVAILABLE", "e1")
    assert message.error.code == grpc.StatusCode.UNAVAILABLE.value[0]


class _Servicer:
    def Session(self) -> None: ...

    def Complete(self) -> None: ...

    def Report(self) -> None: ...

    def DeleteCapturedText(self) -> None: ...


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_an_error_message_never_echoes_unbounded_input() -> None:
    limits = LimitSettings(max_error_chars=100)
    error = errors.UnknownRequest(f"completion {'c' * 100_000!r} was never served")
    text = wire.message_of(error, limits.max_error_chars)
    assert text.startswith("completion 'ccc") and text.endswith("(99930 more characters)")
    assert len(text) < 130
    message = wire.server_message(RequestError("r", "", error), limits)
    assert message.error.message == text


def test_a_file_update_with_a_long_language_is_refused() -> None:
    update = pb.FileUpdate(path="a.py", version=1, language="x" * 65, text=b"")
    item = wire.client_message(pb.ClientMessage(file_update=update), LIMITS, 0.0, "u")
    assert isinstance(item, RequestError) and item.path == "a.py"
    assert "language has 65 characters; the limit is max_language_chars=64" in str(item.error)


def test_the_affinity_header_is_read_and_bounded() -> None:
    limits = LimitSettings(max_affinity_chars=8)
    assert wire.affinity(None, limits) == ""
    assert wire.affinity((("x-ghostpen-affinity", "ed-1"), ("other", "x")), limits) == "ed-1"
    with pytest.raises(errors.InvalidInput, match=r"has 9 characters.*max_affinity_chars=8"):
        wire.affinity((("x-ghostpen-affinity", "123456789"),), limits)
