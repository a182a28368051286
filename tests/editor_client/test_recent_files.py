from ghostpen.editor_client.recent_files import RecentFiles, TextEdit


def recent(
    max_files: int = 3, max_bytes: int = 100, session_bytes: int = 1000
) -> tuple[RecentFiles, list[str]]:
    warnings: list[str] = []
    return RecentFiles(max_files, max_bytes, session_bytes, warnings.append), warnings


def test_a_file_goes_whole_once_then_as_versioned_edits() -> None:
    files, _ = recent()
    files.open("a.py", "python", "x = 1\n", 1)
    (first,) = files.pending_updates()
    assert first.file_update.text == b"x = 1\n" and first.file_update.version == 1
    assert files.pending_updates() == []
    files.change("a.py", 2, [TextEdit(5, 5, "0")])
    files.change("a.py", 3, [TextEdit(0, 1, "y")])
    (update,) = files.pending_updates()
    assert update.file_update.base_version == 1 and update.file_update.version == 3
    assert [(e.start, e.end, e.text) for e in update.file_update.edits.edits] == [
        (5, 5, b"0"),
        (0, 1, b"y"),
    ]
    assert files.get("a.py").text == "y = 10\n"


def test_after_the_server_forgets_the_file_goes_whole_again() -> None:
    files, _ = recent()
    files.open("a.py", "python", "x = 1\n", 1)
    files.pending_updates()
    files.change("a.py", 2, [TextEdit(0, 0, "# hi\n")])
    files.forget_all_on_server()
    (update,) = files.pending_updates()
    assert update.file_update.text == b"# hi\nx = 1\n" and update.file_update.version == 2


def test_least_recently_touched_files_drop_out_and_updates_go_oldest_first() -> None:
    files, _ = recent(max_files=2)
    for name in ("a.py", "b.py", "c.py"):
        files.open(name, "python", name, 1)
    files.touch("b.py")
    assert [f.path for f in files] == ["c.py", "b.py"]
    assert [m.file_update.path for m in files.pending_updates()] == ["c.py", "b.py"]


def test_files_over_the_limit_or_binary_are_not_sent_and_said_once() -> None:
    files, warnings = recent(max_bytes=10)
    files.open("big.py", "python", "x" * 11, 1)
    files.change("big.py", 2, [TextEdit(0, 0, "y")])
    files.open("blob.bin", "", "a\0b", 1)
    files.open("ok.py", "python", "é" * 5, 1)  # 10 bytes: at the limit
    assert [m.file_update.path for m in files.pending_updates()] == ["ok.py"]
    assert len(warnings) == 2
    assert "11 bytes is over max_file_bytes (10)" in warnings[0]
    assert "binary" in warnings[1]
    files.change("big.py", 3, [TextEdit(0, 5, "")])  # small enough again: sent whole
    (update,) = files.pending_updates()
    assert update.file_update.text == b"xxxxxxx"


def test_the_servers_lower_limits_are_adopted() -> None:
    files, warnings = recent(max_files=3, max_bytes=100)
    for name in ("a.py", "b.py", "c.py"):
        files.open(name, "python", name * 10, 1)
    files.limit(max_files=2, max_file_bytes=30, max_session_bytes=0)  # 0: none set
    assert [f.path for f in files] == ["b.py", "c.py"]
    assert files.pending_updates() == []  # 40 bytes each, over the server's 30
    assert len(warnings) == 2
    assert files.max_session_bytes == 1000


def test_files_past_max_session_bytes_drop_out_as_the_server_would_evict_them() -> None:
    files, _ = recent(max_files=5, max_bytes=100, session_bytes=250)
    for name in ("a.py", "b.py", "c.py"):
        files.open(name, "python", name[0] * 100, 1)  # the third is past 250 in all
    files.open("bin.dat", "", "\0" * 100, 1)  # never sent, so it holds nothing on the server
    assert [f.path for f in files] == ["b.py", "c.py", "bin.dat"]
    files.change("b.py", 2, [TextEdit(0, 60, "")])  # b.py shrinks to 40: a 100-byte file fits
    files.open("d.py", "python", "é" * 50, 1)
    assert [f.path for f in files] == ["c.py", "bin.dat", "b.py", "d.py"]
    files.limit(max_files=5, max_file_bytes=100, max_session_bytes=150)
    assert [f.path for f in files] == ["bin.dat", "b.py", "d.py"]
    assert [m.file_update.path for m in files.pending_updates()] == ["b.py", "d.py"]
