"""What hostile clients cost a real server (`ghostpen serve`, llama.cpp engine): memory held by
idle sessions, the event loop's stalls while others send the largest inputs the limits allow, and
how long a SIGTERM drain takes.

    python -m ghostpen.benchmarks.hardening --sessions 5000 --hostile-s 20

The loop's stalls are read twice while hostile clients (other processes) send Complete calls with
`max_context_files` files as large as a message allows, and Sessions holding `max_files` files of
`max_file_bytes`: by the server itself (`ghostpen_event_loop_lag_seconds`), and as a probe client
sees them (a health check every `PROBE_S` from a process of its own, which on 2 cores also waits
for a core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ghostpen.benchmarks.corpus import percentiles
from ghostpen.benchmarks.server_process import running_server
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.settings import LimitSettings, ServerSettings

PROBE_S = 0.01
DRAIN_SESSIONS = 100  # idle sessions open at the SIGTERM
# Attackers are on other machines in a deployment: here they yield the CPU to the server.
ATTACKER_NICENESS = int(os.environ.get("ATTACKER_NICENESS", "10"))
SESSIONS_PER_CONNECTION = 10
LIMITS = LimitSettings()
MESSAGE_BYTES = ServerSettings().max_message_bytes
SOURCE = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(60_000))
# A Complete call's files share one message; a Session's files come one to a message.
INLINE_FILE = SOURCE[: MESSAGE_BYTES // LIMITS.max_context_files - 4096]
SESSION_FILE = SOURCE[: LIMITS.max_file_bytes]


def loop_lag(web: str) -> dict[float, float]:
    """The server's own event-loop lag histogram (`ghostpen_event_loop_lag_seconds`), by bound."""
    with urllib.request.urlopen(f"{web}/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.findall(r'ghostpen_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', text)
    return {float(bound): float(count) for bound, count in found}


def lag_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """Samples between two readings: how many, the share over 10 ms, and the bound below
    which 99% fell."""
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = counts[float("inf")]
    p99 = next(bound for bound in sorted(counts) if counts[bound] >= 0.99 * total)
    return {"samples": total, "over_10ms": 1 - counts[0.01] / total, "p99_at_most_ms": p99 * 1000}


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def process_tree(pid: int) -> dict[int, list[str]]:
    """/proc/N/stat fields (after the name) of the process and all its descendants (engine,
    chunker, context, store)."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
    tree, grew = {pid}, True
    while grew:
        found = {child for child, fields in stats.items() if int(fields[1]) in tree} - tree
        tree |= found
        grew = bool(found)
    return {member: stats[member] for member in tree}


def tree_rss_mb(pid: int) -> float:
    return (
        sum(int(fields[21]) * os.sysconf("SC_PAGE_SIZE") for fields in process_tree(pid).values())
        / 2**20
    )


def tree_cpu_s(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    return sum((int(f[11]) + int(f[12])) / ticks for f in process_tree(pid).values())


async def idle_sessions(address: str, count: int) -> list[grpc.aio.Channel]:
    """`count` sessions, each welcomed, then left open and silent; SESSIONS_PER_CONNECTION to a
    connection (an editor opens one connection, a window one session)."""
    channels = []
    for first in range(0, count, SESSIONS_PER_CONNECTION):
        channel = grpc.aio.insecure_channel(address)
        channels.append(channel)
        stub = pb_grpc.CompletionStub(channel)
        calls = [stub.Session() for _ in range(min(SESSIONS_PER_CONNECTION, count - first))]
        for call in calls:
            await call.write(pb.ClientMessage(hello=pb.Hello(workspace="idle")))
        for call in calls:
            assert (await call.read()).HasField("welcome")
    return channels


async def oversized_sessions(address: str, count: int) -> list[grpc.aio.Channel]:
    """`count` sessions, each sent `max_files` files of `max_file_bytes` (the server keeps what
    `max_session_bytes` allows), then left open; one request each, so the server chunks."""
    channels = []
    for index in range(count):
        channel = grpc.aio.insecure_channel(address)
        channels.append(channel)
        call = pb_grpc.CompletionStub(channel).Session()
        await call.write(pb.ClientMessage(hello=pb.Hello(workspace="oversized")))
        await call.read()
        for i in range(LIMITS.max_files):
            text = SESSION_FILE[:-16] + f"#{index:06d}/{i:06d}\n"
            update = pb.FileUpdate(path=f"s{i}.py", version=1, text=text.encode())
            await call.write(pb.ClientMessage(file_update=update))
            await call.read()
    return channels


async def settled_rss_mb(pid: int, timeout_s: float = 900.0) -> float:
    """RSS once the server and its children are idle (the chunker has caught up): under 0.1 s
    of CPU in 3 s, all processes together."""
    end = time.monotonic() + timeout_s
    last = tree_cpu_s(pid)
    while time.monotonic() < end:
        await asyncio.sleep(3.0)
        now = tree_cpu_s(pid)
        if now - last < 0.1:
            return rss_mb(pid)
        last = now
    raise TimeoutError(f"still busy after {timeout_s} s")


async def probe(address: str, seconds: float) -> list[float]:
    """Round trips of a health check, every PROBE_S, in milliseconds."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest())
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest())
            samples.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(PROBE_S)
        return samples


