"""Session files chunked in a child process, which keeps the tree of each session's file being
edited (context.chunker.IncrementalChunker).

The event loop pickles a file's text there and gets its chunks back in pickled batches, which it
unpickles one at a time with a turn for others between them: a megabyte of Python is ~3,600
chunks, 7 ms to unpickle at once. A session has one file in the child at a time, so sessions take
turns however many files one of them sends.

    chunker = ChunkerProcess(settings.context)
    chunks = await chunker.chunks(session_id, held)
"""

from __future__ import annotations

import asyncio
import pickle

from ghostpen.context.chunker import Chunk, IncrementalChunker
from ghostpen.context.settings import ContextSettings
from ghostpen.server.child_process import ChildProcess
from ghostpen.server.workspace import WorkspaceFile

BATCH_CHUNKS = 256  # chunks unpickled at once on the event loop (~0.5 ms)


class ChunkerProcess:
    def __init__(self, settings: ContextSettings) -> None:
        self._child = ChildProcess(
            "chunker process",
            "chunking a session's files",
            _set_up,
            (settings.chunk_max_lines, settings.max_tree_chars),
        )

    async def chunks(self, session_id: str, held: WorkspaceFile) -> tuple[Chunk, ...]:
        batches = await self._child.call(_chunk, session_id, held.path, held.language, held.text)
        chunks: list[Chunk] = []
        for batch in batches:
            chunks.extend(pickle.loads(batch))
            await asyncio.sleep(0)
        return tuple(chunks)

    def forget(self, session_id: str) -> None:
        """The session is gone: its tree goes too."""
        self._child.post(_forget, session_id)

    def pid(self) -> int | None:
        return self._child.pid()

    async def close(self) -> None:
        await self._child.close()


# In the child.
_chunker: IncrementalChunker | None = None


def _set_up(max_lines: int, max_tree_chars: int) -> None:
    global _chunker
    _chunker = IncrementalChunker(max_lines, max_tree_chars)


def _chunk(session_id: str, path: str, language: str, text: str) -> list[bytes]:
    assert _chunker is not None
    chunks = _chunker.chunk(session_id, path, language, text)
    return [
        pickle.dumps(chunks[start : start + BATCH_CHUNKS])
        for start in range(0, len(chunks), BATCH_CHUNKS)
    ]


def _forget(session_id: str) -> None:
    assert _chunker is not None
    _chunker.forget(session_id)
