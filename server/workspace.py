"""A session's recently touched files, their versions, and their chunks (once per version)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from ghostpen.context.chunker import Chunk
from ghostpen.context.languages import language_of
from ghostpen.server.errors import (
    CursorOutOfRange,
    InvalidInput,
    LimitExceeded,
    StaleVersion,
    UnknownFile,
    over_limit,
)
from ghostpen.server.settings import LimitSettings


@dataclass(frozen=True)
class TextEdit:
    start: int  # code points, into the text as it is when this edit applies
    end: int
    text: str


@dataclass(frozen=True)
class FileChange:
    """A file's full text, or edits against the version the client last sent."""

    path: str
    language: str
    version: int
    text: str | None = None
    edits: tuple[TextEdit, ...] = ()
    base_version: int = 0


@dataclass
class WorkspaceFile:
    path: str
    language: str
    version: int
    text: str
    # This version's chunks once the chunker has them; until then an earlier version's.
    _chunks: tuple[Chunk, ...] | None = field(default=None, repr=False)
    _earlier: tuple[Chunk, ...] = field(default=(), repr=False)

    def chunks(self) -> tuple[Chunk, ...]:
        return self._earlier if self._chunks is None else self._chunks

    @property
    def chunked(self) -> bool:
        return self._chunks is not None

    def set_chunks(self, chunks: tuple[Chunk, ...]) -> None:
        self._chunks, self._earlier = chunks, ()

    def edited(self, version: int, edits: tuple[TextEdit, ...]) -> WorkspaceFile:
        """The next version; raises InvalidInput for an edit outside the text."""
        text = self.text
        for edit in edits:
            if not 0 <= edit.start <= edit.end <= len(text):
                raise InvalidInput(
                    f"edit range {edit.start}..{edit.end} is outside {self.path!r} "
                    f"({len(text)} code points)"
                )
            text = text[: edit.start] + edit.text + text[edit.end :]
        return WorkspaceFile(self.path, self.language, version, text, _earlier=self.chunks())


def check_size(path: str, text: str, limits: LimitSettings) -> int:
    """The text's size in UTF-8 bytes, which max_file_bytes bounds. Per keystroke, on the loop:
    ASCII (a flag CPython keeps) needs no encoding."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if size > limits.max_file_bytes:
        raise LimitExceeded(
            over_limit(f"file {path!r} is {size} bytes", "max_file_bytes", limits.max_file_bytes)
        )
    return size


def check_cursor(path: str, text: str, cursor: int) -> None:
    if cursor > len(text):
        raise CursorOutOfRange(
            f"cursor offset {cursor} is outside {path!r}, which has {len(text)} code points"
        )


class Workspace:
    """Most recently touched first; past max_files or max_session_bytes the least recently
    touched files are dropped."""

    def __init__(self, limits: LimitSettings) -> None:
        self._limits = limits
        self._files: OrderedDict[str, WorkspaceFile] = OrderedDict()
        self._sizes: dict[str, int] = {}  # UTF-8 bytes of each held file's text
        self.bytes = 0  # their sum

    def apply(self, change: FileChange) -> list[str]:
        """Store the change; returns the paths evicted to make room."""
        held = self._files.get(change.path)
        if held is not None and change.version <= held.version:
            raise StaleVersion(
                f"version {change.version} of {change.path!r} is not newer than the held "
                f"version {held.version}"
            )
        if change.text is not None:
            language = language_of(change.path, change.language or (held.language if held else ""))
            earlier = held.chunks() if held is not None else ()
            updated = WorkspaceFile(
                change.path, language, change.version, change.text, _earlier=earlier
            )
        else:
            updated = self._edited(held, change)
        size = check_size(change.path, updated.text, self._limits)
        self.bytes += size - self._sizes.get(change.path, 0)
        self._files[change.path], self._sizes[change.path] = updated, size
        self._files.move_to_end(change.path, last=False)
        evicted = []
        # max_file_bytes <= max_session_bytes: the file just stored always stays.
        while (
            len(self._files) > self._limits.max_files or self.bytes > self._limits.max_session_bytes
        ):
            path, _ = self._files.popitem(last=True)
            self.bytes -= self._sizes.pop(path)
            evicted.append(path)
        return evicted

    def get(self, path: str, version: int) -> WorkspaceFile:
        held = self._files.get(path)
        if held is None:
            raise UnknownFile(
                f"the session holds no file {path!r} ({len(self._files)} held, "
                f"max_files={self._limits.max_files}, "
                f"max_session_bytes={self._limits.max_session_bytes}); send its full text first"
            )
        if version != held.version:
            raise StaleVersion(
                f"request is for version {version} of {path!r} but the session holds version "
                f"{held.version}"
            )
        return held

    def chunks(self) -> list[Chunk]:
        """Every held file's chunks, most recently touched file first. A file being edited
        contributes the chunks of the version last chunked (a few keystrokes old), and one never
        chunked contributes none yet: a request never waits for a parse."""
        return [chunk for held in self._files.values() for chunk in held.chunks()]

    def unchunked(self) -> list[WorkspaceFile]:
        """The held versions that have no chunks of their own yet, most recently touched first."""
        return [held for held in self._files.values() if not held.chunked]

    def _edited(self, held: WorkspaceFile | None, change: FileChange) -> WorkspaceFile:
        if held is None:
            raise UnknownFile(
                f"edits for {change.path!r}, which the session does not hold; send its full text"
            )
        if change.base_version != held.version:
            raise StaleVersion(
                f"edits to {change.path!r} are based on version {change.base_version} but the "
                f"session holds version {held.version}; send the full text"
            )
        if len(change.edits) > self._limits.max_edits_per_update:
            raise LimitExceeded(
                over_limit(
                    f"{len(change.edits)} edits in one update",
                    "max_edits_per_update",
                    self._limits.max_edits_per_update,
                )
            )
        return held.edited(change.version, change.edits)
