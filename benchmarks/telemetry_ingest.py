"""Telemetry ingestion throughput through the batched writer, on SQLite and PostgreSQL.

Many clients submit events concurrently (each awaits its commit, as the gRPC handlers do); the
writer folds whatever is queued into one transaction. Also: how long a lone completion record takes
to commit through the store process, which a final chunk waits for (`record_commit_wait_ms`).

    python -m ghostpen.benchmarks.telemetry_ingest --events 100000 --postgres postgresql://...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from ghostpen.benchmarks.corpus import percentiles
from ghostpen.server.telemetry.records import CompletionRecord, TelemetryEvent
from ghostpen.server.telemetry.store import Store
from ghostpen.server.telemetry.store_process import StoreProcess
from ghostpen.server.telemetry.writer import TelemetryWriter


async def ingest(database: str, events: int, per_submit: int, clients: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        store = StoreProcess(
            "writer", database or str(Path(scratch) / "bench.db"), Path(scratch), 1.0
        )
        await store.start()
        writer = TelemetryWriter(store, batch_max=5000, known_max=100_000, retry_s=1.0)
        writer.start()
        completions = [_completion(f"c{i}") for i in range(1000)]
        for completion in completions:
            writer.record(completion)
        batches = [
            [
                TelemetryEvent(f"e{b}-{i}", f"c{(b * per_submit + i) % 1000}", "shown", 0, 0)
                for i in range(per_submit)
            ]
            for b in range(events // per_submit)
        ]
        queue: asyncio.Queue[list[TelemetryEvent]] = asyncio.Queue()
        for batch in batches:
            queue.put_nowait(batch)

        async def client() -> None:
            while not queue.empty():
                await writer.submit(queue.get_nowait())

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - start
        [(stored,)] = await store.call(Store.query, "SELECT COUNT(*) FROM events")
        await writer.close()
    return {"events": stored, "seconds": seconds, "events_per_s": stored / seconds}


async def record_commit_ms(records: int) -> dict[str, float]:
    """One record at a time, each awaited: a quiet server's final chunk."""
    with tempfile.TemporaryDirectory() as scratch:
        store = StoreProcess("writer", str(Path(scratch) / "bench.db"), Path(scratch), 1.0)
        await store.start()
        writer = TelemetryWriter(store, batch_max=5000, known_max=100_000, retry_s=1.0)
        writer.start()
        samples = []
        for i in range(records):
            started = time.perf_counter()
            await writer.record(_completion(f"r{i}"))
            samples.append((time.perf_counter() - started) * 1000)
        await writer.close()
    return percentiles(samples)


async def run(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {"per_submit": args.per_submit, "clients": args.clients}
    results["record_commit_ms"] = await record_commit_ms(args.records)
    results["sqlite"] = await ingest("", args.events, args.per_submit, args.clients)
    if args.postgres:
        results["postgresql"] = await ingest(
            args.postgres, args.events, args.per_submit, args.clients
        )
    return results


def _completion(completion_id: str) -> CompletionRecord:
    return CompletionRecord(
        completion_id,
        0,
        "m",
        "t@v1",
        "h",
        "llama.cpp",
        "python",
        "single_line",
        500,
        8,
        200.0,
        300.0,
        "line_end",
        20,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--per-submit", type=int, default=20)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--postgres", default="")
    parser.add_argument("--records", type=int, default=500)
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
