import pytest

from ghostpen.context.chunker import IncrementalChunker
from ghostpen.server.context_process import ChunkCache
from ghostpen.server.errors import (
    CursorOutOfRange,
    InvalidInput,
    LimitExceeded,
    StaleVersion,
    UnknownFile,
)
from ghostpen.server.settings import LimitSettings
from ghostpen.server.workspace import FileChange, TextEdit, Workspace, check_cursor

LIMITS = LimitSettings(
    max_files=3, max_file_bytes=100, max_session_bytes=250, max_edits_per_update=2
)


def workspace(limits: LimitSettings = LIMITS) -> Workspace:
    return Workspace(limits)


def chunked(ws: Workspace, chunker: IncrementalChunker | None = None) -> Workspace:
    """What a session's refresh does, in this process: every unchunked version chunked."""
    chunker = chunker or IncrementalChunker(max_lines=4, max_chars=10**6)
    for held in ws.unchunked():
        held.set_chunks(chunker.chunk("s", held.path, held.language, held.text))
    return ws


def test_least_recently_touched_file_is_evicted() -> None:
    ws = workspace()
    for name in ("a.py", "b.py", "c.py"):
        assert ws.apply(FileChange(name, "", 1, text=f"# {name}")) == []
    ws.apply(FileChange("a.py", "", 2, text="# a again"))
    assert ws.apply(FileChange("d.py", "", 1, text="# d")) == ["b.py"]
    with pytest.raises(UnknownFile, match="max_files=3"):
        ws.get("b.py", 1)
    assert [c.path for c in chunked(ws).chunks()] == ["d.py", "a.py", "c.py"]


def test_past_max_session_bytes_the_least_recently_touched_files_are_evicted() -> None:
    ws = workspace()
    ws.apply(FileChange("a.py", "", 1, text="a" * 100))
    ws.apply(FileChange("b.py", "", 1, text="b" * 100))
    ws.apply(FileChange("c.py", "", 1, text="é" * 25))  # 50 bytes: 250 in all, the limit
    assert ws.bytes == 250
    # a.py shrinks by an edit, c.py grows: sizes follow edits and new texts
    assert ws.apply(FileChange("a.py", "", 2, edits=(TextEdit(0, 90, ""),), base_version=1)) == []
    assert ws.apply(FileChange("c.py", "", 2, text="c" * 100)) == []
    assert ws.bytes == 210
    assert ws.apply(FileChange("d.py", "", 1, text="d" * 100)) == ["b.py"]
    assert ws.apply(FileChange("e.py", "", 1, text="e" * 100)) == ["a.py", "c.py"]
    assert ws.bytes == 200
    with pytest.raises(UnknownFile, match="max_session_bytes=250"):
        ws.get("c.py", 2)
    assert [c.path for c in chunked(ws).chunks()] == ["e.py", "d.py"]


def test_a_file_larger_than_a_session_holds_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="max_file_bytes=200 must fit in max_session_bytes=100"):
        LimitSettings(max_file_bytes=200, max_session_bytes=100)


def test_edits_apply_in_order_against_the_base_version() -> None:
    ws = workspace()
    ws.apply(FileChange("a.py", "python", 1, text="hello world"))
    edits = (TextEdit(0, 5, "goodbye"), TextEdit(13, 13, "!"))
    ws.apply(FileChange("a.py", "", 2, edits=edits, base_version=1))
    held = ws.get("a.py", 2)
    assert held.text == "goodbye world!"
    assert held.language == "python"


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (FileChange("a.py", "", 1, text="x"), StaleVersion, "not newer"),
        (
            FileChange("a.py", "", 3, edits=(TextEdit(0, 1, "y"),), base_version=1),
            StaleVersion,
            "based on version 1",
        ),
        (
            FileChange("a.py", "", 3, edits=(TextEdit(5, 99, "y"),), base_version=2),
            InvalidInput,
            "outside",
        ),
        (
            FileChange("a.py", "", 3, edits=(TextEdit(0, 0, "y"),) * 3, base_version=2),
            LimitExceeded,
            "max_edits_per_update=2",
        ),
        (FileChange("a.py", "", 3, text="x" * 101), LimitExceeded, "max_file_bytes=100"),
        (FileChange("new.py", "", 1, edits=(TextEdit(0, 0, "y"),)), UnknownFile, "full text"),
    ],
)
def test_bad_changes_are_refused_and_leave_the_file_as_it_was(change, error, message) -> None:
    ws = workspace()
    ws.apply(FileChange("a.py", "", 2, text="abc"))
    with pytest.raises(error, match=message):
        ws.apply(change)
    assert ws.get("a.py", 2).text == "abc"


