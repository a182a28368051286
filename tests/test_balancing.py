"""Two ghostpen replicas behind a real nginx (deploy/nginx/ghostpen.conf), both on the remote
engine to one llama.cpp server and writing telemetry to one PostgreSQL: an editor stays on its
replica, and when that replica is killed it reconnects through nginx to the other, sends its
files again and goes on."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ghostpen.benchmarks.server_process import ServerProcess, free_port, running_server
from ghostpen.benchmarks.upstreams import llama_servers
from ghostpen.server.model_store import REGISTRY, models_dir
from ghostpen.server.settings import Settings
from tests.editor_client.test_client import CODE, new_client, until
from tests.postgres import drop_database, start_database

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "ghostpen.conf"
MAIN = """pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{}}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    include ghostpen/ghostpen.conf;
}}
"""


@contextlib.contextmanager
def nginx(tmp: Path, port: int, replicas: list[str]) -> Iterator[None]:
    """nginx on `port` with the shipped configuration, the replicas listed beside it."""
    conf = tmp / "ghostpen"
    conf.mkdir()
    shipped = SHIPPED.read_text()
    assert "listen 50151 http2;" in shipped
    (conf / "ghostpen.conf").write_text(shipped.replace("listen 50151", f"listen 127.0.0.1:{port}"))
    lines = "".join(f"server {r} max_fails=1 fail_timeout=10s;\n" for r in replicas)
    (conf / "ghostpen-replicas.conf").write_text(lines)
    (tmp / "nginx.conf").write_text(MAIN.format(prefix=tmp))
    command = ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen([*command, "-g", "daemon off;"])
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def completions_served(replica: ServerProcess) -> float:
    """ghostpen_completions_total summed over its labels, from the replica's /metrics."""
    with urllib.request.urlopen(f"{replica.web}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(v) for v in re.findall(r"^ghostpen_completions_total\{.*\} (\S+)$", text, re.M)
    )


@pytest.mark.system
async def test_an_editor_stays_on_its_replica_and_moves_through_nginx_when_it_dies(
    settings: Settings, tmp_path: Path
) -> None:
    model = models_dir(settings.cache_dir) / REGISTRY[settings.engine.model].filename
    database, name = start_database()
    front = free_port()
    try:
        with llama_servers(1, model, settings.cache_dir) as (upstream,):
            environ = {
                "GHOSTPEN_HOME": str(settings.cache_dir),
                "GHOSTPEN_UPSTREAMS": upstream.url,
                "GHOSTPEN_DATABASE": database,
                "GHOSTPEN_TOKENS_FILE": str(tmp_path / "tokens.json"),  # none: no auth
            }
            with contextlib.ExitStack() as stack:
                replicas = [
                    stack.enter_context(
                        running_server("--engine", "remote", env=environ, own_group=True)
                    )
                    for _ in range(2)
                ]
                stack.enter_context(nginx(tmp_path, front, [r.address for r in replicas]))
                client, _ = new_client(front)
                client.files.open("math.py", "python", CODE, 1)
                client.start()
                try:
                    await until(lambda: client.connected)
                    for _ in range(3):
                        completion = await client.complete("math.py", len(CODE))
                        assert completion is not None and completion.text.strip()
                    served = [completions_served(r) for r in replicas]
                    assert sorted(served) == [0, 3]  # all three on one replica
                    home, other = sorted(replicas, key=completions_served, reverse=True)

                    os.killpg(home.process.pid, signal.SIGKILL)
                    await until(lambda: client.sessions == 2 and client.connected)
                    completion = await client.complete("math.py", len(CODE))
                    assert completion is not None and completion.text.strip()
                    assert completions_served(other) == 1
                finally:
                    await client.close()
        with psycopg.connect(database) as connection:
            stored = connection.execute("SELECT count(*) FROM completions").fetchone()
        assert stored == (4,)  # both replicas' completions, in the one database
    finally:
        drop_database(name)
