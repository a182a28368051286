"""The stateless Complete call: the document and its context files arrive with each request."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

from ghostpen.context.chunker import Chunk, chunk_file
from ghostpen.context.languages import language_of
from ghostpen.context.prompt import Document
from ghostpen.server.completion import Completer, CompletionJob, RequestSpec
from ghostpen.server.errors import DeadlinePassed
from ghostpen.server.identity import Identity


@dataclass(frozen=True)
class InlineFile:
    path: str
    language: str  # as the client named it; "": guessed from the path
    text: str


@dataclass(frozen=True)
class InlineRequest:
    spec: RequestSpec
    repo: str
    document: InlineFile
    cursor: int  # code points into document.text
    context: tuple[InlineFile, ...]


class ChunkCache:
    """Chunks of inline files, keyed by content, least recent out: an editor sends the same
    context files with every keystroke."""

    def __init__(self, chunk_max_lines: int, capacity: int = 256) -> None:
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


class InlineCompletions:
    def __init__(self, completer: Completer) -> None:
        self._completer = completer
        self._cache = ChunkCache(completer.context_settings.chunk_max_lines)

    def job(self, request: InlineRequest, owner: Identity) -> CompletionJob:
        """DeadlinePassed before any chunking if the request's time is already spent."""
        spec = request.spec
        late = time.monotonic() - (spec.received + spec.deadline_s)
        if late >= 0:
            raise DeadlinePassed(
                f"the deadline passed {late * 1000:.0f} ms before the context was read; "
                "it was dropped"
            )
        chunks = [
            chunk
            for item in request.context
            for chunk in self._cache.chunks(
                item.path, language_of(item.path, item.language), item.text
            )
        ]
        file = request.document
        document = Document(
            file.path, language_of(file.path, file.language), file.text, request.cursor
        )
        return self._completer.job(request.spec, document, chunks, request.repo, owner)
