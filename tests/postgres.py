"""A real PostgreSQL for tests: Debian's cluster, started if it is not running."""

from __future__ import annotations

import subprocess
import time
import uuid


def _psql(sql: str, database: str = "postgres") -> None:
    subprocess.run(
        ["su", "postgres", "-c", f'psql -q -d {database} -c "{sql}"'],
        check=True,
        capture_output=True,
        timeout=60,
    )


def start_database() -> tuple[str, str]:
    """Start the cluster, create a throwaway database; returns its URL and its name."""
    version, cluster = subprocess.run(
        ["pg_lsclusters", "-h"], check=True, capture_output=True, text=True
    ).stdout.split()[:2]
    subprocess.run(["pg_ctlcluster", version, cluster, "start"], capture_output=True, timeout=60)
    for _ in range(100):
        if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"]).returncode == 0:
            break
        time.sleep(0.1)
    name = f"ghostpen_test_{uuid.uuid4().hex[:8]}"
    _psql(
        "DO \\$\\$ BEGIN CREATE ROLE ghostpen LOGIN PASSWORD 'ghostpen'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END \\$\\$"
    )
    _psql(f"CREATE DATABASE {name} OWNER ghostpen")
    return f"postgresql://ghostpen:ghostpen@127.0.0.1:5432/{name}", name


def drop_database(name: str) -> None:
    _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
