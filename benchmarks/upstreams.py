"""llama.cpp's own servers (`llama-server`, built by the setup) as the remote engine's upstreams,
for `ghostpen bench --llama-servers N` and the tests. Each gets its own share of the cores."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ghostpen.benchmarks.server_process import free_port
from ghostpen.server.engines.llama_server import default_binary

START_TIMEOUT_S = 120.0


@dataclass
class LlamaServer:
    url: str
    process: subprocess.Popen[bytes]

    def metric(self, name: str) -> float:
        """A value of its Prometheus /metrics, e.g. `requests_processing`."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        found = re.search(rf"^llamacpp:{name} (\S+)$", text, re.MULTILINE)
        if found is None:
            raise KeyError(f"llama-server has no metric {name}")
        return float(found.group(1))

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        self.process.kill()
        self.process.wait()


@contextlib.contextmanager
def llama_servers(
    count: int, model: Path, cache_dir: Path, threads: int = 1, slots: int = 2
) -> Iterator[list[LlamaServer]]:
    """`count` servers of `threads` compute threads and `slots` sessions' KV caches each."""
    servers: list[LlamaServer] = []
    try:
        for _ in range(count):
            servers.append(_start(model, cache_dir, threads, slots))
        yield servers
    finally:
        for server in servers:
            server.kill()


def _start(model: Path, cache_dir: Path, threads: int, slots: int) -> LlamaServer:
    port = free_port()
    process = subprocess.Popen(
        [
            str(default_binary(cache_dir)), "-m", str(model), "--host", "127.0.0.1",
            "--port", str(port), "-c", str(2048 * slots), "-np", str(slots), "--no-kv-unified",
            "-fa", "off", "--no-repack", "-t", str(threads), "-tb", str(threads), "--no-webui",
            "--metrics",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = LlamaServer(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited {process.returncode} at start")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError),
            urllib.request.urlopen(f"{server.url}/health", timeout=5) as response,
        ):
            if response.status == 200:
                return server
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"llama-server did not answer in {START_TIMEOUT_S:.0f} s")
