"""The recently touched files, as the editor has them and as the server last heard of them.

Each file goes to the server whole once, then as edits with versions. After a reconnect (a new
session on the server) or when the server evicts a file, it goes whole again. Files over the size
limit and binary files are not sent; the editor is told once per file.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ghostpen.proto import ghostpen_pb2 as pb


@dataclass(frozen=True)
class TextEdit:
    """text[start:end] (code points, in the text as it is when this edit applies) becomes `text`."""

    start: int
    end: int
    text: str


@dataclass
class TrackedFile:
    path: str
    language: str
    text: str
    version: int
    server_version: int | None = None  # None: the server does not have it; send it whole
    unsent: list[TextEdit] = field(default_factory=list)  # since server_version
    skipped: str = ""  # why it is not sent, "" when it is
    size: int = 0  # UTF-8 bytes the server holds for it (0 when it is not sent)


class RecentFiles:
    """Most recently touched last; past max_files or max_session_bytes the least recently
    touched drop out, as the server would evict them. `warn` is called once per file that cannot
    be sent."""

    def __init__(
        self,
        max_files: int,
        max_file_bytes: int,
        max_session_bytes: int,
        warn: Callable[[str], None],
    ) -> None:
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.max_session_bytes = max_session_bytes
        self._warn = warn
        self._warned: set[str] = set()
        self._files: OrderedDict[str, TrackedFile] = OrderedDict()

    def get(self, path: str) -> TrackedFile | None:
        return self._files.get(path)

    def __iter__(self) -> Iterator[TrackedFile]:
        return iter(list(self._files.values()))

    def open(self, path: str, language: str, text: str, version: int) -> None:
        self._files[path] = TrackedFile(path, language, text, version)
        self._check_sendable(self._files[path])
        self.touch(path)

    def change(self, path: str, version: int, edits: list[TextEdit]) -> None:
        """Apply the editor's edits, in order; a file not seen before is ignored."""
        tracked = self._files.get(path)
        if tracked is None:
            return
        text = tracked.text
        for edit in edits:
            text = text[: edit.start] + edit.text + text[edit.end :]
        tracked.text, tracked.version = text, version
        tracked.unsent.extend(edits)
        self._check_sendable(tracked)
        self.touch(path)

    def replace(self, path: str, text: str, version: int) -> None:
        """The editor sent the whole text: the server gets it whole too."""
        tracked = self._files.get(path)
        if tracked is None:
            return
        tracked.text, tracked.version = text, version
        self.forget_on_server(path)
        self._check_sendable(tracked)
        self.touch(path)

    def touch(self, path: str) -> None:
        if path in self._files:
            self._files.move_to_end(path)
        self._trim()

    def _trim(self) -> None:
        """Never past the server's limits: a file it would evict would go whole again at every
        update, and be evicted again. The newest file always fits (max_file_bytes is at most
        max_session_bytes)."""
        held = sum(tracked.size for tracked in self._files.values())
        while len(self._files) > 1 and (
            len(self._files) > self.max_files or held > self.max_session_bytes
        ):
            _, dropped = self._files.popitem(last=False)
            held -= dropped.size

    def forget_on_server(self, path: str) -> None:
        """The server no longer has the file (new session, evicted, out of step)."""
        if tracked := self._files.get(path):
            tracked.server_version, tracked.unsent = None, []

    def forget_all_on_server(self) -> None:
        for path in self._files:
            self.forget_on_server(path)

    def limit(self, max_files: int, max_file_bytes: int, max_session_bytes: int) -> None:
        """Adopt the server's limits where they are lower than ours (0: the server sets none)."""
        self.max_files = min(self.max_files, max_files or self.max_files)
        self.max_file_bytes = min(self.max_file_bytes, max_file_bytes or self.max_file_bytes)
        self.max_session_bytes = min(
            self.max_session_bytes, max_session_bytes or self.max_session_bytes
        )
        self._trim()  # by count first: a file about to drop out is not warned about
        for tracked in self._files.values():
            self._check_sendable(tracked)
        self._trim()

    def pending_updates(self) -> list[pb.ClientMessage]:
        """What brings the server up to date, least recently touched first (so the server's own
        eviction order matches ours); marks it sent."""
        messages = []
        for tracked in self._files.values():
            if tracked.skipped or tracked.server_version == tracked.version:
                continue
            update = pb.FileUpdate(path=tracked.path, language=tracked.language)
            update.version = tracked.version
            if tracked.server_version is None:
                update.text = tracked.text.encode("utf-8", "replace")
            else:
                update.base_version = tracked.server_version
                update.edits.edits.extend(
                    pb.Edit(
                        start=edit.start, end=edit.end, text=edit.text.encode("utf-8", "replace")
                    )
                    for edit in tracked.unsent
                )
            tracked.server_version, tracked.unsent = tracked.version, []
            messages.append(pb.ClientMessage(file_update=update))
        return messages

    def _check_sendable(self, tracked: TrackedFile) -> None:
        text = tracked.text  # per keystroke: ASCII (a flag CPython keeps) needs no encoding
        size = len(text) if text.isascii() else len(text.encode("utf-8", "replace"))
        tracked.skipped = _why_not_sent(text, size, self.max_file_bytes)
        tracked.size = 0 if tracked.skipped else size
        if tracked.skipped:
            tracked.server_version, tracked.unsent = None, []
            if tracked.path not in self._warned:
                self._warned.add(tracked.path)
                self._warn(f"ghostpen: not sending {tracked.path}: {tracked.skipped}")


def _why_not_sent(text: str, size: int, max_file_bytes: int) -> str:
    if size > max_file_bytes:
        return f"{size} bytes is over max_file_bytes ({max_file_bytes})"
    if "\0" in text:
        return "it looks binary (it holds NUL characters)"
    return ""
