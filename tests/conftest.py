"""Shared fixtures: the real server with the real llama.cpp engine and the default model; the test
tiers.

Tiers: a test is `system` when it needs the real model, a real engine, root or Debian packages
(PostgreSQL, Prometheus, Chromium, Neovim) or builds something. `pytest -m "not system"` is the
fast tier: no root, no apt, no model, under a minute. The fixtures below that need any of those
mark the tests that use them; the few tests that need them without such a fixture carry the mark
themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
import uvloop

from ghostpen.editor_client import session_stream
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.app import RunningServer, start_server
from ghostpen.server.engines.base import EngineStats
from ghostpen.server.engines.factory import start_engine
from ghostpen.server.metrics import Metrics
from ghostpen.server.model_store import REGISTRY, models_dir
from ghostpen.server.settings import Settings
from tests.lora_adapter import build_gguf_lora

SYSTEM_FIXTURES = {
    "settings",  # the default model and an adapter built from it
    "server",
    "channel",
    "stub",
    "engine",
    "two_sequences",
    "shifting",
    "vllm_engine",
    "crashable",
    "session",
    "isolated",
    "agent",
    "served",
    "editor",
    "wheel",
    "installed",
    "upstream_servers",  # llama.cpp's own servers
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())) or (
            "postgresql" in params.values()
        ):
            item.add_marker(pytest.mark.system)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """Tests run on uvloop, as the server does."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The defaults on the default model, with one small LoRA adapter loaded: "seeded"."""
    database = tmp_path_factory.mktemp("telemetry") / "telemetry.db"
    settings = Settings.load(
        {
            "port": "0",
            "metrics_port": "0",
            "engine": "llama.cpp",
            "database": str(database),
            "tokens_file": str(database.parent / "tokens.json"),  # not the developer's own
        }
    )
    base = models_dir(settings.cache_dir) / REGISTRY[settings.engine.model].filename
    adapter = build_gguf_lora(base, settings.cache_dir / "test-models" / "lora-seeded.gguf")
    engine = dataclasses.replace(settings.engine, lora_adapters=f"seeded={adapter}")
    return dataclasses.replace(settings, engine=engine)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    metrics = Metrics()
    engine = await start_engine(settings.engine, settings.cache_dir, metrics)
    running = await start_server(settings, engine, metrics)
    yield running
    await running.stop(1.0)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as open_channel:
        yield open_channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.CompletionStub:
    return pb_grpc.CompletionStub(channel)


async def engine_idle(engine, timeout_s: float = 30) -> EngineStats:
    """The engine's counters once it runs and holds nothing (asked of its process, not cached)."""
    async with asyncio.timeout(timeout_s):
        while True:
            stats = await engine.fresh_stats()
            if not stats.running and not stats.waiting:
                return stats
            await asyncio.sleep(0.01)


class SessionStream(session_stream.SessionStream):
    """The editor's stream, with shortcuts for tests."""

    def send(self, message: pb.ClientMessage | None = None, **kind: object) -> None:
        super().send(message or pb.ClientMessage(**kind))

    async def read(self, timeout: float | None = 60) -> pb.ServerMessage:
        return await super().read(timeout)

    async def open_file(self, path: str, text: str | bytes, version: int = 1) -> pb.ServerMessage:
        data = text.encode() if isinstance(text, str) else text
        self.send(file_update=pb.FileUpdate(path=path, version=version, text=data))
        return await self.read()

    async def complete(self, **request: object) -> tuple[str, pb.ServerMessage]:
        """Send a request and collect its text until its terminal message."""
        self.send(completion_request=pb.CompletionRequest(**request))
        return await self.collect(str(request["request_id"]))

    async def collect(self, request_id: str) -> tuple[str, pb.ServerMessage]:
        text = ""
        while True:
            message = await self.read()
            if message.HasField("chunk") and message.chunk.request_id == request_id:
                text += message.chunk.text
                if message.chunk.final:
                    return text, message
            elif message.HasField("error") and message.error.request_id == request_id:
                return text, message
