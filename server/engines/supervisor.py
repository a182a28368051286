"""An engine run in a child process and restarted when it dies, as vLLM runs its engine core.

    engine = await SupervisedEngine.start(settings, cache_dir, metrics)
    engine.watch(lambda serving: print("serving" if serving else "down"))

The server keeps the gRPC side, the sessions and the context pipeline; the child holds the model,
its KV cache and its scheduler (`worker.py`). A crash below Python (SIGSEGV from a CPU feature, the
OOM killer) ends the child only: requests in flight end with UNAVAILABLE naming the signal,
listeners hear "not serving", and the child is started again after a backoff that doubles with
each crash. `crash_loop_restarts` crashes within `crash_loop_window_s` stop the restarts: the
engine stays down and says why. A child that cannot start the first time raises ModelError, so the
server exits saying why instead of serving nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ghostpen.server.engines import ipc
from ghostpen.server.engines.base import Engine, EngineDelta, EngineRequest, EngineStats
from ghostpen.server.errors import EngineUnavailable, GhostpenError, ModelError
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import EngineSettings

log = logging.getLogger(__name__)


class SupervisedEngine(Engine):
    def __init__(self, settings: EngineSettings, cache_dir: Path, metrics: Metrics) -> None:
        self._settings = settings
        self._cache_dir = cache_dir
        self._metrics = metrics
        self.name = settings.engine
        self.model_id = settings.model
        self.pid = 0  # the engine process
        self.restarts = 0
        self._ids = itertools.count()
        self._streams: dict[str, asyncio.Queue[EngineDelta | GhostpenError]] = {}
        self._wire_ids: dict[str, str] = {}  # request id -> the id on the socket (unique)
        self._writer: asyncio.StreamWriter | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._down = "it is starting"  # why requests are refused while not serving
        self._crashes: deque[float] = deque()
        self._stats = EngineStats()
        self._stats_waiters: list[asyncio.Future[None]] = []
        self._closing = False

    @classmethod
    async def start(
        cls, settings: EngineSettings, cache_dir: Path, metrics: Metrics
    ) -> SupervisedEngine:
        engine = cls(settings, cache_dir, metrics)
        await engine._spawn()
        return engine

    @property
    def serving(self) -> bool:
        return self._writer is not None

    def watch(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        writer = self._writer
        if writer is None:
            raise EngineUnavailable(f"the {self.name} engine is not serving: {self._down}")
        wire_id = str(next(self._ids))
        deltas: asyncio.Queue[EngineDelta | GhostpenError] = asyncio.Queue()
        self._streams[wire_id] = deltas
        self._wire_ids[request.request_id] = wire_id
        writer.write(ipc.frame(ipc.Generate(dataclasses.replace(request, request_id=wire_id))))
        finished = False
        try:
            while not finished:
                item = await deltas.get()
                if isinstance(item, GhostpenError):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(wire_id, None)
            if self._wire_ids.get(request.request_id) == wire_id:
                del self._wire_ids[request.request_id]
            if not finished and writer is self._writer:  # the consumer left: stop the work
                writer.write(ipc.frame(ipc.Abort(wire_id)))

    async def abort(self, request_id: str) -> None:
        wire_id = self._wire_ids.get(request_id)
        if wire_id is not None and self._writer is not None:
            self._writer.write(ipc.frame(ipc.Abort(wire_id)))

    def stats(self) -> EngineStats:
        """As the engine process last reported it (every worker.STATS_INTERVAL_S when changed)."""
        return dataclasses.replace(self._stats, restarts=self.restarts)

    async def fresh_stats(self, timeout_s: float = 10.0) -> EngineStats:
        """Asked of the engine process now."""
        if self._writer is None:
            raise EngineUnavailable(f"the {self.name} engine is not serving: {self._down}")
        reported = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(reported)
        self._writer.write(ipc.frame(ipc.StatsRequest()))
        await asyncio.wait_for(reported, timeout_s)
        return self.stats()

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._writer.close()  # the child closes its engine and exits
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), self._settings.engine_stop_timeout_s)
            except TimeoutError:
                log.warning("the engine process %d did not exit; killing it", process.pid)
                process.kill()
                await process.wait()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def _spawn(self) -> None:
        """Start a child and wait until its engine is ready; ModelError if it cannot start."""
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ghostpen.server.engines.worker",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(ipc.frame(ipc.WorkerConfig(self._settings, self._cache_dir)))
        timeout = self._settings.engine_start_timeout_s
        try:
            first = await asyncio.wait_for(ipc.receive(reader), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            code = await process.wait()
            raise ModelError(f"the engine process died while starting ({_death(code)})") from None
        except TimeoutError:
            writer.close()
            process.kill()
            await process.wait()
            raise ModelError(
                f"the engine did not start within engine_start_timeout_s={timeout:g}"
            ) from None
        if isinstance(first, ipc.StartFailed):
            writer.close()
            await process.wait()
            raise ModelError(f"the {self._settings.engine} engine could not start: {first.reason}")
        assert isinstance(first, ipc.Ready)
        self.name, self.model_id, self.pid = first.name, first.model_id, first.pid
        self._process, self._writer = process, writer
        self._watcher = asyncio.create_task(self._watch(reader, writer, process))
        self._tell(True)

    async def _watch(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        process: asyncio.subprocess.Process,
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                self._dispatch(await ipc.receive(reader))
        writer.close()
        code = await process.wait()
        if self._closing:
            return
        self._writer = None
        reason = f"the engine process {process.pid} died ({_death(code)})"
        log.error("%s; %d request(s) in flight fail", reason, len(self._streams))
        for deltas in self._streams.values():
            deltas.put_nowait(EngineUnavailable(f"{reason}; it is being restarted"))
        self._streams.clear()
        self._wire_ids.clear()
        self._down = f"{reason}; it is being restarted"
        self._tell(False)
        await self._restart(reason)

    def _dispatch(self, message: object) -> None:
        if isinstance(message, ipc.Delta):
            self._metrics.engine_ipc_seconds.observe(time.monotonic() - message.sent)
            deltas = self._streams.get(message.request_id)
            if deltas is not None:
                deltas.put_nowait(message.delta)
        elif isinstance(message, ipc.Failed):
            deltas = self._streams.get(message.request_id)
            if deltas is not None:
                deltas.put_nowait(message.error)
        elif isinstance(message, ipc.Stats):
            self._stats = message.stats
            for waiter in self._stats_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._stats_waiters.clear()

    async def _restart(self, reason: str) -> None:
        settings = self._settings
        while not self._closing:
            now = time.monotonic()
            self._crashes.append(now)
            while self._crashes[0] < now - settings.crash_loop_window_s:
                self._crashes.popleft()
            if len(self._crashes) >= settings.crash_loop_restarts:
                self._down = (
                    f"{reason}; it crashed {len(self._crashes)} times within "
                    f"{settings.crash_loop_window_s:g} s (settings crash_loop_restarts, "
                    "crash_loop_window_s), so it is not restarted again: see the server log"
                )
                log.error("engine crash loop: %s", self._down)
                return
            delay = min(
                settings.restart_backoff_s * 2 ** (len(self._crashes) - 1),
                settings.restart_backoff_max_s,
            )
            log.warning("restarting the engine in %.2f s", delay)
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except ModelError as error:
                reason = str(error)
                self._down = f"{reason}; it is being restarted"
                continue
            self.restarts += 1
            log.warning("engine restarted (process %d)", self.pid)
            return

    def _tell(self, serving: bool) -> None:
        for listener in self._listeners:
            listener(serving)


def _death(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"killed by {name}, signal {-returncode}"
    return f"exit status {returncode}"
