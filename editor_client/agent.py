"""`ghostpen agent --stdio`: the language server an editor starts, as Copilot's and Tabby's are.

Document notifications feed the recent files; `textDocument/inlineCompletion` (LSP 3.18)
answers with the suggestion at the cursor. Each item's command carries what the editor reports
back: `ghostpen/didShowCompletion`, `ghostpen/didAccept`, `ghostpen/didPartiallyAccept`,
`ghostpen/didReject` (notifications) or the `ghostpen.accept` command. `ghostpen/stats` answers
with the agent's counters and client-side latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import uvloop
from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.uris import to_fs_path

from ghostpen.editor_client.client import SessionClient
from ghostpen.editor_client.feedback import Feedback
from ghostpen.editor_client.inline import InlineCompleter
from ghostpen.editor_client.recent_files import RecentFiles, TextEdit
from ghostpen.editor_client.settings import ClientSettings

log = logging.getLogger(__name__)

ACCEPT_COMMAND = "ghostpen.accept"


class Agent:
    """The editor-independent parts, built once the editor said who it is and what it wants."""

    def __init__(self, settings: ClientSettings, workspace: str, server: LanguageServer) -> None:
        self.settings = settings
        self.workspace = workspace
        self.files = RecentFiles(
            settings.max_files, settings.max_file_bytes, settings.max_session_bytes, self._log
        )
        self._server = server
        self.client = SessionClient(settings, self.files, self._log, workspace)
        self.completer = InlineCompleter(settings, self.client)
        self.feedback = Feedback(self.client.report, corrections=self.client.correction_limit)
        self._retention_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.client.start()
        self._retention_task = asyncio.create_task(self._check_retention())

    async def stop(self) -> None:
        if self._retention_task:
            self._retention_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention_task
        lost = self.feedback.retention.abandon()
        if lost:
            log.info("%d retention checks dropped at shutdown", len(lost))
        await self.client.close()

    def _log(self, message: str) -> None:
        self._server.window_log_message(
            types.LogMessageParams(type=types.MessageType.Info, message=message)
        )

    async def _check_retention(self) -> None:
        while True:
            await asyncio.sleep(self.settings.retention_check_s)
            self.feedback.retention.check_due(self._text_of)

    def _text_of(self, path: str) -> str | None:
        tracked = self.files.get(path)
        return tracked.text if tracked else None


class GhostpenLanguageServer(LanguageServer):
    agent: Agent | None = None

    def offset(self, text: str, position: types.Position) -> int:
        """An LSP position (in the negotiated encoding) as a code-point offset into text."""
        start = 0
        for _ in range(position.line):
            newline = text.find("\n", start)
            if newline < 0:
                return len(text)
            start = newline + 1
        end = text.find("\n", start)
        line = text[start : len(text) if end < 0 else end]
        encoding = self.workspace.position_encoding
        if line.isascii() or encoding == types.PositionEncodingKind.Utf32:
            return start + min(position.character, len(line))
        unit_width = (
            (lambda char: len(char.encode()))
            if encoding == types.PositionEncodingKind.Utf8
            else (lambda char: 2 if ord(char) > 0xFFFF else 1)
        )
        units = 0
        for index, char in enumerate(line):
            if units >= position.character:
                return start + index
            units += unit_width(char)
        return start + len(line)


server = GhostpenLanguageServer(
    "ghostpen-agent", "0.1", text_document_sync_kind=types.TextDocumentSyncKind.Incremental
)


def _agent() -> Agent:
    if server.agent is None:
        raise JsonRpcInvalidParams("ghostpen agent: not initialized")
    return server.agent


def _settings(*sources: Any) -> ClientSettings:
    merged: dict[str, Any] = {}
    for source in sources:
        if isinstance(source, Mapping):
            merged.update(source)
    try:
        return ClientSettings.from_options(merged)
    except ValueError as error:
        raise JsonRpcInvalidParams(str(error)) from error


@server.feature(types.INITIALIZE)
def initialize(ls: GhostpenLanguageServer, params: types.InitializeParams) -> None:
    settings = _settings(params.initialization_options)
    root = params.root_uri or (params.workspace_folders or [None])[0]
    root_uri = root if isinstance(root, str) else (root.uri if root else "")
    workspace = settings.workspace or (Path(to_fs_path(root_uri) or "").name if root_uri else "")
    ls.agent = Agent(settings, workspace, ls)


@server.feature(types.INITIALIZED)
async def initialized(ls: GhostpenLanguageServer, params: types.InitializedParams) -> None:
    agent = _agent()
    capabilities = ls.client_capabilities.workspace
    if capabilities and capabilities.configuration:
        try:
            (section,) = await ls.workspace_configuration_async(
                types.ConfigurationParams(items=[types.ConfigurationItem(section="ghostpen")])
            )
        except Exception as error:  # the editor could not answer: its options stand
            section = None
            _tell(ls, types.MessageType.Warning, f"workspace configuration unreadable: {error}")
        if isinstance(section, Mapping) and section:
            try:
                configured = _settings(dataclasses.asdict(agent.settings), section)
            except JsonRpcInvalidParams as error:
                _tell(
                    ls,
                    types.MessageType.Error,
                    f"the 'ghostpen' workspace configuration is ignored: {error}",
                )
            else:
                ls.agent = agent = Agent(configured, agent.workspace, ls)
    agent.start()


def _tell(ls: GhostpenLanguageServer, kind: types.MessageType, message: str) -> None:
    """Shown to the developer, not only logged: a setting that silently does nothing costs an
    afternoon."""
    ls.window_show_message(types.ShowMessageParams(type=kind, message=f"ghostpen: {message}"))


@server.feature(types.SHUTDOWN)
async def shutdown(ls: GhostpenLanguageServer, params: None) -> None:
    if ls.agent:
        await ls.agent.stop()


@server.feature(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: GhostpenLanguageServer, params: types.DidOpenTextDocumentParams) -> None:
    agent = _agent()
    document = params.text_document
    path = _path(document.uri)
    agent.files.open(path, document.language_id, document.text, document.version)
    agent.client.sync_files()


@server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: GhostpenLanguageServer, params: types.DidChangeTextDocumentParams) -> None:
    agent = _agent()
    path = _path(params.text_document.uri)
    version = params.text_document.version
    tracked = agent.files.get(path)
    if tracked is None:
        return
    for change in params.content_changes:
        if isinstance(change, types.TextDocumentContentChangePartial):
            start = ls.offset(tracked.text, change.range.start)
            end = ls.offset(tracked.text, change.range.end)
            agent.files.change(path, version, [TextEdit(start, end, change.text)])
            agent.feedback.retention.edited(path, start, end, change.text)
        else:
            agent.files.replace(path, change.text, version)
    agent.completer.keystroke()
    agent.client.sync_files()


@server.feature(types.TEXT_DOCUMENT_DID_SAVE)
def did_save(ls: GhostpenLanguageServer, params: types.DidSaveTextDocumentParams) -> None:
    _agent().files.touch(_path(params.text_document.uri))


@server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: GhostpenLanguageServer, params: types.DidCloseTextDocumentParams) -> None:
    agent = _agent()
    path = _path(params.text_document.uri)
    if tracked := agent.files.get(path):
        agent.feedback.retention.closed(path, tracked.text)


@server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def inline_completion(
    ls: GhostpenLanguageServer, params: types.InlineCompletionParams
) -> types.InlineCompletionList | None:
    agent = _agent()
    path = _path(params.text_document.uri)
    tracked = agent.files.get(path)
    if tracked is None:
        return None
    cursor = ls.offset(tracked.text, params.position)
    automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
    suggestion = await agent.completer.complete(path, cursor, automatic)
    if suggestion is None:
        return None
    accepted = {
        "completionId": suggestion.completion_id,
        "uri": params.text_document.uri,
        "position": {"line": params.position.line, "character": params.position.character},
        "text": suggestion.text,
        "source": suggestion.source,
    }
    item = types.InlineCompletionItem(
        insert_text=suggestion.text,
        range=types.Range(start=params.position, end=params.position),
        command=types.Command(
            title="ghostpen accepted", command=ACCEPT_COMMAND, arguments=[accepted]
        ),
    )
    return types.InlineCompletionList(items=[item])


@server.command(ACCEPT_COMMAND)
def accept_command(ls: GhostpenLanguageServer, *arguments: Any) -> None:
    for argument in arguments:
        if isinstance(argument, Mapping):
            did_accept(ls, argument)


@server.feature("ghostpen/didShowCompletion")
def did_show(ls: GhostpenLanguageServer, params: Any) -> None:
    _agent().feedback.shown(_field(params, "completionId"))


@server.feature("ghostpen/didAccept")
def did_accept(ls: GhostpenLanguageServer, params: Any) -> None:
    agent = _agent()
    path, offset = _located(ls, params)
    agent.feedback.accepted(_field(params, "completionId"), path, offset, _field(params, "text"))


@server.feature("ghostpen/didPartiallyAccept")
def did_partially_accept(ls: GhostpenLanguageServer, params: Any) -> None:
    agent = _agent()
    path, offset = _located(ls, params)
    try:
        agent.feedback.partially_accepted(
            _field(params, "completionId"),
            path,
            offset,
            _field(params, "text"),
            _field(params, "unit"),
        )
    except ValueError as error:
        raise JsonRpcInvalidParams(str(error)) from error


@server.feature("ghostpen/didReject")
def did_reject(ls: GhostpenLanguageServer, params: Any) -> None:
    try:
        _agent().feedback.rejected(_field(params, "completionId"), _field(params, "reason"))
    except ValueError as error:
        raise JsonRpcInvalidParams(str(error)) from error


@server.feature("ghostpen/stats")
def stats(ls: GhostpenLanguageServer, params: Any) -> dict[str, Any]:
    agent = _agent()
    return {
        **{
            name: list(value) if isinstance(value, deque) else value
            for name, value in vars(agent.completer.stats).items()
        },
        "connected": agent.client.connected,
        "sessions": agent.client.sessions,
        "failed_attempts": agent.client.failed_attempts,
        "unacknowledged_events": agent.client.unacknowledged_events,
    }


def _path(uri: str) -> str:
    return to_fs_path(uri) or uri


def _field(params: Any, name: str) -> Any:
    value = params.get(name) if isinstance(params, Mapping) else getattr(params, name, None)
    if value is None:
        raise JsonRpcInvalidParams(f"missing {name!r}")
    return value


def _located(ls: GhostpenLanguageServer, params: Any) -> tuple[str, int]:
    """The file and code-point offset where accepted text was inserted."""
    path = _path(_field(params, "uri"))
    position = _field(params, "position")
    line, character = (
        (position["line"], position["character"])
        if isinstance(position, Mapping)
        else (position.line, position.character)
    )
    tracked = _agent().files.get(path)
    text = tracked.text if tracked else ""
    return path, ls.offset(text, types.Position(line=line, character=character))


def run_stdio() -> None:
    """Serve LSP on stdin/stdout; logs go to stderr (stdout is the protocol)."""
    logging.basicConfig(level=logging.WARNING, format="ghostpen-agent %(levelname)s %(message)s")
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    server.start_io()
