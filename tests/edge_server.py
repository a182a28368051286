"""A real gRPC server around a scripted engine and a real SQLite store, for tests about the code
around the engine: the servicer's edge, its limits, its drain."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.app import RunningServer, start_server
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import Settings
from tests.scripted_engine import ScriptedEngine


@dataclass
class Edge:
    engine: ScriptedEngine
    channel: grpc.aio.Channel
    stub: pb_grpc.CompletionStub
    database: str
    metrics: Metrics
    running: RunningServer
    settings: Settings

    def break_store(self) -> None:
        """What a failed disk or a lost schema looks like to the server: its SQL fails."""
        self._rename(("events", "events_away"), ("completions", "completions_away"))

    def heal_store(self) -> None:
        self._rename(("completions_away", "completions"), ("events_away", "events"))

    def _rename(self, *pairs: tuple[str, str]) -> None:
        with sqlite3.connect(self.database) as db:
            for old, new in pairs:
                db.execute(f"ALTER TABLE {old} RENAME TO {new}")

    def rows(self, sql: str, *parameters: object) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self.database)) as db:
            return db.execute(sql, parameters).fetchall()

    async def health(self) -> int:
        health = health_pb2_grpc.HealthStub(self.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        return reply.status

    def errors(self, rpc: str, code: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "ghostpen_errors_total", {"rpc": rpc, "code": code}
        )


@contextlib.asynccontextmanager
async def edge_server(tmp_path: Path, **overrides: str) -> AsyncIterator[Edge]:
    database = str(tmp_path / "telemetry.db")
    settings = Settings.load(
        {
            "port": "0",
            "metrics_port": "-1",
            "database": database,
            "record_commit_wait_ms": "30000",  # a slow disk must not make these tests flaky
            "retry_s": "0.05",
            "store_probe_s": "0.05",
            "tokens_file": str(tmp_path / "tokens.json"),  # not the developer's own
            **overrides,
        }
    )
    metrics = Metrics()
    engine = ScriptedEngine("total()\n")
    running = await start_server(settings, engine, metrics)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.CompletionStub(channel)
            yield Edge(engine, channel, stub, database, metrics, running, settings)
    finally:
        await running.stop(1.0)


def event(completion_id: str) -> pb.TelemetryEvent:
    return pb.TelemetryEvent(
        event_id=uuid.uuid4().hex, completion_id=completion_id, shown=pb.Shown()
    )


async def until(probe, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await probe():
            await asyncio.sleep(0.02)
