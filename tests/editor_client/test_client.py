"""SessionClient against the real server (llama.cpp, default model)."""

import asyncio
import dataclasses

import grpc
import pytest

from ghostpen.benchmarks.server_process import free_port
from ghostpen.editor_client.client import SessionClient
from ghostpen.editor_client.feedback import Feedback
from ghostpen.editor_client.recent_files import RecentFiles, TextEdit
from ghostpen.editor_client.settings import ClientSettings
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.app import RunningServer, start_server
from ghostpen.server.engines.factory import start_engine
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import Settings

CODE = "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n    return "


async def until(condition, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def serve_on(settings: Settings, port: int, token: str = "") -> RunningServer:
    """A server of its own on a chosen port, so that a test can stop and restart it."""
    server = dataclasses.replace(settings.server, port=port, metrics_port=-1)
    auth = dataclasses.replace(settings.auth, auth_token=token)
    serving = dataclasses.replace(settings, server=server, auth=auth)
    metrics = Metrics()
    engine = await start_engine(settings.engine, settings.cache_dir, metrics)
    return await start_server(serving, engine, metrics)


def new_client(port: int, **options) -> tuple[SessionClient, list[str]]:
    said: list[str] = []
    settings = ClientSettings(
        server=f"127.0.0.1:{port}", reconnect_initial_s=0.05, reconnect_max_s=0.2, **options
    )
    files = RecentFiles(
        settings.max_files, settings.max_file_bytes, settings.max_session_bytes, said.append
    )
    return SessionClient(settings, files, said.append, workspace="mathlib"), said


async def test_completes_from_the_files_it_sent_and_a_newer_request_wins(server) -> None:
    client, said = new_client(server.port)
    client.files.open("math.py", "python", CODE, 1)
    client.start()
    await until(lambda: client.connected)
    assert client.welcome.max_files == 12 and said == []
    completion = await client.complete("math.py", len(CODE))
    assert completion is not None and completion.completion_id
    assert completion.text.strip().startswith("a * b")
    assert completion.received_at >= completion.sent_at

    client.files.change("math.py", 2, [TextEdit(len(CODE), len(CODE), "a")])
    client.sync_files()
    first = asyncio.create_task(client.complete("math.py", len(CODE) + 1))
    await asyncio.sleep(0)
    second = await client.complete("math.py", len(CODE))
    assert await first is None  # superseded, never shown
    assert second is not None and second.request_id != completion.request_id
    await client.close()


async def test_an_unreachable_server_costs_nothing_and_is_said_once(settings) -> None:
    port = free_port()
    client, said = new_client(port)
    client.files.open("math.py", "python", CODE, 1)
    client.start()
    await until(lambda: client.failed_attempts >= 3)
    assert await client.complete("math.py", len(CODE)) is None
    assert len(said) == 1 and f"127.0.0.1:{port} unavailable" in said[0]

    # The server comes up: the client reconnects and sends the file again, whole.
    running = await serve_on(settings, port)
    try:
        await until(lambda: client.connected)
        assert said[-1] == f"ghostpen: reconnected to 127.0.0.1:{port}"
        completion = await client.complete("math.py", len(CODE))
        assert completion is not None and completion.text

        # It goes away and comes back: one more notice each way, and the files go again.
        await running.stop(0.5)
        await until(lambda: not client.connected)
        assert await client.complete("math.py", len(CODE)) is None
        running = await serve_on(settings, port)
        await until(lambda: client.connected)
        assert client.sessions == 2 and len(said) == 4
        assert await client.complete("math.py", len(CODE)) is not None
    finally:
        await client.close()
        await running.stop(0.5)


async def test_telemetry_waits_for_the_server_and_is_acknowledged_once_sent(settings) -> None:
    port = free_port()
    client, _ = new_client(port)
    client.files.open("math.py", "python", CODE, 1)
    client.start()
    running = await serve_on(settings, port)
    try:
        await until(lambda: client.connected)
        completion = await client.complete("math.py", len(CODE))
        await running.stop(0.5)
        await until(lambda: not client.connected)
        feedback = Feedback(client.report)
        feedback.shown(completion.completion_id)
        feedback.accepted(completion.completion_id, "math.py", len(CODE), completion.text)
        assert client.unacknowledged_events == 2
        running = await serve_on(settings, port)
        await until(lambda: client.unacknowledged_events == 0)
    finally:
        await client.close()
        await running.stop(0.5)


async def test_a_server_with_a_token_turns_away_clients_without_it(settings) -> None:
    port = free_port()
    running = await serve_on(settings, port, token="s3cret")
    without, said = new_client(port)
    with_token, _ = new_client(port, token="s3cret")
    for client in (without, with_token):
        client.files.open("math.py", "python", CODE, 1)
        client.start()
    try:
        await until(lambda: with_token.connected and said)
        assert "UNAUTHENTICATED: no token: this server requires one" in said[0]
        assert not without.connected
        assert await with_token.complete("math.py", len(CODE)) is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CompletionStub(channel)
            wrong = (("authorization", "Bearer guess"),)
            with pytest.raises(grpc.aio.AioRpcError, match="unknown or revoked token"):
                await stub.Report(pb.ReportRequest(), metadata=wrong)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Complete(pb.CompleteRequest(path="a.py"), metadata=wrong):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await without.close()
        await with_token.close()
        await running.stop(0.5)


async def test_a_completion_the_show_gate_withholds_is_nothing_to_show(settings) -> None:
    """A floor above any log-probability withholds every completion: the client gets its final
    chunk and shows nothing, though text streamed before it."""
    unsure = dataclasses.replace(settings.context, show_min_confidence=0.5)
    port = free_port()
    running = await serve_on(dataclasses.replace(settings, context=unsure), port)
    client, _ = new_client(port)
    client.files.open("math.py", "python", CODE, 1)
    client.start()
    try:
        await until(lambda: client.connected)
        completion = await client.complete("math.py", len(CODE))
        assert completion is not None and completion.completion_id
        assert (completion.text, completion.finish_reason) == ("", "FINISH_REASON_WITHHELD")
    finally:
        await client.close()
        await running.stop(0.5)
