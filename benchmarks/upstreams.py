"""llama.cpp's own servers (`llama-server`, built by the setup) as the remote engine's upstreams,
for `ghostpen bench --llama-servers N` and the tests. Each gets its own share of the cores."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ghostpen.server.engines.llama_server import default_binary

START_TIMEOUT_S = 120.0


@dataclass
class LlamaServer:
    url: str
    process: asyncio.subprocess.Process

    async def metric(self, name: str) -> float:
        """A value of its Prometheus /metrics, e.g. `requests_processing`."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/metrics") as response:
            text = await response.text()
        found = re.search(rf"^llamacpp:{name} (\S+)$", text, re.MULTILINE)
        if found is None:
            raise KeyError(f"llama-server has no metric {name}")
        return float(found.group(1))

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


@contextlib.asynccontextmanager
async def llama_servers(
    count: int, model: Path, cache_dir: Path, threads: int = 1, slots: int = 2
) -> AsyncIterator[list[LlamaServer]]:
    """`count` servers of `threads` compute threads and `slots` sessions' KV caches each."""
    servers: list[LlamaServer] = []
    try:
        for _ in range(count):
            servers.append(await _start(model, cache_dir, threads, slots))
        yield servers
    finally:
        for server in servers:
            server.kill()
            await server.process.wait()


async def _start(model: Path, cache_dir: Path, threads: int, slots: int) -> LlamaServer:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        str(default_binary(cache_dir)), "-m", str(model), "--host", "127.0.0.1",
        "--port", str(port), "-c", str(2048 * slots), "-np", str(slots), "--no-kv-unified",
        "-fa", "off", "--no-repack", "-t", str(threads), "-tb", str(threads), "--no-webui",
        "--metrics",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    server = LlamaServer(f"http://127.0.0.1:{port}", process)
    async with aiohttp.ClientSession() as http, asyncio.timeout(START_TIMEOUT_S):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"llama-server exited {process.returncode} at start")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{server.url}/health") as response:
                    if response.status == 200:
                        return server
            await asyncio.sleep(0.1)
