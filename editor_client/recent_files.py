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


class RecentFiles:
    """Most recently touched last. `warn` is called once per file that cannot be sent."""

    def __init__(self, max_files: int, max_file_bytes: int, warn: Callable[[str], None]) -> None:
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self._warn = warn
        self._warned: set[str] = set()
        self._files: OrderedDict[str, TrackedFile] = OrderedDict()

    def get(self, path: str) -> TrackedFile | None:
        return self._files.get(path)

    def __iter__(self) -> Iterator[TrackedFile]:
        return iter(list(self._files.values()))

    def open(self, path: str, language: str, text: str, version: int) -> None:
        self._files[path] = TrackedFile(path, language, text, version)
        self.touch(path)
        self._check_sendable(self._files[path])

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
        self.touch(path)
        self._check_sendable(tracked)

    def replace(self, path: str, text: str, version: int) -> None:
        """The editor sent the whole text: the server gets it whole too."""
        tracked = self._files.get(path)
        if tracked is None:
            return
        tracked.text, tracked.version = text, version
        self.forget_on_server(path)
        self.touch(path)
        self._check_sendable(tracked)

    def touch(self, path: str) -> None:
        if path in self._files:
            self._files.move_to_end(path)
        self._trim()

    def _trim(self) -> None:
        while len(self._files) > self.max_files:
            self._files.popitem(last=False)

    def forget_on_server(self, path: str) -> None:
        """The server no longer has the file (new session, evicted, out of step)."""
        if tracked := self._files.get(path):
            tracked.server_version, tracked.unsent = None, []

    def forget_all_on_server(self) -> None:
        for path in self._files:
            self.forget_on_server(path)

    def limit(self, max_files: int, max_file_bytes: int) -> None:
        """Adopt the server's limits where they are lower than ours."""
        self.max_files = min(self.max_files, max_files)
        self.max_file_bytes = min(self.max_file_bytes, max_file_bytes)
        self._trim()
        for tracked in self._files.values():
            self._check_sendable(tracked)

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
        tracked.skipped = _why_not_sent(tracked.text, self.max_file_bytes)
        if tracked.skipped:
            tracked.server_version, tracked.unsent = None, []
            if tracked.path not in self._warned:
                self._warned.add(tracked.path)
                self._warn(f"ghostpen: not sending {tracked.path}: {tracked.skipped}")


def _why_not_sent(text: str, max_file_bytes: int) -> str:
    # UTF-8 takes 1-4 bytes a code point: encode only when the length alone cannot tell.
    size = len(text) if len(text) * 4 <= max_file_bytes else len(text.encode("utf-8", "replace"))
    if size > max_file_bytes:
        return f"{size} bytes is over max_file_bytes ({max_file_bytes})"
    if "\0" in text:
        return "it looks binary (it holds NUL characters)"
    return ""
