"""A worker process for CPU-heavy work the event loop must not do: started at the first call,
started again at the next call after it dies.

Tree-sitter holds the GIL while it parses and the chunker's Python runs between its callbacks,
so in a thread of the server's own process either stalls the loop; in a child it costs the loop
only the pickling. A child that dies (a parser crash on hostile input) costs the calls in flight
an InternalError; the next call starts another.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from ghostpen.server.errors import InternalError

T = TypeVar("T")
# Added to the child's niceness: on a busy machine the event loop and the engine, which a user
# waits on, get the CPU before chunking, which can lag a few keystrokes behind.
CHILD_NICENESS = 5


class ChildProcess:
    def __init__(
        self, name: str, what: str, initializer: Callable[..., None], initargs: tuple
    ) -> None:
        """`name` and `what` name the process and its work in errors ("the context process died
        while reading this request's files")."""
        self._name, self._what = name, what
        self._setup = (initializer, initargs)
        self._pool: ProcessPoolExecutor | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the child; calls run one at a time, in the order made."""
        pool, future = self._submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            self._forget(pool)
            raise InternalError(
                f"the {self._name} died while {self._what}; it is started again at the next call"
            ) from exc

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """fn(*args) in the child, after the calls made before; nobody waits for it, and
        nothing is started for it: with no child there is nothing for it to act on."""
        if self._pool is not None:
            try:
                self._pool.submit(fn, *args)
            except BrokenProcessPool:
                self._forget(self._pool)

    def pid(self) -> int | None:
        """The child's process id, once started (for tests that kill it)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    def _submit(self, fn: Callable[..., T], *args: Any) -> tuple[ProcessPoolExecutor, Future[T]]:
        pool = self._pool or self._new_pool()
        try:
            return pool, pool.submit(fn, *args)
        except BrokenProcessPool:  # it died between calls: this call lost nothing
            self._forget(pool)
            pool = self._new_pool()
            return pool, pool.submit(fn, *args)

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server has threads (grpc, the engine's pipes) a fork would copy.
        initializer, initargs = self._setup
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(initializer, *initargs),
        )
        return self._pool


def _start(initializer: Callable[..., None], *initargs: Any) -> None:
    """In the child, before its first call. A Ctrl-C reaches the whole process group: the
    server decides when its children stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(CHILD_NICENESS)
    initializer(*initargs)
