"""The telemetry database in a child process of its own.

SQLite memory-maps its WAL index (the `-shm` file); a fault on that file is a SIGBUS, which in
the serving process would take the whole server down, engine and sessions included. In a child it
takes down only the child: the calls in flight fail with StoreUnavailable, the next call starts a
new child, and `up` says whether the last call succeeded (health follows it). PostgreSQL runs the
same way, so there is one code path.

    store = StoreProcess("writer", database, cache_dir, probe_s=1.0)
    await store.start()                        # opens and migrates, or raises StoreUnavailable
    await store.call(Store.write, completions, events)   # Store.write(store, ...) in the child
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from ghostpen.server.errors import StoreUnavailable
from ghostpen.server.telemetry.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_CODE_POLLS, EXIT_CODE_POLL_S = 50, 0.01  # a dead child's exit code, waited for this long
_store: Store | None = None  # in the child: its one connection
_location: tuple[str, Path] = ("", Path())


class StoreProcess:
    def __init__(self, name: str, database: str, cache_dir: Path, probe_s: float) -> None:
        self.name = name
        self._location = (database, cache_dir)
        self._probe_s = probe_s
        self._pool: ProcessPoolExecutor | None = None
        self._death: tuple[ProcessPoolExecutor, str] | None = None  # the last pool that died
        self._listeners: list[Callable[[bool], None]] = []
        self._probe: asyncio.Task[None] | None = None
        self.up = True

    async def start(self) -> None:
        await self.call(_ping)

    def watch(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(up)` when calls start failing or succeed again."""
        self._listeners.append(listener)

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """`function(store, *args)` in the child. `function` and what it returns must pickle."""
        pool = self._pool or self._new_pool()
        try:
            result = await asyncio.wrap_future(pool.submit(_run, function, args))
        except BrokenProcessPool as exc:
            cause = await self._died(pool)
            self._set_up(False)
            raise StoreUnavailable(
                f"the telemetry {self.name} process died ({cause}); it is started again at the "
                "next call: retry"
            ) from exc
        except StoreUnavailable:
            self._set_up(False)
            raise
        self._set_up(True)
        return result

    def pid(self) -> int | None:
        """The child's process id, once started (for tests that kill it)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server has threads (grpc, the engine's pipes) a fork would copy.
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_locate,
            initargs=self._location,
        )
        return self._pool

    async def _died(self, pool: ProcessPoolExecutor) -> str:
        """What ended the child, and forget the broken pool (the next call starts a new one).
        Every call in flight asks; the first one reads the cause (the pool forgets its
        processes once shut down) and the others get the same. The pool's own thread may be
        reaping the child meanwhile: its exit code is waited for, briefly."""
        if self._death is not None and self._death[0] is pool:
            return self._death[1]
        processes = list((getattr(pool, "_processes", None) or {}).values())
        codes: list[int] = []
        for _ in range(EXIT_CODE_POLLS):
            codes = [p.exitcode for p in processes if p.exitcode is not None]
            if codes or not processes:
                break
            await asyncio.sleep(EXIT_CODE_POLL_S)
        if self._death is not None and self._death[0] is pool:  # decided meanwhile
            return self._death[1]
        if codes and codes[0] < 0:
            cause = f"killed by {signal.Signals(-codes[0]).name}"
        else:
            cause = f"exit code {codes[0]}" if codes else "it stopped answering"
        self._death = (pool, cause)
        if self._pool is pool:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
        return cause

    def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        log.warning("telemetry %s store %s", self.name, "back" if up else "down")
        for listener in self._listeners:
            listener(up)
        if not up and self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._until_up())

    async def _until_up(self) -> None:
        """While down, try every probe_s, so that health recovers without traffic."""
        try:
            while not self.up:
                await asyncio.sleep(self._probe_s)
                with contextlib.suppress(StoreUnavailable):
                    await self.call(_ping)
        finally:
            self._probe = None


def _locate(database: str, cache_dir: Path) -> None:
    global _location
    _location = (database, cache_dir)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops the child, not a Ctrl-C
    threading.Thread(target=_exit_with_parent, daemon=True).start()


def _exit_with_parent() -> None:
    """A server killed with SIGKILL cannot stop its child: the child stops itself, instead of
    holding the database open forever."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)


def _run(function: Callable[..., T], args: tuple[Any, ...]) -> T:
    global _store
    if _store is None:
        database, cache_dir = _location
        try:
            _store = Store.open(database, cache_dir)
        except Exception as exc:
            raise StoreUnavailable(
                f"cannot open the telemetry database {database or cache_dir / 'telemetry.db'}: "
                f"{exc}"
            ) from None
    try:
        return function(_store, *args)
    except StoreUnavailable:
        with contextlib.suppress(Exception):  # a failed connection may stay failed: reopen
            _store.close()
        _store = None
        raise


def _ping(store: Store) -> None:
    store.ping()
