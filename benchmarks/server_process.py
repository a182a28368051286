"""Start `ghostpen serve` as a child process for a benchmark, and stop it afterwards."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class ServerProcess:
    address: str
    process: subprocess.Popen[str]
    web: str  # http://host:port serving /metrics and /dashboard

    def usage(self) -> tuple[float, int]:
        return process_usage(self.process.pid)


def process_usage(pid: int) -> tuple[float, int]:
    """CPU seconds a process and its live descendants (the engine process) used so far, and the
    sum of their peak resident memory in bytes (Linux /proc)."""
    cpu_s, peak = 0.0, 0
    for member in _tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{member}/status").read_text()
        except FileNotFoundError:  # ended meanwhile
            continue
        cpu_s += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        peak += int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
    return cpu_s, peak


def _tree(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        member = pending.pop()
        found.append(member)
        threads: list[Path] = []
        with contextlib.suppress(FileNotFoundError):
            threads = list(Path(f"/proc/{member}/task").iterdir())
        for thread in threads:
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                pending.extend(int(c) for c in (thread / "children").read_text().split())
    return found


@contextlib.contextmanager
def running_server(
    *serve_args: str,
    env: dict[str, str] | None = None,
    port: int = 0,
    stderr: IO[str] | int = subprocess.DEVNULL,
    own_group: bool = False,
) -> Iterator[ServerProcess]:
    """Yields once the server printed that it serves; terminates it afterwards if still alive.
    `own_group` starts it in a process group of its own, as a terminal would, for a Ctrl-C."""
    port = port or free_port()
    command = [
        sys.executable,
        "-m",
        "ghostpen",
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *serve_args,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=own_group,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("ghostpen serving"):
                break
        else:
            raise RuntimeError(f"server exited with {process.wait()} before serving")
        web = re.search(r"(https?://\S+)/metrics", line)
        yield ServerProcess(f"127.0.0.1:{port}", process, web.group(1) if web else "")
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)
