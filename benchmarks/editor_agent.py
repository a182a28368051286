"""What the editor agent adds: a developer types a real file through `ghostpen agent --stdio`.

An LSP client (as an editor would be) opens 12 files of one directory, then types a block of
one of them back a keystroke at a time at human speed (log-normal gaps, a pause at line ends),
asking for an automatic inline completion after every keystroke as an editor does. Where the
suggestion shown matches what comes next, the developer types through it. Reported: the
agent's own latency (editor event to request sent, final chunk to answer), the LSP round trip of
answers from the cache, the share of keystrokes answered from the cache, and the requests the
debounce saved.

    python -m ghostpen.benchmarks.editor_agent                  # starts a server with the defaults
    python -m ghostpen.benchmarks.editor_agent --file path/to/file.py --lines 30 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import uvloop
from lsprotocol import types
from pygls.lsp.client import LanguageClient

from ghostpen.benchmarks.corpus import percentiles
from ghostpen.benchmarks.server_process import running_server
from ghostpen.benchmarks.typing_session import DEFAULT_FILE

KEY_MEDIAN_S = 0.12  # between keystrokes: log-normal around this
KEY_SIGMA = 0.5
LINE_PAUSE_S = 0.8  # the developer reads at the end of each line


async def type_through(
    server: str, path: Path, start_line: int, lines: int, seed: int
) -> dict[str, object]:
    rng = random.Random(seed)
    text = path.read_text(encoding="utf-8")
    all_lines = text.split("\n")
    typed = "\n".join(all_lines[start_line : start_line + lines])
    begin = len("\n".join(all_lines[:start_line])) + 1
    current = text[:begin] + text[begin + len(typed) :]
    others = [p for p in sorted(path.parent.glob("*.py")) if p != path][:11]

    client = LanguageClient("ghostpen-bench", "0")
    await client.start_io(sys.executable, "-m", "ghostpen", "agent", "--stdio")
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(),
            root_uri=path.parent.as_uri(),
            initialization_options={"server": server},
        )
    )
    client.initialized(types.InitializedParams())
    for version, (file, body) in enumerate(
        [(other, other.read_text(encoding="utf-8", errors="replace")) for other in others]
        + [(path, current)]
    ):
        client.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(
                    uri=file.as_uri(), language_id="python", version=version + 1, text=body
                )
            )
        )
    while not (await _stats(client))["connected"]:
        await asyncio.sleep(0.05)

    uri, version = path.as_uri(), 1
    line, column = start_line, 0
    shown = ""  # the suggestion on screen
    answers: list[asyncio.Task] = []
    round_trips_cached: list[float] = []
    through_suggestion = 0
    for char in typed:
        version += 1
        client.text_document_did_change(insertion(uri, version, line, column, char))
        through_suggestion += bool(shown) and shown.startswith(char)
        line, column = (line + 1, 0) if char == "\n" else (line, column + 1)
        # As an editor does, only the newest answer is shown; older ones are ignored.
        answers.append(asyncio.create_task(_ask(client, uri, line, column)))
        gap = rng.lognormvariate(0, KEY_SIGMA) * KEY_MEDIAN_S
        if char == "\n":
            gap += LINE_PAUSE_S
        await asyncio.sleep(gap)
        if answers[-1].done():
            shown, elapsed, cached = answers[-1].result()
            if cached:
                round_trips_cached.append(elapsed)
        else:
            shown = ""
    await asyncio.gather(*answers, return_exceptions=True)
    stats = await _stats(client)
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()

    automatic = stats["calls"] - stats["from_cache"] - stats["from_in_flight"]
    return {
        "file": str(path),
        "lines": lines,
        "keystrokes": len(typed),
        "keystrokes_typed_through_a_suggestion": through_suggestion,
        "answered_from_cache": stats["from_cache"],
        "answered_from_request_in_flight": stats["from_in_flight"],
        "share_of_keystrokes_from_cache": round(
            (stats["from_cache"] + stats["from_in_flight"]) / len(typed), 3
        ),
        "requests_sent": stats["requests"],
        "saved_by_debounce": stats["debounced"],
        "not_at_a_completion_point": stats["not_at_completion_point"],
        "share_of_requests_saved_by_debounce": round(stats["debounced"] / max(automatic, 1), 3),
        "agent_event_to_request_sent_ms": _summary(stats["before_send_ms"]),
        "agent_final_chunk_to_answer_ms": _summary(stats["after_receive_ms"]),
        "lsp_round_trip_from_cache_ms": _summary(round_trips_cached),
    }


def insertion(
    uri: str, version: int, line: int, column: int, text: str
) -> types.DidChangeTextDocumentParams:
    """`text` typed at line:column, as an editor reports it (incremental sync)."""
    at = types.Position(line=line, character=column)
    change = types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at), text=text)
    return types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[change],
    )


async def _ask(client: LanguageClient, uri: str, line: int, column: int) -> tuple[str, float, bool]:
    """The suggestion's text, the LSP round trip in ms, and whether the cache answered."""
    started = time.perf_counter()
    result = await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=line, character=column),
            context=types.InlineCompletionContext(
                trigger_kind=types.InlineCompletionTriggerKind.Automatic
            ),
        )
    )
    elapsed = (time.perf_counter() - started) * 1000
    if not result:
        return "", elapsed, False
    (item,) = result.items
    return item.insert_text, elapsed, item.command.arguments[0]["source"] == "cache"


async def _stats(client: LanguageClient) -> dict:
    reply = await client.protocol.send_request_async("ghostpen/stats", {})
    return reply._asdict() if hasattr(reply, "_asdict") else dict(reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", help="host:port of a running server; default: start one")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--start-line", type=int, default=60)
    parser.add_argument("--lines", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def run(target: str) -> dict[str, object]:
        return uvloop.run(type_through(target, args.file, args.start_line, args.lines, args.seed))

    if args.target:
        result = run(args.target)
    else:
        with running_server("--engine", "llama.cpp") as server:
            result = run(server.address)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()


def _summary(values: list[float]) -> dict[str, float] | None:
    """Percentiles, or None where nothing was measured (no completion finished while typing)."""
    return percentiles(values) if values else None