def test_requests_must_name_the_held_version() -> None:
    ws = workspace()
    ws.apply(FileChange("a.py", "", 4, text="abc"))
    with pytest.raises(StaleVersion, match="holds version 4"):
        ws.get("a.py", 3)


def test_multibyte_text_counts_bytes_for_the_limit_and_code_points_for_offsets() -> None:
    ws = workspace()
    ws.apply(FileChange("u.py", "", 1, text="é" * 50))  # 100 bytes
    check_cursor("u.py", ws.get("u.py", 1).text, 50)
    with pytest.raises(CursorOutOfRange, match="50 code points"):
        check_cursor("u.py", ws.get("u.py", 1).text, 51)
    with pytest.raises(LimitExceeded):
        ws.apply(FileChange("u.py", "", 2, text="é" * 51))


def test_chunks_are_computed_once_per_version() -> None:
    ws = chunked(workspace())
    ws.apply(FileChange("a.py", "", 1, text="x = 1\n"))
    assert [held.path for held in ws.unchunked()] == ["a.py"]
    first = chunked(ws).chunks()
    assert ws.unchunked() == [] and ws.chunks()[0] is first[0]
    ws.apply(FileChange("a.py", "", 2, text="x = 2\n"))
    assert chunked(ws).chunks()[0].text.strip() == "x = 2"


def test_chunk_cache_reuses_chunks_of_the_same_content() -> None:
    cache = ChunkCache(chunk_max_lines=10, capacity=1)
    first = cache.chunks("a.py", "python", "x = 1\n")
    assert cache.chunks("a.py", "python", "x = 1\n") is first
    cache.chunks("b.py", "python", "y = 1\n")
    assert cache.chunks("a.py", "python", "x = 1\n") is not first


def test_edited_versions_chunk_like_a_fresh_file() -> None:
    ws, chunker = workspace(LimitSettings()), IncrementalChunker(max_lines=4, max_chars=10**6)
    text = "def a():\n    return 1\n\n\ndef b():\n    return 2\n"
    ws.apply(FileChange("a.py", "", 1, text=text))
    chunked(ws, chunker)
    ws.apply(FileChange("a.py", "", 2, edits=(TextEdit(21, 21, "0"),), base_version=1))
    chunked(ws, chunker)
    ws.apply(FileChange("a.py", "", 3, edits=(TextEdit(0, 0, "import os\n"),), base_version=2))
    fresh = workspace(LimitSettings())
    fresh.apply(FileChange("a.py", "", 1, text=ws.get("a.py", 3).text))
    assert chunked(ws, chunker).chunks() == chunked(fresh).chunks()
    assert "return 10" in ws.get("a.py", 3).text


def test_a_version_not_chunked_yet_offers_the_last_chunks() -> None:
    """A request never waits for a parse: a few keystrokes old is good enough for context."""
    ws = workspace(LimitSettings())
    ws.apply(FileChange("a.py", "", 1, text="x = 1\n"))
    assert ws.chunks() == []  # never chunked: none, rather than a parse now
    before = chunked(ws).chunks()
    ws.apply(FileChange("a.py", "", 2, edits=(TextEdit(4, 5, "2"),), base_version=1))
    assert ws.chunks() == before
    ws.apply(FileChange("a.py", "", 3, text="x = 3\n"))  # a whole text: the same
    assert ws.chunks() == before
    assert chunked(ws).chunks()[0].text.strip() == "x = 3"
