"""The servicer's edge over real gRPC, with a scripted engine and a real SQLite store: corrupt
bytes, refusals, and storage failures get a status or an `Error` naming what failed. The engine is
a fake because these tests are about the code around it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2

from ghostpen.proto import ghostpen_pb2 as pb
from tests.conftest import SessionStream
from tests.edge_server import Edge, edge_server, event, until

SERVICE = "/ghostpen.v1.Completion/"
CORRUPT = b"\x0a\xff\xff\xff"  # field 1, a length running past the end


@pytest_asyncio.fixture
async def edge(tmp_path) -> AsyncIterator[Edge]:
    async with edge_server(tmp_path) as opened:
        yield opened


async def test_corrupt_bytes_on_unary_calls_are_invalid_argument(edge: Edge) -> None:
    for method, kind in (("Report", "unary_unary"), ("Complete", "unary_stream")):
        call = getattr(edge.channel, kind)(SERVICE + method)(CORRUPT)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call if kind == "unary_unary" else [m async for m in call]
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, method
        assert f"not a valid ghostpen.v1.{method}Request" in refused.value.details()
        assert edge.errors(method, "INVALID_ARGUMENT") == 1


async def test_a_corrupt_message_ends_the_session_after_an_error_for_each_request_in_flight(
    edge: Edge,
) -> None:
    edge.engine.text, edge.engine.delay = "x" * 400, 0.01  # seconds in flight
    call = edge.channel.stream_stream(
        SERVICE + "Session", response_deserializer=pb.ServerMessage.FromString
    )()

    async def send(**kind: object) -> None:
        await call.write(pb.ClientMessage(**kind).SerializeToString())

    await send(file_update=pb.FileUpdate(path="a.py", version=1, text=b"x = "))
    assert (await call.read()).file_ack.version == 1
    request = pb.CompletionRequest(
        request_id="r", path="a.py", version=1, cursor_offset=4, max_tokens=400
    )
    await send(completion_request=request)
    first = (await call.read()).chunk
    assert first.text == "x"  # in flight
    await call.write(CORRUPT)
    replies = []
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            replies.append(await call.read())
    error = next(m.error for m in replies if m.HasField("error"))
    assert (error.request_id, error.path, error.status) == ("r", "a.py", "INVALID_ARGUMENT")
    assert not any(m.chunk.final for m in replies)  # the Error is its terminal message
    assert ended.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ghostpen.v1.ClientMessage" in ended.value.details()
    assert edge.engine.closed == [first.completion_id]  # stopped in the engine too


async def test_a_status_never_echoes_unbounded_input(edge: Edge) -> None:
    unknown = event("c" * 100_000)  # quoted in the message: "... for completion 'ccc...'"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await edge.stub.Report(pb.ReportRequest(events=[unknown]))
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND  # not INTERNAL: trailers too big
    assert len(refused.value.details()) < 1100


async def test_complete_refuses_an_unknown_mode_as_the_session_does(edge: Edge) -> None:
    request = pb.CompleteRequest(request_id="m", path="a.py", prefix=b"x = ", mode=9)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        [chunk async for chunk in edge.stub.Complete(request)]
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown mode 9" in refused.value.details()
    session = SessionStream(edge.stub)
    session.send(completion_request=pb.CompletionRequest(request_id="m", path="a.py", mode=9))
    reply = await session.read()
    assert reply.error.status == "INVALID_ARGUMENT"
    assert reply.error.message == refused.value.details()
    session.close()


async def test_complete_streams_and_its_final_chunk_says_what_served_it(edge: Edge) -> None:
    request = pb.CompleteRequest(request_id="c", path="a.py", prefix=b"x = ", suffix=b"\n")
    chunks = [chunk async for chunk in edge.stub.Complete(request)]
    final = chunks[-1]
    assert "".join(c.text for c in chunks) == "total()"
    assert (final.final, final.finish_reason) == (True, pb.FINISH_REASON_LINE_END)
    assert (final.engine, final.model_id, final.completion_tokens) == (
        "scripted",
        "scripted-model",
        8,
    )
    assert final.template_id and final.timings.total_ms > 0


async def test_a_failed_store_is_unavailable_on_report(edge: Edge) -> None:
    edge.break_store()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await edge.stub.Report(pb.ReportRequest(events=[event("c1")]))
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "telemetry database (SQLite) could not read telemetry" in refused.value.details()
    assert "no such table" in refused.value.details()


async def test_a_failed_store_answers_a_session_event_with_an_error_naming_it(edge: Edge) -> None:
    session = SessionStream(edge.stub)
    session.send(hello=pb.Hello())
    await session.read()
    await session.open_file("a.py", "x = ")
    _, final = await session.complete(request_id="r", path="a.py", version=1, cursor_offset=4)
    completion_id = final.chunk.completion_id
    edge.break_store()
    sent = event(completion_id)
    session.send(event=sent)
    reply = await session.read()
    assert (reply.error.status, reply.error.event_id) == ("UNAVAILABLE", sent.event_id)
    assert "could not store telemetry" in reply.error.message
    assert edge.errors("Session", "UNAVAILABLE") == 1
    await still_completes(session)
    session.close()


async def still_completes(session: SessionStream) -> None:
    _, final = await session.complete(request_id="again", path="a.py", version=1, cursor_offset=4)
    assert final.chunk.final, final


async def test_corrupt_bytes_without_a_token_are_refused_for_the_token_first(tmp_path) -> None:
    async with edge_server(tmp_path, auth_token="secret") as edge:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await edge.channel.unary_unary(SERVICE + "Report")(CORRUPT)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def complete(edge: Edge, request_id: str) -> pb.CompletionChunk:
    request = pb.CompleteRequest(request_id=request_id, path="a.py", prefix=b"x = ")
    chunks = [chunk async for chunk in edge.stub.Complete(request)]
    assert chunks[-1].final
    return chunks[-1]


async def test_a_completion_is_recorded_before_its_final_chunk_goes_out(edge: Edge) -> None:
    final = await complete(edge, "durable")
    # Read at once, from another connection: a SIGKILL now would not lose it.
    rows = edge.rows("SELECT finish FROM completions WHERE completion_id = ?", final.completion_id)
    assert rows == [("line_end",)]


async def test_records_that_failed_are_written_once_the_store_is_back(edge: Edge) -> None:
    edge.break_store()
    final = await complete(edge, "while-down")  # served all the same
    assert await edge.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    edge.heal_store()

    async def stored() -> bool:
        found = "SELECT COUNT(*) FROM completions WHERE completion_id = ?"
        return edge.rows(found, final.completion_id) == [(1,)]

    await until(stored)

    async def serving() -> bool:
        return await edge.health() == health_pb2.HealthCheckResponse.SERVING

    await until(serving)


async def test_a_store_process_killed_by_sigbus_costs_one_answer_not_the_server(
    edge: Edge,
) -> None:
    final = await complete(edge, "before")
    store = edge.running.writer.store
    os.kill(store.pid(), signal.SIGBUS)  # what a fault on SQLite's mapped -shm file does

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await edge.stub.Report(pb.ReportRequest(events=[event(final.completion_id)]))
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "telemetry writer process died (killed by SIGBUS)" in refused.value.details()
    again = await edge.stub.Report(pb.ReportRequest(events=[event(final.completion_id)]))
    assert len(again.acks) == 1  # a new process took over
    assert (await complete(edge, "after")).final

    async def serving() -> bool:
        return await edge.health() == health_pb2.HealthCheckResponse.SERVING

    await until(serving)


@pytest.mark.system  # root, and chattr on the disk's file system
async def test_an_immutable_database_is_unavailable_not_a_crash(edge: Edge) -> None:
    """The issue's reproduction: SQLite's mapped -shm file turns unwritable, and the process that
    touches it gets SIGBUS. That process is the store's, not the server's."""
    final = await complete(edge, "before")
    files = [str(path) for path in Path(edge.database).parent.glob("telemetry.db*")]
    subprocess.run(["chattr", "+i", *files], check=True)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await edge.stub.Report(pb.ReportRequest(events=[event(final.completion_id)]))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert (await complete(edge, "meanwhile")).final  # completions go on
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)

    async def serving() -> bool:
        return await edge.health() == health_pb2.HealthCheckResponse.SERVING

    await until(serving)
    again = await edge.stub.Report(pb.ReportRequest(events=[event(final.completion_id)]))
    assert len(again.acks) == 1


async def test_sessions_past_max_sessions_are_refused_until_one_closes(tmp_path) -> None:
    async with edge_server(tmp_path, max_sessions="2") as edge:
        opened = [SessionStream(edge.stub) for _ in range(2)]
        for session in opened:
            session.send(hello=pb.Hello())
            assert (await session.read()).HasField("welcome")
        third = edge.stub.Session()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await third.read()
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 sessions are open; the limit is max_sessions=2" in refused.value.details()
        opened.pop().close()

        async def admitted() -> bool:
            session = SessionStream(edge.stub)
            session.send(hello=pb.Hello())
            try:
                return (await session.read()).HasField("welcome")
            except grpc.aio.AioRpcError:
                return False
            finally:
                session.close()

        await until(admitted)
        opened[0].close()


async def test_an_idle_session_is_ended_with_a_clear_status(tmp_path) -> None:
    async with edge_server(tmp_path, session_idle_s="0.2") as edge:
        call = edge.stub.Session()
        await call.write(pb.ClientMessage(hello=pb.Hello()))
        assert (await call.read()).HasField("welcome")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 30)
        assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "session_idle_s" in ended.value.details()


async def test_a_client_that_never_reads_is_cut_off_at_max_queued_messages(tmp_path) -> None:
    async with edge_server(tmp_path, max_queued_messages="4096") as edge:
        call = edge.stub.Session()
        bad = pb.ClientMessage(file_update=pb.FileUpdate(path="p" * 1000))  # ~2 KB Error each

        for _ in range(10_000):  # 20 MB of replies, unread: past every transport window
            await call.write(bad)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(60):
                while True:
                    await call.read()
        assert ended.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, ended.value.details()
        assert "max_queued_messages=4096" in ended.value.details()


async def test_an_empty_report_is_answered(edge: Edge) -> None:
    """Found by the fuzz: a Report of no events waited forever for a write that never came."""
    async with asyncio.timeout(30):
        reply = await edge.stub.Report(pb.ReportRequest())
    assert list(reply.acks) == []


async def test_the_event_loops_lag_is_measured(edge: Edge) -> None:
    def samples() -> float:
        value = edge.metrics.registry.get_sample_value("ghostpen_event_loop_lag_seconds_count")
        return value or 0.0

    async def sampled() -> bool:
        return samples() >= 2

    await until(sampled)
