"""The Neovim plugin in a real headless Neovim (Debian's 0.7.2), through the agent, against a real
server with the default model: what a developer sees and what the server is told."""

from __future__ import annotations

import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pynvim
import pytest

from ghostpen.benchmarks.server_process import free_port, running_server

PLUGIN = Path(__file__).parents[2] / "editor_client" / "nvim"
CODE = "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n"
AGENT = [sys.executable, "-m", "ghostpen", "agent", "--stdio"]


def wait_for(probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {probe}")


class Editor:
    """A headless Neovim with the plugin, editing one Python file."""

    def __init__(self, server: str, path: Path) -> None:
        self.nvim = pynvim.attach(
            "child", argv=["nvim", "--embed", "--headless", "--clean", "-n", "-i", "NONE"]
        )
        self.nvim.command(f"set rtp^={PLUGIN}")
        self.nvim.exec_lua(
            "require('ghostpen').setup(...)",
            {"cmd": AGENT, "server": server, "settings": {"debounce_max_ms": 50}},
        )
        path.write_text(CODE)
        self.nvim.command(f"edit {path}")
        self.nvim.command("setlocal noautoindent nosmartindent indentexpr=")  # keys as typed
        # A developer's first keys reach the agent once it runs; the tests type after that.
        wait_for(lambda: self.status()["attached"])

    def type(self, keys: str, pause: float = 0.03) -> None:
        """One key at a time, as a developer types; `<Esc>` and the like are one key."""
        for key in re.findall(r"<[^<>]+>|.", keys, re.DOTALL):
            self.nvim.input(key)
            time.sleep(pause)

    def status(self) -> dict:
        return self.nvim.exec_lua("return require('ghostpen').status()")

    def agent_stats(self) -> dict:
        """The agent's own counters (`ghostpen/stats`), asked through Neovim's LSP client."""
        return self.nvim.exec_lua(
            "for _, lsp in ipairs(vim.lsp.get_active_clients()) do "
            "  if lsp.name == 'ghostpen' then "
            "    return lsp.request_sync('ghostpen/stats', {}, 5000, 0).result "
            "  end "
            "end"
        )

    def suggestion_after(self, line: str) -> dict:
        """The status once a suggestion shows for the cursor at the end of `line`."""
        return wait_for(lambda: (status := self.status()).get("before") == line and status)

    def ghost_text(self) -> list[str]:
        namespace = self.nvim.api.get_namespaces()["ghostpen"]
        marks = self.nvim.api.buf_get_extmarks(0, namespace, 0, -1, {"details": True})
        return [text for _, _, _, details in marks for text, _ in details.get("virt_text", [])]

    def lines(self) -> list[str]:
        return self.nvim.current.buffer[:]

    def close(self) -> None:
        self.nvim.close()


def events(database: Path) -> list[tuple[str, str]]:
    if not database.exists():
        return []
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT completion_id, kind FROM events").fetchall()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    database = tmp_path_factory.mktemp("nvim") / "telemetry.db"
    with running_server("--engine", "llama.cpp", env={"GHOSTPEN_DATABASE": str(database)}) as s:
        yield s.address, database


@pytest.fixture
def editor(served, tmp_path: Path) -> Iterator[Editor]:
    opened = Editor(served[0], tmp_path / "calc.py")
    yield opened
    opened.close()


def test_ghost_text_appears_tab_accepts_and_the_server_hears_of_it(editor, served) -> None:
    editor.type("Go    return ")
    status = editor.suggestion_after("    return ")
    completion_id, suggestion = status["completion_id"], status["suggestion"]
    assert suggestion.strip()
    assert editor.ghost_text() == [suggestion]
    assert editor.lines()[-1] == "    return "  # drawn, not inserted

    editor.nvim.input("<Tab>")
    wait_for(lambda: editor.lines()[-1] == "    return " + suggestion)
    assert editor.ghost_text() == []
    wait_for(
        lambda: {(completion_id, "shown"), (completion_id, "accepted")} <= set(events(served[1]))
    )


def test_word_accept_and_dismissal_are_reported(editor, served) -> None:
    editor.type("Go    result = add(")
    status = editor.suggestion_after("    result = add(")
    first, text = status["completion_id"], status["suggestion"]
    editor.nvim.input("<M-Right>")
    line = wait_for(lambda: editor.lines()[-1] != "    result = add(" and editor.lines()[-1])
    assert text.startswith(line[len("    result = add(") :])
    editor.nvim.input("<Esc>")
    wait_for(lambda: editor.ghost_text() == [])
    kinds = wait_for(
        lambda: (
            {kind for cid, kind in events(served[1]) if cid == first}
            >= {"shown", "partially_accepted", "rejected"}
        )
    )
    assert kinds


def test_the_trigger_key_asks_where_no_automatic_request_goes(editor) -> None:
    editor.type("Go    return  # the product<Esc>")
    editor.nvim.call("cursor", 6, 11)
    editor.nvim.input("a")  # insert mode after "return ", real text after the cursor
    wait_for(lambda: editor.status().get("pending") is None)  # every answer to the typing is in
    assert editor.status().get("suggestion") is None
    editor.nvim.input("<M-Bslash>")
    assert editor.suggestion_after("    return ")["suggestion"].strip()


def test_a_request_superseded_by_typing_never_renders(editor) -> None:
    editor.type("Go    result = multiply(add(1, 2), 3)", pause=0.02)
    editor.type("\n    return ", pause=0.0)  # a line the model is sure of: the show gate passes it
    wait_for(lambda: editor.status().get("suggestion"))
    renders = editor.status()["renders"]
    assert renders and all(requested == drawn for requested, drawn in renders)
    assert len(renders) < len("result = multiply(add(1, 2), 3)")


@pytest.mark.system
def test_with_the_server_down_the_editor_stays_responsive_and_reconnects(tmp_path) -> None:
    port = free_port()
    editor = Editor(f"127.0.0.1:{port}", tmp_path / "calc.py")
    try:
        started = time.monotonic()
        editor.type("Go    return ")
        assert editor.lines()[-1] == "    return "
        assert time.monotonic() - started < 5
        wait_for(lambda: editor.status()["messages"])
        failed = editor.agent_stats()["failed_attempts"]
        wait_for(lambda: editor.agent_stats()["failed_attempts"] >= failed + 2)
        (message,) = editor.status()["messages"]  # more retries: still one message
        assert f"127.0.0.1:{port} unavailable" in message
        with running_server("--engine", "llama.cpp", port=port):
            wait_for(lambda: len(editor.status()["messages"]) == 2)
            editor.type("a")
            assert wait_for(lambda: editor.status().get("suggestion"))
    finally:
        editor.close()
