"""One developer typing through a real file: latency of each completion, as the editor sees it.

A block of lines is cut from a real source file and typed back a character at a time over a
Session stream (an edit per keystroke), with 11 other files of the same directory as the recently
touched files. At each pause (after a word, as a debounced client would) a completion is
requested in auto mode and awaited. Consecutive prompts share their start, so the engine's prefix
cache is reused from one pause to the next.

    python -m ghostpen.benchmarks.typing_session            # starts a server with the defaults
    python -m ghostpen.benchmarks.typing_session --target 127.0.0.1:50151 --file path/to/file.py
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import grpc
import uvloop

from ghostpen.benchmarks.corpus import percentiles
from ghostpen.benchmarks.server_process import running_server
from ghostpen.context.postprocess import Mode, resolve_mode
from ghostpen.editor_client.session_stream import SessionStream, full_text, insertion
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc

DEFAULT_FILE = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"


async def type_through(target: str, path: Path, start_line: int, lines: int) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    all_lines = text.split("\n")
    typed = "\n".join(all_lines[start_line : start_line + lines])  # the cursor's line stays
    begin = len("\n".join(all_lines[:start_line])) + 1
    current = text[:begin] + text[begin + len(typed) :]
    others = [p for p in sorted(path.parent.glob("*.py")) if p != path][:11]
    records = []
    async with grpc.aio.insecure_channel(target) as channel:
        editor = SessionStream(pb_grpc.CompletionStub(channel))
        editor.send(pb.ClientMessage(hello=pb.Hello(client="bench", workspace="stdlib")))
        await editor.read()
        for other in others:
            body = other.read_bytes()
            if len(body) > 1024 * 1024:
                continue
            editor.send(full_text(other.name, body, 1))
            await editor.read()
        version = 1
        editor.send(full_text(path.name, current.encode(), version))
        await editor.read()
        for index, char in enumerate(typed):
            offset = begin + index
            version += 1
            editor.send(insertion(path.name, version, offset, char))
            await editor.read()
            current = current[:offset] + char + current[offset:]
            following = typed[index + 1 : index + 2]
            at_line_start = not current[current.rfind("\n", 0, offset + 1) + 1 : offset + 1].strip()
            if char.isalnum() or char == "_" or following.isalnum() or at_line_start:
                continue  # mid-word or in the indentation: a debounced client would not ask
            records.append(await _complete(editor, path.name, version, offset + 1, current))
            records[-1]["expected"] = typed[index + 1 :].split("\n")[0]
        editor.close()
    return records


async def _complete(editor: SessionStream, path: str, version: int, cursor: int, text: str) -> dict:
    request_id = f"r{version}"
    sent = time.perf_counter()
    editor.send(
        pb.ClientMessage(
            completion_request=pb.CompletionRequest(
                request_id=request_id,
                path=path,
                version=version,
                cursor_offset=cursor,
                mode=pb.MODE_AUTO,
            )
        )
    )
    first, completion = None, ""
    while True:
        message = await editor.read()
        if message.HasField("error"):
            raise RuntimeError(message.error.message)
        chunk = message.chunk
        if chunk.text and first is None:
            first = time.perf_counter()
        completion += chunk.text
        if chunk.final:
            break
    done = time.perf_counter()
    line_start = text.rfind("\n", 0, cursor) + 1
    line_end = text.find("\n", cursor)
    mode = resolve_mode(Mode.AUTO, text[line_start:cursor], text[cursor:line_end])
    return {
        "mode": mode.value,
        "client_first_text_ms": ((first or done) - sent) * 1000,
        "client_total_ms": (done - sent) * 1000,
        "server_first_token_ms": chunk.timings.first_token_ms,
        "server_total_ms": chunk.timings.total_ms,
        "engine_ms": chunk.timings.engine_ms,
        "context_ms": chunk.timings.context_ms,
        "prompt_tokens": chunk.prompt_tokens,
        "cached_prompt_tokens": chunk.cached_prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "finish": pb.FinishReason.Name(chunk.finish_reason),
        "completion": completion,
    }


def summarize(records: list[dict]) -> dict:
    warm = records[1:]
    summary: dict[str, object] = {"completions": len(records), "cold_first": records[0]}
    for mode in ("single_line", "multi_line"):
        chosen = [r for r in warm if r["mode"] == mode]
        if not chosen:
            continue
        summary[mode] = {
            key: percentiles([r[key] for r in chosen])
            for key in ("client_first_text_ms", "client_total_ms", "server_first_token_ms")
        }
    summary["server_overhead_ms"] = percentiles(
        [r["server_total_ms"] - r["engine_ms"] for r in warm]
    )
    summary["grpc_overhead_ms"] = percentiles(
        [r["client_total_ms"] - r["server_total_ms"] for r in warm]
    )
    summary["prefix_cache_reuse"] = sum(r["cached_prompt_tokens"] for r in warm) / max(
        1, sum(r["prompt_tokens"] for r in warm)
    )
    single = [r for r in warm if r["mode"] == "single_line"]
    summary["single_line_matches_what_was_typed"] = sum(
        bool(r["completion"]) and r["expected"].startswith(r["completion"]) for r in single
    ) / max(1, len(single))
    return summary


async def _main(args: argparse.Namespace) -> None:
    if args.target:
        records = await type_through(args.target, args.file, args.start_line, args.lines)
    else:
        with running_server("--engine", args.engine) as server:
            records = await type_through(server.address, args.file, args.start_line, args.lines)
    summary = summarize(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "records": records}, indent=2))
    print(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--target", help="host:port of a running server; default: start one")
    parser.add_argument("--engine", default="llama.cpp")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--start-line", type=int, default=250)
    parser.add_argument("--lines", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/typing_session.json"))
    uvloop.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
