"""The context pipeline of stateless Complete calls, in a child process.

A Complete call may carry `max_context_files` files of `max_file_bytes` each. Chunking them
(~0.3 s a megabyte) and ranking their chunks on the event loop would stall every other client for
seconds; in a thread it would too. The child (server/child_process.py) does that work and the loop
only pickles the request and the prompt. The child keeps the chunk cache: editors send the same
context files with every keystroke.

    context = ContextProcess(settings.context, template)
    prompt = await context.prompt(repo, document, files)
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ghostpen.context.chunker import Chunk, chunk_file
from ghostpen.context.languages import language_of
from ghostpen.context.prompt import Document, Prompt, build_prompt
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import Template
from ghostpen.server.child_process import ChildProcess
from ghostpen.server.errors import DeadlinePassed

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
        self._child = ChildProcess(
            "context process", "reading this request's files", _set_up, (settings, template)
        )

    async def prompt(
        self, repo: str, document: Document, files: Sequence[InlineFile], deadline: float
    ) -> Prompt:
        """The prompt for `document`, with chunks of `files` ranked into it, built in the child.
        Past `deadline` (time.monotonic, which is the same clock in the child) the child stops
        between files: a call its caller gave up on does not hold up the next ones for long."""
        return await self._child.call(_prompt, repo, document, tuple(files), deadline)

    def pid(self) -> int | None:
        return self._child.pid()

    async def close(self) -> None:
        await self._child.close()


# In the child.
_settings: ContextSettings | None = None
_template: Template | None = None
_cache: ChunkCache | None = None


def _set_up(settings: ContextSettings, template: Template) -> None:
    global _settings, _template, _cache
    _settings, _template = settings, template
    _cache = ChunkCache(settings.chunk_max_lines)


def _prompt(
    repo: str, document: Document, files: tuple[InlineFile, ...], deadline: float
) -> Prompt:
    assert _settings is not None and _template is not None and _cache is not None
    chunks: list[Chunk] = []
    for item in files:
        if time.monotonic() > deadline:
            raise DeadlinePassed("the deadline passed while the context files were read")
        chunks.extend(_cache.chunks(item.path, language_of(item.path, item.language), item.text))
    return build_prompt(repo, document, chunks, _template, _settings)
