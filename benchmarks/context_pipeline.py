"""Context pipeline cost per request: 12 recently touched files of ~1,000 lines each.

Times what the server does per request before the engine: gather the workspace's chunks, rank
them against the text behind the cursor, build the prompt, and prepare post-processing.
`steady`: the files are unchanged between requests (chunks cached per version).
`typing`: a real line is deleted and typed again a character at a time, a request after each
keystroke. As in the server, the request uses the chunks the typed file had a keystroke ago and
the file is re-chunked (incrementally) after the request went to the engine; that refresh is
timed on its own (`refresh`), since it runs while the engine computes.

    python -m ghostpen.benchmarks.context_pipeline --requests 2000
"""

from __future__ import annotations

import argparse
import json
import random
import time

from ghostpen.benchmarks.corpus import percentiles, stdlib_files
from ghostpen.context.chunker import IncrementalChunker
from ghostpen.context.postprocess import CursorSurroundings, Mode
from ghostpen.context.prompt import Document, build_prompt
from ghostpen.context.template import load_template
from ghostpen.server.settings import Settings
from ghostpen.server.workspace import FileChange, TextEdit, Workspace, WorkspaceFile


def run(requests: int, seed: int) -> dict[str, object]:
    settings = Settings.load(environ={})
    files = stdlib_files(800, 1300, settings.limits.max_files)
    workspace = Workspace(settings.limits)
    chunker = IncrementalChunker(settings.context.chunk_max_lines, settings.context.max_tree_chars)

    def refresh() -> None:
        """What the chunker process does for a session, here in this process."""
        for held in workspace.unchunked():
            held.set_chunks(chunker.chunk("bench", held.path, held.language, held.text))

    versions = {}
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        workspace.apply(FileChange(path.name, "", 1, text=text))
        versions[path.name] = 1
    refresh()  # the first request after opening the files pays this once
    rng = random.Random(seed)
    steady = []
    for _ in range(requests):
        name = rng.choice(files).name
        held = workspace.get(name, versions[name])
        steady.append(_time_request(workspace, held, rng.randrange(len(held.text)), settings))
    typing: list[float] = []
    refresh: list[float] = []
    while len(typing) < requests:
        name = rng.choice(files).name
        held = workspace.get(name, versions[name])
        starts = [i + 1 for i, char in enumerate(held.text) if char == "\n"]
        begin = rng.choice(starts[:-1])
        line = held.text[begin : held.text.index("\n", begin) + 1]
        versions[name] += 1
        workspace.apply(_edit(name, versions[name], begin, begin + len(line), ""))
        for offset, char in enumerate(line):
            versions[name] += 1
            workspace.apply(_edit(name, versions[name], begin + offset, begin + offset, char))
            held = workspace.get(name, versions[name])
            typing.append(_time_request(workspace, held, begin + offset + 1, settings))
            start = time.perf_counter()
            refresh()
            refresh.append((time.perf_counter() - start) * 1000)
    results = {
        "steady": percentiles(steady),
        "typing": percentiles(typing[:requests]),
        "refresh": percentiles(refresh[:requests]),
    }
    chunks = len(workspace.chunks())
    lines = sum(f.read_text(encoding="utf-8", errors="replace").count("\n") for f in files)
    return {"files": len(files), "lines": lines, "chunks": chunks, "ms": results}


def _edit(path: str, version: int, start: int, end: int, text: str) -> FileChange:
    return FileChange(
        path, "", version, edits=(TextEdit(start, end, text),), base_version=version - 1
    )


def _time_request(
    workspace: Workspace, held: WorkspaceFile, cursor: int, settings: Settings
) -> float:
    """Milliseconds for what the server does per request before the engine."""
    template = load_template(settings.context.template)
    start = time.perf_counter()
    document = Document(held.path, held.language, held.text, cursor)
    build_prompt("bench", document, workspace.chunks(), template, settings.context)
    CursorSurroundings.around(document.prefix, document.suffix, Mode.AUTO, template.stop)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.requests, args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
