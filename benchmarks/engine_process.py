"""The engine in its own process, measured: what a token costs to cross to the server, how long a
restart after a crash takes, and how each thread count holds up when the machine is busy.

    python -m ghostpen.benchmarks.engine_process [--requests 30] [--threads 1,2] [--out FILE.json]

Latency is single-line completions of real prompts (the stdlib's json package, as `ghostpen bench`
types), read warm (the session's prefix cached, as on a keystroke) with one request at a time.
"Busy" runs one other process spinning on a core beside the server, as an editor or a compiler
would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import uvloop

from ghostpen.benchmarks.corpus import percentiles
from ghostpen.benchmarks.load import DEFAULT_FILES
from ghostpen.server.engines.base import EngineRequest
from ghostpen.server.engines.supervisor import SupervisedEngine
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import Settings

TEMPLATE = "<|fim_prefix|>{prefix}<|fim_suffix|>\n<|fim_middle|>"


def prompts(count: int) -> list[str]:
    """Cursor positions at line ends in real files, each with the ~60 lines before it."""
    found = []
    for path in sorted(DEFAULT_FILES.glob("*.py")):
        lines = path.read_text().splitlines(keepends=True)
        for end in range(40, len(lines), 23):
            if lines[end].strip():
                head = "".join(lines[max(0, end - 60) : end]) + lines[end].split("(")[0]
                found.append(TEMPLATE.format(prefix=head))
    return found[:count]


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


async def timed(engine: SupervisedEngine, request: EngineRequest) -> float:
    start = time.perf_counter()
    async for _ in engine.generate(request):
        pass
    return time.perf_counter() - start


async def latency(engine: SupervisedEngine, texts: list[str], key: str) -> list[float]:
    """Warm single-line completions: each prompt read once, then asked again one token on."""
    totals = []
    for i, text in enumerate(texts):
        await timed(engine, EngineRequest(f"{key}-{i}-cold", text, 1, key))
        totals.append(1000 * await timed(engine, EngineRequest(f"{key}-{i}", text + "(", 16, key)))
    return totals


async def ipc_overhead(engine: SupervisedEngine, texts: list[str], metrics: Metrics) -> dict:
    """Upper bounds of the per-token crossing time, from the server's own histogram."""
    before = _histogram_counts(metrics)
    for i, text in enumerate(texts):
        await timed(engine, EngineRequest(f"ipc-{i}", text, 32, "ipc"))
    after = _histogram_counts(metrics)
    deltas = {bound: after[bound] - before.get(bound, 0) for bound in after}
    total = deltas[float("inf")]
    cumulative = sorted(deltas.items())
    quantile = {}
    for q in (0.5, 0.9, 0.99):
        quantile[f"p{round(q * 100)}_ms_at_most"] = next(
            bound * 1000 for bound, count in cumulative if count >= q * total
        )
    return {"deltas": total, **quantile}


def _histogram_counts(metrics: Metrics) -> dict[float, float]:
    counts = {}
    for family in metrics.registry.collect():
        if family.name != "ghostpen_engine_ipc_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                counts[float(sample.labels["le"])] = sample.value
    return counts


async def restart_time(engine: SupervisedEngine) -> float:
    back = asyncio.Event()
    engine.watch(lambda serving: serving and back.set())
    start = time.perf_counter()
    os.kill(engine.pid, signal.SIGKILL)
    await back.wait()
    return time.perf_counter() - start


async def run(args: argparse.Namespace) -> dict[str, object]:
    settings = Settings.load({"engine": "llama.cpp"})
    texts = prompts(args.requests)
    results: dict[str, object] = {"requests": len(texts), "cpus": os.cpu_count()}
    for threads in args.threads:
        engine_settings = dataclasses.replace(settings.engine, threads=threads)
        metrics = Metrics()
        engine = await SupervisedEngine.start(engine_settings, settings.cache_dir, metrics)
        try:
            quiet = await latency(engine, texts, f"quiet-{threads}")
            with busy_core():
                busy = await latency(engine, texts, f"busy-{threads}")
            entry = {
                "quiet_ms": percentiles(quiet),
                "busy_ms": percentiles(busy),
                "busy_over_quiet_p50": percentiles(busy)["p50"] / percentiles(quiet)["p50"],
            }
            if threads == args.threads[0]:
                entry["ipc_per_token"] = await ipc_overhead(engine, texts, metrics)
                with busy_core():
                    entry["ipc_per_token_busy"] = await ipc_overhead(engine, texts, metrics)
                entry["restart_after_sigkill_s"] = await restart_time(engine)
            results[f"threads={threads}"] = entry
            print(json.dumps({f"threads={threads}": entry}), flush=True)
        finally:
            await engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--threads", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = uvloop.run(run(args))
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
