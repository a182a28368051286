"""The telemetry store on both databases: SQLite here, PostgreSQL in the system tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostpen.server.telemetry.store import Store
from tests.postgres import drop_database, start_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        opened = Store.open(str(tmp_path / "t.db"), tmp_path)
        yield opened
        opened.close()
        return
    url, name = start_database()
    opened = Store.open(url, tmp_path)
    yield opened
    opened.close()
    drop_database(name)