def hostile(address: str, seconds: float, kind: str, outcomes: multiprocessing.Queue) -> None:
    """Runs in a process of its own: the largest inputs the limits allow, back to back. Puts
    how its rounds ended, by status, on `outcomes`."""

    async def run() -> Counter[str]:
        ended: Counter[str] = Counter()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.CompletionStub(channel)
            end = time.monotonic() + seconds
            round_ = 0
            while time.monotonic() < end:
                round_ += 1
                try:
                    await one_round(stub, kind, f"#{round_:06d}\n")
                    ended["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    ended[error.code().name] += 1
        return ended

    os.nice(ATTACKER_NICENESS)
    outcomes.put((kind, dict(asyncio.run(run()))))


async def one_round(stub: pb_grpc.CompletionStub, kind: str, mark: str) -> None:
    """One hostile call; `mark` makes the content new each round, so no cache helps."""
    if kind == "complete":
        text = INLINE_FILE[: -len(mark)] + mark
        files = [
            pb.ContextFile(path=f"c{i}.py", text=text.encode())
            for i in range(LIMITS.max_context_files)
        ]
        request = pb.CompleteRequest(
            request_id="h",
            path="a.py",
            prefix=b"x = ",
            context_files=files,
            max_tokens=1,
        )
        async for _ in stub.Complete(request):
            pass
    else:
        text = SESSION_FILE[: -len(mark)] + mark
        call = stub.Session()
        for i in range(LIMITS.max_files):
            update = pb.FileUpdate(path=f"s{i}.py", version=1, text=text.encode())
            await call.write(pb.ClientMessage(file_update=update))
        request = pb.CompletionRequest(
            request_id="h", path="s0.py", version=1, cursor_offset=4, max_tokens=1
        )
        await call.write(pb.ClientMessage(completion_request=request))
        await call.done_writing()
        async for _ in call:
            pass


async def measure(
    sessions: int, hostile_s: float, kinds: list[str], oversized: int
) -> dict[str, object]:
    room = str(max(sessions, DRAIN_SESSIONS) + 10)
    env = {"GHOSTPEN_MAX_SESSIONS": room, "GHOSTPEN_MAX_SESSIONS_PER_USER": room}
    result: dict[str, object] = {}
    with running_server("--engine", "llama.cpp", env=env) as server:
        pid = server.process.pid
        result["rss_start_mb"] = rss_mb(pid)
        held = await idle_sessions(server.address, sessions)
        result[f"rss_{sessions}_idle_sessions_mb"] = rss_mb(pid)
        result["rss_per_idle_session_kb"] = (
            (result[f"rss_{sessions}_idle_sessions_mb"] - result["rss_start_mb"]) * 1024 / sessions
        )
        for channel in held:
            await channel.close()
        quiet = loop_lag(server.web)
        result["quiet_probe_ms"] = percentiles(await probe(server.address, 5.0))
        hostile_from = loop_lag(server.web)
        result["quiet_loop_lag"] = lag_summary(quiet, hostile_from)
        context = multiprocessing.get_context("spawn")
        outcomes = context.Queue()
        attackers = [
            context.Process(target=hostile, args=(server.address, hostile_s, kind, outcomes))
            for kind in kinds
        ]
        for attacker in attackers:
            attacker.start()
        samples = await probe(server.address, hostile_s)
        result["hostile_rounds"] = dict(outcomes.get(timeout=120) for _ in attackers)
        for attacker in attackers:
            attacker.join()
        result["hostile_probe_ms"] = percentiles(samples)
        result["hostile_loop_lag"] = lag_summary(hostile_from, loop_lag(server.web))
        result["rss_after_hostile_mb"] = rss_mb(pid)
        result["rss_peak_mb"] = (
            int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
            / 1024
        )
        if oversized:
            before, before_tree = rss_mb(pid), tree_rss_mb(pid)
            held = await oversized_sessions(server.address, oversized)
            result[f"rss_{oversized}_oversized_sessions_mb"] = await settled_rss_mb(pid)
            result["rss_per_oversized_session_mb"] = (
                result[f"rss_{oversized}_oversized_sessions_mb"] - before
            ) / oversized
            result["all_processes_rss_growth_mb"] = tree_rss_mb(pid) - before_tree
            for channel in held:
                await channel.close()
            result["rss_after_they_close_mb"] = await settled_rss_mb(pid)
        held = await idle_sessions(server.address, DRAIN_SESSIONS)
        start = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        server.process.wait(timeout=60)
        result[f"drain_with_{DRAIN_SESSIONS}_idle_sessions_s"] = time.monotonic() - start
        result["exit_code"] = server.process.returncode
        for channel in held:
            await channel.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--hostile-s", type=float, default=20.0)
    parser.add_argument(
        "--hostile",
        nargs="+",
        choices=("complete", "session"),
        default=["complete", "session"],
        help="the hostile clients, a process each",
    )
    parser.add_argument("--oversized", type=int, default=100, help="sessions filled to the limit")
    args = parser.parse_args()
    measured = measure(args.sessions, args.hostile_s, args.hostile, args.oversized)
    print(json.dumps(asyncio.run(measured), indent=2))


if __name__ == "__main__":
    main()
