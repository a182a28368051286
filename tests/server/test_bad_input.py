"""Every kind of bad input gets a clear status naming the problem and the limit; the session
stays usable afterwards. Real server, real llama.cpp engine."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from ghostpen.proto import ghostpen_pb2 as pb
from tests.conftest import SessionStream, engine_idle

SMALL = "def add(a, b):\n    return "
LONG = "numbers = [\n" + "".join(f"    {i},\n" for i in range(1, 6)) + "    "


async def still_usable(session: SessionStream, path: str = "ok.py", version: int = 1) -> None:
    await session.open_file(path, SMALL, version)
    _text, final = await session.complete(
        request_id=f"after-{path}-{version}",
        path=path,
        version=version,
        cursor_offset=len(SMALL),
        max_tokens=3,
    )
    assert final.HasField("chunk") and final.chunk.final, final


async def error_for(session: SessionStream, **kind: object) -> pb.Error:
    session.send(**kind)
    message = await session.read()
    assert message.HasField("error"), message
    return message.error


def request(**fields: object) -> pb.CompletionRequest:
    fields.setdefault("request_id", "bad")
    fields.setdefault("path", "ok.py")
    fields.setdefault("version", 1)
    return pb.CompletionRequest(**fields)


@pytest.fixture
def session(stub):
    opened = SessionStream(stub)
    yield opened
    opened.close()


async def test_oversize_file(session, settings) -> None:
    limit = settings.limits.max_file_bytes
    error = await error_for(
        session, file_update=pb.FileUpdate(path="big.py", version=1, text=b"x" * (limit + 1))
    )
    assert error.status == "RESOURCE_EXHAUSTED"
    assert error.path == "big.py"
    assert f"max_file_bytes={limit}" in error.message
    await still_usable(session)


async def test_too_many_files_evicts_the_least_recent(session, settings) -> None:
    limit = settings.limits.max_files
    for i in range(limit):
        ack = await session.open_file(f"f{i}.py", f"x{i} = {i}\n")
        assert list(ack.file_ack.evicted) == []
    ack = await session.open_file("one_more.py", "y = 1\n")
    assert list(ack.file_ack.evicted) == ["f0.py"]
    error = await error_for(session, completion_request=request(path="f0.py"))
    assert error.status == "NOT_FOUND" and f"max_files={limit}" in error.message
    await still_usable(session)


async def test_request_for_a_file_the_session_does_not_hold(session) -> None:
    error = await error_for(session, completion_request=request(path="nowhere.py"))
    assert (error.status, error.request_id) == ("NOT_FOUND", "bad")
    assert "'nowhere.py'" in error.message
    await still_usable(session)


async def test_stale_and_unknown_versions(session) -> None:
    await session.open_file("ok.py", SMALL, version=3)
    error = await error_for(session, completion_request=request(version=2))
    assert error.status == "FAILED_PRECONDITION" and "holds version 3" in error.message
    error = await error_for(session, completion_request=request(version=9))
    assert error.status == "FAILED_PRECONDITION"
    error = await error_for(session, file_update=pb.FileUpdate(path="ok.py", version=2, text=b""))
    assert error.status == "FAILED_PRECONDITION" and "not newer" in error.message
    edits = pb.EditList(edits=[pb.Edit(start=0, end=0, text=b"#")])
    error = await error_for(
        session, file_update=pb.FileUpdate(path="ok.py", version=4, base_version=1, edits=edits)
    )
    assert error.status == "FAILED_PRECONDITION" and "send the full text" in error.message
    await still_usable(session, version=5)


async def test_cursor_outside_the_file(session) -> None:
    await session.open_file("ok.py", SMALL)
    error = await error_for(session, completion_request=request(cursor_offset=len(SMALL) + 1))
    assert error.status == "OUT_OF_RANGE"
    assert f"{len(SMALL)} code points" in error.message
    await still_usable(session, version=2)


async def test_invalid_utf8(session) -> None:
    error = await error_for(
        session, file_update=pb.FileUpdate(path="bin.py", version=1, text=b"ok \xff\xfe")
    )
    assert error.status == "INVALID_ARGUMENT" and "not valid UTF-8" in error.message
    await still_usable(session)


async def test_unknown_language_falls_back_to_line_chunks(session) -> None:
    session.send(
        file_update=pb.FileUpdate(path="spell.klg", language="klingon", version=1, text=b"a\nb\n")
    )
    assert (await session.read()).HasField("file_ack")
    _, final = await session.complete(
        request_id="klg", path="spell.klg", version=1, cursor_offset=2, max_tokens=2
    )
    assert final.HasField("chunk"), final


async def test_deadline_already_passed(session) -> None:
    await session.open_file("ok.py", SMALL)
    past = int(time.time() * 1000) - 500
    error = await error_for(session, completion_request=request(deadline_unix_ms=past))
    assert error.status == "DEADLINE_EXCEEDED" and "before the request arrived" in error.message
    await still_usable(session, version=2)


async def test_deadline_passing_during_generation_drops_the_request(session, server) -> None:
    await session.open_file("long.py", LONG)
    before = await engine_idle(server.engine)
    soon = int(time.time() * 1000) + 300
    _, final = await session.complete(
        request_id="slow",
        path="long.py",
        version=1,
        cursor_offset=len(LONG),
        mode=pb.MODE_MULTI_LINE,
        max_tokens=400,
        deadline_unix_ms=soon,
    )
    assert final.error.status == "DEADLINE_EXCEEDED" and "dropped" in final.error.message
    idle = await engine_idle(server.engine)  # the engine stopped, not just the stream
    assert idle.tokens_generated - before.tokens_generated < 400  # of the 400 asked for
    await still_usable(session)


async def test_cancel_of_an_unknown_request(session) -> None:
    error = await error_for(session, cancel=pb.Cancel(request_id="never-sent"))
    assert (error.status, error.request_id) == ("NOT_FOUND", "never-sent")
    await still_usable(session)


async def test_a_cancel_that_races_the_final_chunk_is_not_an_error(session) -> None:
    await session.open_file("done.py", SMALL)
    _text, final = await session.complete(
        request_id="done", path="done.py", version=1, cursor_offset=len(SMALL), max_tokens=2
    )
    assert final.chunk.final
    session.send(cancel=pb.Cancel(request_id="done"))
    reply = await session.open_file("done.py", SMALL, 2)  # the next message is this file's ack
    assert reply.HasField("file_ack"), reply


async def test_cancel_stops_a_request(session) -> None:
    await session.open_file("long.py", LONG)
    session.send(
        completion_request=request(
            request_id="long",
            path="long.py",
            cursor_offset=len(LONG),
            mode=pb.MODE_MULTI_LINE,
            max_tokens=400,
        )
    )
    await session.read()
    session.send(cancel=pb.Cancel(request_id="long"))
    _, final = await session.collect("long")
    assert final.chunk.finish_reason == pb.FINISH_REASON_CANCELLED


@pytest.mark.parametrize(
    ("fields", "status", "needle"),
    [
        ({"max_tokens": 100_000}, "RESOURCE_EXHAUSTED", "max_tokens_limit=512"),
        ({"request_id": ""}, "INVALID_ARGUMENT", "request_id is empty"),
        ({"request_id": "x" * 500}, "INVALID_ARGUMENT", "max_request_id_chars=128"),
        ({"path": ""}, "INVALID_ARGUMENT", "path is empty"),
    ],
)
async def test_malformed_requests(session, fields, status, needle) -> None:
    error = await error_for(session, completion_request=request(**fields))
    assert error.status == status and needle in error.message
    await still_usable(session)


async def test_duplicate_request_id_in_flight(session) -> None:
    await session.open_file("long.py", LONG)
    long = request(
        request_id="dup",
        path="long.py",
        cursor_offset=len(LONG),
        mode=pb.MODE_MULTI_LINE,
        max_tokens=400,
    )
    session.send(completion_request=long)
    await session.read()
    error = await error_for(session, completion_request=long)
    assert error.status == "ALREADY_EXISTS"
    session.send(cancel=pb.Cancel(request_id="dup"))
    await session.collect("dup")


async def test_empty_message(session) -> None:
    error = await error_for(session)
    assert error.status == "INVALID_ARGUMENT" and "set one of" in error.message


async def test_client_disconnecting_mid_stream_stops_the_engine(stub, server) -> None:
    session = SessionStream(stub)
    await session.open_file("long.py", LONG)
    session.send(
        completion_request=request(
            request_id="gone",
            path="long.py",
            cursor_offset=len(LONG),
            mode=pb.MODE_MULTI_LINE,
            max_tokens=400,
        )
    )
    await session.read()
    metric = ("ghostpen_cancellations_total", {"engine": "llama.cpp", "reason": "disconnect"})
    before = server.metrics.registry.get_sample_value(*metric) or 0
    session.call.cancel()
    for _ in range(50):
        if (server.metrics.registry.get_sample_value(*metric) or 0) > before:
            break
        await asyncio.sleep(0.05)
    assert server.metrics.registry.get_sample_value(*metric) == before + 1
    await engine_idle(server.engine)  # the engine stopped, not just the stream
    fresh = SessionStream(stub)
    await still_usable(fresh)
    fresh.close()


async def test_complete_rejects_bad_input_with_a_status(stub, settings) -> None:
    cases = [
        (
            pb.CompleteRequest(request_id="c", path="a.py", prefix=b"\xff"),
            "INVALID_ARGUMENT",
            "not valid UTF-8",
        ),
        (
            pb.CompleteRequest(
                request_id="c",
                path="a.py",
                context_files=[pb.ContextFile(path=f"{i}.py") for i in range(13)],
            ),
            "RESOURCE_EXHAUSTED",
            f"max_context_files={settings.limits.max_context_files}",
        ),
        (
            pb.CompleteRequest(request_id="c", path="a.py", deadline_unix_ms=1),
            "DEADLINE_EXCEEDED",
            "before the request arrived",
        ),
        (pb.CompleteRequest(request_id="", path="a.py"), "INVALID_ARGUMENT", "request_id"),
    ]
    for request_message, status, needle in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Complete(request_message):
                pass
        assert caught.value.code().name == status
        assert needle in caught.value.details()


async def test_oversize_message_is_refused_by_grpc(stub, settings) -> None:
    huge = pb.CompleteRequest(
        request_id="c", path="a.py", prefix=b"x" * (settings.server.max_message_bytes + 1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Complete(huge):
            pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
