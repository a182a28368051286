"""The context pipeline of stateless Complete calls, in a child process.

A Complete call may carry `max_context_files` files of `max_file_bytes` each. Chunking them
(tree-sitter holds the GIL while it parses, ~0.3 s a megabyte) and ranking their chunks on the
event loop would stall every other client for seconds; in a thread it would too. Here the child
does that work and the loop only pickles the request and the prompt. The child keeps the chunk
cache: editors send the same context files with every keystroke. A child that dies (a parser
crash on hostile input) costs the calls in flight an INTERNAL error; the next call starts another.

    context = ContextProcess(settings.context, template)
    prompt = await context.prompt(repo, document, files)
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from ghostpen.context.chunker import Chunk, chunk_file
from ghostpen.context.languages import language_of
from ghostpen.context.prompt import Document, Prompt, build_prompt
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import Template
from ghostpen.server.errors import InternalError

CACHED_FILES = 256  # chunked context files the child keeps, least recent out


@dataclass(frozen=True)
class InlineFile:
    path: str
    language: str  # as the client named it; "": guessed from the path
    text: str


class ChunkCache:
    """Chunks of inline files, keyed by content, least recent out."""

    def __init__(self, chunk_max_lines: int, capacity: int = CACHED_FILES) -> None:
        self._chunk_max_lines = chunk_max_lines
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, str, bytes], tuple[Chunk, ...]] = OrderedDict()

    def chunks(self, path: str, language: str, text: str) -> tuple[Chunk, ...]:
        key = (path, language, hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest())
        found = self._entries.get(key)
        if found is None:
            found = chunk_file(path, language, text, self._chunk_max_lines).chunks
            self._entries[key] = found
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return found


class ContextProcess:
    def __init__(self, settings: ContextSettings, template: Template) -> None:
        self._setup = (settings, template)
        self._pool: ProcessPoolExecutor | None = None

    async def prompt(self, repo: str, document: Document, files: Sequence[InlineFile]) -> Prompt:
        """The prompt for `document`, with chunks of `files` ranked into it, built in the child."""
        pool = self._pool or self._new_pool()
        try:
            future = pool.submit(_prompt, repo, document, tuple(files))
        except BrokenProcessPool:  # it died between calls: this request lost nothing
            self._forget(pool)
            pool = self._new_pool()
            future = pool.submit(_prompt, repo, document, tuple(files))
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            self._forget(pool)
            raise InternalError(
                "the context process died while reading this request's files; it is started "
                "again at the next call"
            ) from exc

    def pid(self) -> int | None:
        """The child's process id, once started (for tests that kill it)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server has threads (grpc, the engine's pipes) a fork would copy.
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_set_up,
            initargs=self._setup,
        )
        return self._pool


# In the child.
_settings: ContextSettings | None = None
_template: Template | None = None
_cache: ChunkCache | None = None


def _set_up(settings: ContextSettings, template: Template) -> None:
    global _settings, _template, _cache
    _settings, _template = settings, template
    _cache = ChunkCache(settings.chunk_max_lines)


def _prompt(repo: str, document: Document, files: tuple[InlineFile, ...]) -> Prompt:
    assert _settings is not None and _template is not None and _cache is not None
    chunks = [
        chunk
        for item in files
        for chunk in _cache.chunks(item.path, language_of(item.path, item.language), item.text)
    ]
    return build_prompt(repo, document, chunks, _template, _settings)
