"""The engine in its own process: a crash there costs the requests in flight, never the server.

Each test has a server of its own, so the engine it kills is nobody else's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.app import RunningServer, start_server
from ghostpen.server.engines.base import EngineRequest
from ghostpen.server.engines.factory import start_engine
from ghostpen.server.errors import EngineUnavailable, ModelError
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import Settings
from tests.conftest import SessionStream

SOURCE = "def fibonacci(n):\n    "
LONG_SOURCE = "".join(f"value_{i} = compute_{i}(data, {i})\n" for i in range(60)) + "total = "
TIMEOUT_S = 120
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def own_server(settings: Settings, **engine: str) -> RunningServer:
    """A server of its own, its engine restarted fast, with these engine settings changed."""
    values = {"restart_backoff_s": "0.05", **engine}
    parsed = Settings.from_values(values).engine
    engine_settings = dataclasses.replace(
        settings.engine, **{name: getattr(parsed, name) for name in values}
    )
    serving = dataclasses.replace(
        settings, engine=engine_settings, server=dataclasses.replace(settings.server, port=0)
    )
    metrics = Metrics()
    engine_process = await start_engine(engine_settings, settings.cache_dir, metrics)
    return await start_server(serving, engine_process, metrics)


@pytest_asyncio.fixture(loop_scope="session")
async def crashable(settings) -> AsyncIterator[RunningServer]:
    server = await own_server(settings)
    yield server
    await server.stop(1.0)


class HealthWatch:
    """Every status the server's health service reports, from now on."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.seen: list[int] = []
        self._changed = asyncio.Event()
        stub = health_pb2_grpc.HealthStub(channel)
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for response in self._call:
            self.seen.append(response.status)
            self._changed.set()

    async def until(self, *statuses: int) -> None:
        """Until the statuses seen end with these, in order."""
        async with asyncio.timeout(TIMEOUT_S):
            while self.seen[-len(statuses) :] != list(statuses):
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        self._call.cancel()


async def open_session(channel: grpc.aio.Channel, text: str) -> SessionStream:
    session = SessionStream(pb_grpc.CompletionStub(channel))
    session.send(hello=pb.Hello(client="test", workspace="crash"))
    await session.read()
    await session.open_file("a.py", text)
    return session


def request(request_id: str, text: str, max_tokens: int) -> pb.CompletionRequest:
    return pb.CompletionRequest(
        deadline_unix_ms=int((time.time() + TIMEOUT_S) * 1000),
        request_id=request_id,
        path="a.py",
        version=1,
        cursor_offset=len(text),
        mode=pb.MODE_MULTI_LINE,
        max_tokens=max_tokens,
    )


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
@pytest.mark.parametrize("phase", ["prompt", "decode"])
async def test_an_engine_killed_mid_request_fails_it_and_the_session_goes_on(
    crashable: RunningServer, sig: signal.Signals, phase: str
) -> None:
    engine = crashable.engine
    async with grpc.aio.insecure_channel(f"127.0.0.1:{crashable.port}") as channel:
        health = HealthWatch(channel)
        await health.until(SERVING)
        text = LONG_SOURCE if phase == "prompt" else SOURCE
        session = await open_session(channel, text)
        before = await engine.fresh_stats()
        session.send(completion_request=request("doomed", text, 300))
        if phase == "decode":
            first = await session.read(TIMEOUT_S)
            assert first.chunk.request_id == "doomed" and not first.chunk.final
        else:  # kill while the prompt is being read, chunk by chunk
            async with asyncio.timeout(TIMEOUT_S):
                while (await engine.fresh_stats()).tokens_prefilled == before.tokens_prefilled:
                    await asyncio.sleep(0.01)
            assert (await engine.fresh_stats()).tokens_generated == before.tokens_generated
        dead = engine.pid
        os.kill(dead, sig)
        _, final = await session.collect("doomed")
        assert final.error.status == "UNAVAILABLE", final
        assert f"killed by {sig.name}" in final.error.message
        await health.until(SERVING, NOT_SERVING, SERVING)
        assert engine.pid != dead
        assert engine.stats().restarts >= 1
        again, final = await session.complete(**_fields(request("after", text, 8)))
        assert final.chunk.final and again, final
        health.close()
        session.close()


def _fields(message: pb.CompletionRequest) -> dict[str, object]:
    return {field.name: value for field, value in message.ListFields()}


async def test_a_crash_loop_stops_the_restarts_and_says_so(settings) -> None:
    server = await own_server(settings, crash_loop_restarts="2", crash_loop_window_s="600")
    engine = server.engine
    try:
        for _ in range(2):
            restarted = asyncio.Event()
            engine.watch(lambda serving, done=restarted: serving and done.set())
            os.kill(engine.pid, signal.SIGKILL)
            try:
                async with asyncio.timeout(10):
                    await restarted.wait()
            except TimeoutError:
                break
        assert engine.stats().restarts == 1
        with pytest.raises(EngineUnavailable, match="crashed 2 times within 600 s"):
            await anext(engine.generate(EngineRequest("late", "x = ", 2)))
    finally:
        await server.stop(1.0)


async def test_an_engine_that_cannot_start_says_why(settings, tmp_path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + os.urandom(4096))
    broken = dataclasses.replace(settings.engine, model=str(bogus))
    with pytest.raises(ModelError, match=r"could not start: .*broken\.gguf"):
        await start_engine(broken, settings.cache_dir, Metrics())


def test_the_server_exits_non_zero_when_the_engine_cannot_start(tmp_path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + os.urandom(4096))
    env = {**os.environ, "GHOSTPEN_DATABASE": str(tmp_path / "t.db")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ghostpen",
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--engine",
            "llama.cpp",
            "--model",
            str(bogus),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
    )
    assert done.returncode != 0
    assert "could not start" in done.stderr and "broken.gguf" in done.stderr


async def test_weight_repacking_runs_where_a_crash_cannot_take_the_server(settings) -> None:
    """extra_buffer_types crashed llama.cpp on a Xeon with AMX: turned on, it may work (it does on
    AMD EPYC) or kill the engine process; either way this process lives and says which."""
    server = await own_server(settings, extra_buffer_types="true")
    try:
        stub = pb_grpc.CompletionStub(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))
        call = stub.Complete(
            pb.CompleteRequest(request_id="repack", path="a.py", prefix=SOURCE.encode())
        )
        try:
            text = "".join([chunk.text async for chunk in call])
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert "killed by" in error.details()
        else:
            assert text.strip()
    finally:
        await server.stop(1.0)
