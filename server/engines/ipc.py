"""The messages between the server and its engine process, and how they travel.

Small frozen dataclasses, pickled, each behind a 4-byte length, over a Unix socket pair. Both ends
are ghostpen's own code (the server starts the engine process and hands it the socket), so pickle
is safe here; it costs microseconds a message. Nothing else crosses: no model objects, no logits.

    server ── WorkerConfig, Generate, Abort, StatsRequest ──> engine process
    server <── Ready | StartFailed, Delta, Failed, Stats ── engine process
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

from ghostpen.server.engines.base import EngineDelta, EngineRequest, EngineStats
from ghostpen.server.errors import GhostpenError
from ghostpen.server.settings import EngineSettings

_HEADER = struct.Struct("!I")


@dataclass(frozen=True)
class WorkerConfig:
    settings: EngineSettings
    cache_dir: Path


@dataclass(frozen=True)
class Ready:
    name: str
    model_id: str
    pid: int


@dataclass(frozen=True)
class StartFailed:
    reason: str


@dataclass(frozen=True)
class Generate:
    request: EngineRequest


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class StatsRequest:
    pass


@dataclass(frozen=True)
class Delta:
    request_id: str
    delta: EngineDelta
    sent: float  # time.monotonic() in the engine process (system-wide on Linux)


@dataclass(frozen=True)
class Failed:
    request_id: str
    error: GhostpenError


@dataclass(frozen=True)
class Stats:
    stats: EngineStats


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def receive(reader: asyncio.StreamReader) -> object:
    """The next message; asyncio.IncompleteReadError when the other side has gone."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))
