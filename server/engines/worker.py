"""The engine process: runs one engine and serves it to the server over the socket it was given.

    python -m ghostpen.server.engines.worker FD    (started by supervisor.py, never by hand)

A crash in here (a CPU feature llama.cpp trips on, out of memory) ends this process only; the
server sees the socket close, fails what was in flight and starts another. When the server goes,
the socket closes and this process closes its engine and exits; a Ctrl-C is the server's to handle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from contextlib import aclosing

from ghostpen.server.engines import ipc
from ghostpen.server.engines.base import Engine, EngineDelta, EngineRequest
from ghostpen.server.engines.factory import start_in_process
from ghostpen.server.errors import EngineFailure, GhostpenError

log = logging.getLogger("ghostpen.engine")
STATS_INTERVAL_S = 0.5


async def main(fd: int) -> int:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    config = await ipc.receive(reader)
    assert isinstance(config, ipc.WorkerConfig)
    try:
        engine = await start_in_process(config.settings, config.cache_dir)
    except Exception as exc:
        writer.write(ipc.frame(ipc.StartFailed(str(exc) or type(exc).__name__)))
        await writer.drain()
        return 1
    writer.write(ipc.frame(ipc.Ready(engine.name, engine.model_id, os.getpid())))
    served: dict[str, asyncio.Task[None]] = {}
    reporter = asyncio.create_task(_report_stats(engine, writer))
    try:
        while True:
            try:
                message = await ipc.receive(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the server has gone
            if isinstance(message, ipc.Generate):
                request_id = message.request.request_id
                task = asyncio.create_task(_serve(engine, message.request, writer))
                served[request_id] = task
                task.add_done_callback(lambda _, key=request_id: served.pop(key, None))
            elif isinstance(message, ipc.Abort) and message.request_id in served:
                served[message.request_id].cancel()
            elif isinstance(message, ipc.StatsRequest):
                writer.write(ipc.frame(ipc.Stats(engine.stats())))
    finally:
        reporter.cancel()
        for task in served.values():
            task.cancel()
        await engine.close()
    return 0


async def _serve(engine: Engine, request: EngineRequest, writer: asyncio.StreamWriter) -> None:
    request_id = request.request_id
    try:
        async with aclosing(engine.generate(request)) as deltas:
            async for delta in deltas:
                writer.write(ipc.frame(ipc.Delta(request_id, delta, time.monotonic())))
    except asyncio.CancelledError:  # aborted by the server: the engine stopped; say so
        final = EngineDelta("", 0, 0, 0.0, finished=True, aborted=True)
        writer.write(ipc.frame(ipc.Delta(request_id, final, time.monotonic())))
    except GhostpenError as error:
        writer.write(ipc.frame(ipc.Failed(request_id, error)))
    except Exception as exc:
        log.exception("request %s failed in the engine", request_id)
        writer.write(ipc.frame(ipc.Failed(request_id, EngineFailure(f"{engine.name}: {exc}"))))


async def _report_stats(engine: Engine, writer: asyncio.StreamWriter) -> None:
    last = None
    while True:
        stats = engine.stats()
        if stats != last:
            writer.write(ipc.frame(ipc.Stats(stats)))
            last = stats
        await asyncio.sleep(STATS_INTERVAL_S)


if __name__ == "__main__":
    import uvloop

    logging.basicConfig(level=logging.INFO, format="engine %(levelname)s %(name)s: %(message)s")
    # A Ctrl-C reaches the whole process group; the server drains, then closes this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(uvloop.run(main(int(sys.argv[1]))))
