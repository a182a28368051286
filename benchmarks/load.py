"""`ghostpen bench`: simulated developers typing real files against a server, as platform teams
size a deployment.

Each developer is an open Session stream. It types a real source file back a character at a
time (intervals drawn from a log-normal around 180 ms, with 1-3 s pauses after some words, a typo
deleted at once now and then, and now and then a jump to an earlier line to add a note there),
sends an edit per keystroke, asks for a completion once it pauses for `--debounce-ms`, cancels
its request in flight when it types on (as the editor client does), and accepts some completions
(shown and accepted events, so the telemetry path is loaded too).

    ghostpen bench --sessions 4 --duration 60 --files path/to/dir
    ghostpen bench --sweep 1,2,4,8,16,32,64 --duration 60 --save-result out.json
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sysconfig
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from ghostpen.benchmarks.corpus import percentile_cells, percentiles
from ghostpen.benchmarks.plot import latency_chart
from ghostpen.benchmarks.server_process import ServerProcess
from ghostpen.editor_client.session_stream import SessionStream, deletion, full_text, insertion
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc

DEFAULT_FILES = Path(sysconfig.get_paths()["stdlib"]) / "json"
JUMP_NOTE = "  # checked"


@dataclass(frozen=True)
class LoadConfig:
    sessions: int
    duration_s: float
    files: tuple[Path, ...]
    seed: int = 0
    warmup_s: float = 5.0
    keystroke_ms: float = 180.0
    debounce_ms: float = 250.0
    accept_rate: float = 0.3
    think_rate: float = 0.25  # chance of a 1-3 s pause after a non-word character
    typo_rate: float = 0.03  # chance a keystroke is a wrong character, deleted at once
    jump_rate: float = 0.02  # chance, after a line, of a short edit at an earlier line end


@dataclass
class LoadStats:
    first_text_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    finished: int = 0
    cancelled: int = 0
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    keystrokes: int = 0


async def developer(
    stub: pb_grpc.CompletionStub,
    index: int,
    config: LoadConfig,
    stats: LoadStats,
    measure_from: float,
    stop_at: float,
) -> None:
    rng = random.Random(config.seed * 1000 + index)
    target = config.files[index % len(config.files)]
    text = target.read_text(encoding="utf-8")
    start = rng.randrange(len(text) // 4, len(text) // 2)
    start = text.rfind("\n", 0, start) + 1
    typed, current = text[start:], text[:start]
    stream = SessionStream(stub)
    stream.send(pb.ClientMessage(hello=pb.Hello(client=f"bench-{index}", workspace="bench")))
    for other in [f for f in config.files if f != target][:11]:
        stream.send(full_text(other.name, other.read_bytes(), 1))
    version = 1
    stream.send(full_text(target.name, current.encode(), version))
    pending: dict[str, float] = {}  # request id -> sent at
    first_seen: dict[str, float] = {}

    async def read() -> None:
        while True:
            message = await stream.read()
            kind = message.WhichOneof("kind")
            if kind == "error" and message.error.request_id:
                pending.pop(message.error.request_id, None)
                if time.monotonic() >= measure_from:
                    stats.errors[message.error.status] += 1
            elif kind == "chunk":
                chunk, now = message.chunk, time.monotonic()
                sent = pending.get(chunk.request_id)
                if sent is None:
                    continue
                if chunk.text and chunk.request_id not in first_seen:
                    first_seen[chunk.request_id] = now
                if chunk.final:
                    pending.pop(chunk.request_id)
                    measured = sent >= measure_from
                    if chunk.finish_reason == pb.FINISH_REASON_CANCELLED:
                        stats.cancelled += measured
                        continue
                    if measured:
                        stats.finished += 1
                        stats.total_ms.append((now - sent) * 1000)
                        stats.first_text_ms.append(
                            (first_seen.get(chunk.request_id, now) - sent) * 1000
                        )
                    if chunk.completion_id and rng.random() < config.accept_rate:
                        for body in (
                            {"shown": pb.Shown()},
                            {"accepted": pb.Accepted(accepted_chars=len(chunk.text))},
                        ):
                            stream.send(
                                pb.ClientMessage(
                                    event=pb.TelemetryEvent(
                                        event_id=uuid.uuid4().hex,
                                        completion_id=chunk.completion_id,
                                        **body,
                                    )
                                )
                            )

    reader = asyncio.create_task(read())
    try:
        position = 0
        while time.monotonic() < stop_at and position < len(typed):
            for request_id in list(pending):  # typing on: the suggestion is stale
                stream.send(pb.ClientMessage(cancel=pb.Cancel(request_id=request_id)))
                pending.pop(request_id)
                stats.cancelled += time.monotonic() >= measure_from
            char = typed[position]
            if char == "\n" and rng.random() < config.jump_rate:
                # The cursor jumps to an earlier line end, adds a note there, and comes back.
                at = rng.choice([i for i, c in enumerate(current) if c == "\n"] or [0])
                version += 1
                stream.send(insertion(target.name, version, at, JUMP_NOTE))
                current = current[:at] + JUMP_NOTE + current[at:]
                stats.keystrokes += len(JUMP_NOTE)
            offset = len(current)
            if char.isalnum() and rng.random() < config.typo_rate:
                version += 2  # a wrong key, then backspace
                stream.send(insertion(target.name, version - 1, offset, "x"))
                stream.send(deletion(target.name, version, offset, 1))
                stats.keystrokes += 2
            position += 1
            version += 1
            current += char
            stream.send(insertion(target.name, version, offset, char))
            stats.keystrokes += 1
            pause = rng.lognormvariate(0, 0.5) * config.keystroke_ms / 1000
            if not char.isalnum() and rng.random() < config.think_rate:
                pause += rng.uniform(1.0, 3.0)  # a look at the suggestion, or a thought
            if pause * 1000 >= config.debounce_ms and not char.isspace():
                await asyncio.sleep(config.debounce_ms / 1000)
                request_id = f"{index}-{version}"
                pending[request_id] = time.monotonic()
                stats.requests += time.monotonic() >= measure_from
                stream.send(
                    pb.ClientMessage(
                        completion_request=pb.CompletionRequest(
                            request_id=request_id,
                            path=target.name,
                            version=version,
                            cursor_offset=len(current),
                            mode=pb.MODE_AUTO,
                        )
                    )
                )
                pause -= config.debounce_ms / 1000
            await asyncio.sleep(max(0.0, pause))
    finally:
        stream.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def run_load(server: ServerProcess, config: LoadConfig) -> dict[str, object]:
    stats = LoadStats()
    wasted_before = _wasted_tokens(server.web)
    cpu_before, _ = server.usage()
    began = time.monotonic()
    measure_from = began + config.warmup_s
    stop_at = measure_from + config.duration_s
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.CompletionStub(channel)
        await asyncio.gather(
            *(
                developer(stub, i, config, stats, measure_from, stop_at)
                for i in range(config.sessions)
            )
        )
    measured_s = max(1e-9, time.monotonic() - measure_from)
    cpu_after, peak_rss = server.usage()
    wasted = _wasted_tokens(server.web) - wasted_before
    return {
        "sessions": config.sessions,
        "duration_s": round(measured_s, 1),
        "requests": stats.requests,
        "completions": stats.finished,
        "completions_per_s": stats.finished / measured_s,
        "cancelled_fraction": stats.cancelled / max(1, stats.requests),
        "errors": dict(stats.errors),
        "first_text_ms": percentiles(stats.first_text_ms) if stats.first_text_ms else None,
        "total_ms": percentiles(stats.total_ms) if stats.total_ms else None,
        "wasted_tokens": wasted,
        # An upper bound on the decode steps a cancel costs: tokens before it count too.
        "wasted_tokens_per_cancelled": wasted / max(1, stats.cancelled),
        "server_cpu_s": cpu_after - cpu_before,
        "server_peak_rss_mib": peak_rss / 2**20,
        "config": {k: (str(v) if k == "files" else v) for k, v in asdict(config).items()},
    }


def _wasted_tokens(web: str) -> float:
    body = urllib.request.urlopen(f"{web}/metrics", timeout=10).read().decode()
    return sum(
        float(v)
        for v in re.findall(r"^ghostpen_wasted_tokens_total\{[^}]*\} (\S+)", body, re.MULTILINE)
    )


def markdown(results: list[dict[str, object]]) -> str:
    lines = [
        "| sessions | completions/s | first text p50 / p90 / p99 ms | total p50 / p90 / p99 ms "
        "| cancelled | errors | wasted tokens (per cancelled) | server CPU s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['sessions']} | {r['completions_per_s']:.2f} "
            f"| {percentile_cells(r['first_text_ms'])} | {percentile_cells(r['total_ms'])} "
            f"| {r['cancelled_fraction']:.0%} | {sum(r['errors'].values())} "
            f"| {r['wasted_tokens']:.0f} ({r.get('wasted_tokens_per_cancelled', 0):.2f}) "
            f"| {r['server_cpu_s']:.1f} "
            f"| {r['server_peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def ratios(
    ours: list[dict[str, object]], theirs: list[dict[str, object]], name: str, peer: str
) -> str:
    """Ours over theirs per point, measured in one run: below 1 is faster, above 1 more."""
    lines = [
        f"| sessions | total p50 {name} / {peer} | first text p50 | completions/s "
        f"| completed ({name}, {peer}) | errors ({name}, {peer}) |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in zip(ours, theirs, strict=True):

        def ratio(key: str, a=a, b=b) -> str:
            mine, peers = (a[key] or {}).get("p50"), (b[key] or {}).get("p50")
            return f"{mine / peers:.2f}" if mine and peers else "-"

        per_s = a["completions_per_s"] / b["completions_per_s"] if b["completions_per_s"] else 0
        lines.append(
            f"| {a['sessions']} | {ratio('total_ms')} | {ratio('first_text_ms')} | {per_s:.2f} "
            f"| {a['completions']}, {b['completions']} "
            f"| {sum(a['errors'].values())}, {sum(b['errors'].values())} |"
        )
    return "\n".join(lines)


def source_files(directory: Path) -> tuple[Path, ...]:
    files = tuple(sorted(p for p in directory.glob("*.py") if p.stat().st_size < 200_000))
    if not files:
        raise ValueError(f"no .py files in {directory}")
    return files


def save(results: list[dict[str, object]], path: Path) -> None:
    """JSON, a Markdown table and an SVG plot of each latency's percentiles per concurrency."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    path.with_suffix(".md").write_text(markdown(results) + "\n")
    sessions = [int(r["sessions"]) for r in results]
    for key, title in (("total_ms", "to the final chunk"), ("first_text_ms", "to first text")):
        series = {p: [(r[key] or {}).get(p) for r in results] for p in ("p50", "p90", "p99")}
        chart = latency_chart(f"Completion latency {title}, ms", sessions, series)
        path.with_name(f"{path.stem}_{key.removesuffix('_ms')}.svg").write_text(chart)
