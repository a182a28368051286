"""`ghostpen agent --stdio` driven by a real LSP client over stdio, against the real server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.lsp.client import LanguageClient

from ghostpen.benchmarks.editor_agent import insertion
from ghostpen.server.telemetry.store import Store

CODE = "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n    return "


def stored_kinds(settings, completion_id: str) -> list[str]:
    store = Store.open(settings.telemetry.database, settings.cache_dir)
    try:
        rows = store.query(
            "SELECT kind FROM events WHERE completion_id = ? ORDER BY kind", (completion_id,)
        )
    finally:
        store.close()
    return [kind for (kind,) in rows]


async def until_true(probe, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await probe():
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture(loop_scope="session")
async def agent(server, tmp_path: Path) -> AsyncIterator[tuple[LanguageClient, str]]:
    client = LanguageClient("ghostpen-tests", "0")
    logs: list[str] = []
    client.feature(types.WINDOW_LOG_MESSAGE)(lambda params: logs.append(params.message))
    await client.start_io(sys.executable, "-m", "ghostpen", "agent", "--stdio")
    result = await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(),
            root_uri=tmp_path.as_uri(),
            initialization_options={"server": f"127.0.0.1:{server.port}", "debounce_max_ms": 50},
        )
    )
    assert result.capabilities.inline_completion_provider is not None
    client.initialized(types.InitializedParams())
    uri = (tmp_path / "math.py").as_uri()
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(
                uri=uri, language_id="python", version=1, text=CODE
            )
        )
    )

    async def connected() -> bool:
        return (await agent_stats(client))["connected"]

    await until_true(connected)
    yield client, uri
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    assert logs == []  # connected at once: nothing to tell the developer


async def agent_stats(client: LanguageClient) -> dict:
    reply = await client.protocol.send_request_async("ghostpen/stats", {})
    return reply._asdict() if hasattr(reply, "_asdict") else reply


def inline(uri: str, line: int, character: int, automatic: bool) -> types.InlineCompletionParams:
    kind = types.InlineCompletionTriggerKind
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(
            trigger_kind=kind.Automatic if automatic else kind.Invoked
        ),
    )


def type_text(client: LanguageClient, uri: str, version: int, line: int, col: int, text: str):
    client.text_document_did_change(insertion(uri, version, line, col, text))


async def test_inline_completion_then_shown_and_accepted_reach_the_server(agent, settings):
    client, uri = agent
    result = await client.text_document_inline_completion_async(inline(uri, 5, 11, False))
    (item,) = result.items
    assert item.insert_text.strip().startswith("a * b")
    (accepted,) = item.command.arguments
    assert accepted["text"] == item.insert_text and accepted["uri"] == uri
    completion_id = accepted["completionId"]

    client.protocol.notify("ghostpen/didShowCompletion", {"completionId": completion_id})
    type_text(client, uri, 2, 5, 11, item.insert_text)
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command=item.command.command, arguments=[accepted])
    )

    async def stored() -> bool:
        return stored_kinds(settings, completion_id) == ["accepted", "shown"]

    await until_true(stored)


async def test_typing_through_a_suggestion_is_served_without_a_request(agent):
    client, uri = agent
    first = await client.text_document_inline_completion_async(inline(uri, 5, 11, False))
    text = first.items[0].insert_text
    before = await agent_stats(client)
    type_text(client, uri, 2, 5, 11, text[0])
    typed = await client.text_document_inline_completion_async(inline(uri, 5, 12, True))
    after = await agent_stats(client)
    assert typed.items[0].insert_text == text[1:]
    assert after["from_cache"] == before["from_cache"] + 1
    assert after["requests"] == before["requests"]


async def test_no_automatic_request_in_the_middle_of_a_word_and_bad_reports_are_refused(agent):
    client, uri = agent
    type_text(client, uri, 2, 5, 11, "a_value")
    result = await client.text_document_inline_completion_async(inline(uri, 5, 12, True))
    assert result is None
    stats = await agent_stats(client)
    assert stats["not_at_completion_point"] == 1
    with pytest.raises(Exception, match="reason must be one of dismissed, typed_over"):
        await client.protocol.send_request_async(
            "ghostpen/didReject", {"completionId": "c", "reason": "bored"}
        )


async def start_configurable(client: LanguageClient, root: Path, options: dict) -> None:
    """Start the agent for an editor that keeps settings in its workspace configuration."""
    await client.start_io(sys.executable, "-m", "ghostpen", "agent", "--stdio")
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(
                workspace=types.WorkspaceClientCapabilities(configuration=True)
            ),
            root_uri=root.as_uri(),
            initialization_options=options,
        )
    )
    client.initialized(types.InitializedParams())


async def test_workspace_configuration_overrides_initialization_options(server, tmp_path):
    """An editor that keeps settings in its configuration (VS Code, Helix) is asked for them."""
    client = LanguageClient("ghostpen-tests", "0")
    asked: list[str] = []

    @client.feature(types.WORKSPACE_CONFIGURATION)
    def configuration(params: types.ConfigurationParams) -> list[dict]:
        asked.extend(item.section for item in params.items)
        return [{"server": f"127.0.0.1:{server.port}"}]

    await start_configurable(client, tmp_path, {"server": "127.0.0.1:1"})  # nothing listens

    async def connected() -> bool:
        return (await agent_stats(client))["connected"]

    await until_true(connected)
    assert asked == ["ghostpen"]
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()


async def test_unknown_settings_fail_initialization_with_the_known_names(tmp_path):
    client = LanguageClient("ghostpen-tests", "0")
    await client.start_io(sys.executable, "-m", "ghostpen", "agent", "--stdio")
    with pytest.raises(Exception, match="unknown ghostpen setting 'sever'; known: server"):
        await client.initialize_async(
            types.InitializeParams(
                capabilities=types.ClientCapabilities(),
                initialization_options={"sever": "127.0.0.1:1"},
            )
        )
    client.exit(None)
    await client.stop()


async def test_an_invalid_workspace_configuration_is_shown_and_the_options_stand(tmp_path):
    """No server needed: the agent starts, is refused nothing, and tells the developer."""
    client = LanguageClient("ghostpen-tests", "0")
    shown: list[types.ShowMessageParams] = []
    told = asyncio.Event()

    @client.feature(types.WINDOW_SHOW_MESSAGE)
    def show(params: types.ShowMessageParams) -> None:
        shown.append(params)
        told.set()

    @client.feature(types.WORKSPACE_CONFIGURATION)
    def configuration(params: types.ConfigurationParams) -> list[dict]:
        return [{"debounce_max_ms": "soon"}]

    await start_configurable(client, tmp_path, {"server": "127.0.0.1:1", "debounce_max_ms": 50})
    await asyncio.wait_for(told.wait(), 30)
    [message] = shown
    assert message.type == types.MessageType.Error
    assert "'ghostpen' workspace configuration is ignored" in message.message
    assert "'debounce_max_ms' must be a int" in message.message
    stats = await agent_stats(client)  # the agent runs, on its initialization options
    assert stats["connected"] is False
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
