"""A graceful drain, as SIGTERM runs it: health NOT_SERVING at once, new work refused UNAVAILABLE,
idle sessions ended at once, work in flight finished within the grace period or ended with a
message saying why, and telemetry written before the store closes."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2

from ghostpen.benchmarks.server_process import running_server
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from tests.conftest import SessionStream
from tests.edge_server import Edge, edge_server, event, until

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def opened(edge: Edge) -> SessionStream:
    session = SessionStream(edge.stub)
    session.send(hello=pb.Hello())
    assert (await session.read()).HasField("welcome")
    await session.open_file("a.py", "x = ")
    return session


def ask(session: SessionStream, request_id: str) -> None:
    request = pb.CompletionRequest(
        request_id=request_id, path="a.py", version=1, cursor_offset=4, max_tokens=400
    )
    session.send(completion_request=request)


async def rest_of(session: SessionStream) -> tuple[list[pb.ServerMessage], grpc.aio.AioRpcError]:
    """What the session still sends, and the status it ends with."""
    replies = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        while True:
            replies.append(await session.read())
    return replies, error.value


async def ended(session: SessionStream) -> grpc.aio.AioRpcError:
    return (await rest_of(session))[1]


async def test_work_in_flight_finishes_while_new_work_and_idle_sessions_are_refused(
    tmp_path,
) -> None:
    async with edge_server(tmp_path) as edge:
        edge.engine.text, edge.engine.delay = "x" * 40, 0.02  # ~0.8 s a completion
        busy, idle = await opened(edge), await opened(edge)
        _, first = await busy.complete(
            request_id="first", path="a.py", version=1, cursor_offset=4, max_tokens=400
        )
        ask(busy, "in-flight")
        assert (await busy.read()).chunk.text == "x"
        inline = edge.stub.Complete(
            pb.CompleteRequest(request_id="inline", path="a.py", prefix=b"x = ", max_tokens=400)
        )
        assert (await inline.read()).text == "x"

        stopping = asyncio.create_task(edge.running.stop(30))

        async def not_serving() -> bool:
            return await edge.health() == NOT_SERVING

        await until(not_serving)
        refused = await ended(idle)
        assert refused.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down and takes no new work" in refused.details()
        assert "in-flight" not in edge.engine.closed  # idle ended while work was in flight
        with pytest.raises(grpc.aio.AioRpcError) as new_call:
            await inline_text(edge.stub.Complete(pb.CompleteRequest(request_id="n", path="a.py")))
        assert new_call.value.code() is grpc.StatusCode.UNAVAILABLE

        acked = event(first.chunk.completion_id)
        busy.send(event=acked)  # the stream is still open: events are still stored
        ask(busy, "late")
        replies, status = await rest_of(busy)
        text = "".join(r.chunk.text for r in replies if r.chunk.request_id == "in-flight")
        assert (text, replies[-1].chunk.final) == ("x" * 39, True)  # after the first "x"
        [late] = [r.error for r in replies if r.HasField("error")]
        assert (late.request_id, late.status) == ("late", "UNAVAILABLE")
        assert [r.event_ack.event_id for r in replies if r.HasField("event_ack")] == [
            acked.event_id
        ]
        assert status.code() is grpc.StatusCode.UNAVAILABLE

        assert await inline_text(inline) == "x" * 39  # the rest of it, and status OK
        await stopping
        stored = edge.rows("SELECT event_id FROM events")
        assert stored == [(acked.event_id,)]
        served = edge.rows("SELECT COUNT(*) FROM completions")
        assert served == [(3,)]  # first, in-flight and inline


async def inline_text(call) -> str:
    """The rest of a Complete call's text; a status other than OK is raised by `read`."""
    text = ""
    while (chunk := await call.read()) is not grpc.aio.EOF:
        text += chunk.text
    assert await call.code() is grpc.StatusCode.OK
    return text


async def test_work_past_the_grace_period_ends_unavailable_saying_so(tmp_path) -> None:
    async with edge_server(tmp_path) as edge:
        edge.engine.text, edge.engine.delay = "x" * 400, 0.05  # 20 s: past any grace
        busy = await opened(edge)
        ask(busy, "long")
        long = (await busy.read()).chunk
        inline = edge.stub.Complete(
            pb.CompleteRequest(request_id="inline", path="a.py", prefix=b"x = ", max_tokens=400)
        )
        started = await inline.read()
        assert (long.text, started.text) == ("x", "x")

        await edge.running.stop(0.3)

        _, terminal = await busy.collect("long")
        assert terminal.error.status == "UNAVAILABLE"
        assert "shut down before the completion finished (shutdown_grace_s=0.3)" in (
            terminal.error.message
        )
        assert (await ended(busy)).code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await inline_text(inline)
        assert cut.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutdown_grace_s=0.3" in cut.value.details()
        stopped_in_engine = sorted(edge.engine.closed)
        assert stopped_in_engine == sorted([long.completion_id, started.completion_id])
        stopped = edge.metrics.registry.get_sample_value(
            "ghostpen_cancellations_total", {"engine": "scripted", "reason": "shutdown"}
        )
        assert stopped == 2


@pytest.mark.system  # the real server and engine processes, and their signals
@pytest.mark.parametrize("ctrl_c", [False, True], ids=["SIGTERM", "Ctrl-C"])
async def test_a_signal_drains_the_real_server_without_a_traceback(tmp_path, ctrl_c) -> None:
    """SIGTERM from an orchestrator, or a Ctrl-C that reaches the engine's process too: the
    request in flight still gets its final chunk, and the server exits 0 saying so."""
    log = tmp_path / "server.log"
    environment = {"GHOSTPEN_DATABASE": str(tmp_path / "telemetry.db")}
    with (
        log.open("w") as stderr,
        running_server(
            "--engine", "llama.cpp", env=environment, stderr=stderr, own_group=True
        ) as server,
    ):
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.CompletionStub(channel)
            busy, idle = SessionStream(stub), SessionStream(stub)
            for session in (busy, idle):
                session.send(hello=pb.Hello())
                assert (await session.read()).HasField("welcome")
            await busy.open_file("a.py", "def fibonacci(n):\n    ")
            request = pb.CompletionRequest(
                request_id="r",
                path="a.py",
                version=1,
                cursor_offset=len("def fibonacci(n):\n    "),
                mode=pb.MODE_MULTI_LINE,
                max_tokens=64,
            )
            busy.send(completion_request=request)
            assert (await busy.read()).HasField("chunk")
            if ctrl_c:
                os.killpg(server.process.pid, signal.SIGINT)
            else:
                server.process.terminate()
            replies, status = await rest_of(busy)
            assert replies[-1].chunk.final, replies[-1]
            assert status.code() is grpc.StatusCode.UNAVAILABLE
            assert (await ended(idle)).code() is grpc.StatusCode.UNAVAILABLE
        assert server.process.wait(timeout=60) == 0
    output = log.read_text()
    assert "Traceback" not in output and " ERROR " not in output, output
    assert "stopped in" in output
