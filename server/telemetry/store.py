"""The telemetry database: SQLite (WAL) embedded by default, PostgreSQL for teams.

One schema, migrations applied at start, the same SQL on both (written with `?` placeholders,
turned into `%s` for psycopg). Writes come from one thread, the batched writer. A database error
leaves this module as StoreUnavailable, raised from the driver's own error.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from ghostpen.server.errors import StoreUnavailable
from ghostpen.server.telemetry.records import (
    CAPTURE_COLUMNS,
    EVENT_COLUMNS,
    CaptureRecord,
    CompletionRecord,
    TelemetryEvent,
    corrections,
)

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE completions (
        completion_id TEXT PRIMARY KEY,
        created_ms BIGINT NOT NULL,
        model TEXT NOT NULL,
        template_id TEXT NOT NULL,
        template_hash TEXT NOT NULL,
        engine TEXT NOT NULL,
        language TEXT NOT NULL,
        mode TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        first_token_ms DOUBLE PRECISION NOT NULL,
        total_ms DOUBLE PRECISION NOT NULL,
        finish TEXT NOT NULL,
        chars INTEGER NOT NULL
    );
    CREATE INDEX completions_created ON completions (created_ms);
    CREATE TABLE events (
        event_id TEXT PRIMARY KEY,
        completion_id TEXT NOT NULL REFERENCES completions (completion_id),
        kind TEXT NOT NULL,
        client_ms BIGINT NOT NULL,
        received_ms BIGINT NOT NULL,
        ms_since_shown INTEGER,
        accepted_chars INTEGER,
        unit TEXT,
        reason TEXT,
        after_s INTEGER,
        fraction DOUBLE PRECISION,
        present INTEGER,
        file_closed INTEGER
    );
    CREATE INDEX events_completion ON events (completion_id);
    """,
    # Owners (server/identity.py): rows from before belong to the one local user. Event ids
    # become unique per user, so one user's ids cannot shadow another's.
    """
    ALTER TABLE completions ADD COLUMN user_id TEXT NOT NULL DEFAULT 'local';
    ALTER TABLE completions ADD COLUMN team TEXT NOT NULL DEFAULT '';
    ALTER TABLE completions ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX completions_owner ON completions (tenant, user_id, created_ms);
    CREATE TABLE events_by_user (
        event_id TEXT NOT NULL,
        completion_id TEXT NOT NULL REFERENCES completions (completion_id),
        kind TEXT NOT NULL,
        client_ms BIGINT NOT NULL,
        received_ms BIGINT NOT NULL,
        ms_since_shown INTEGER,
        accepted_chars INTEGER,
        unit TEXT,
        reason TEXT,
        after_s INTEGER,
        fraction DOUBLE PRECISION,
        present INTEGER,
        file_closed INTEGER,
        user_id TEXT NOT NULL,
        PRIMARY KEY (user_id, event_id)
    );
    INSERT INTO events_by_user
        SELECT e.*, COALESCE(c.user_id, 'local')
        FROM events e LEFT JOIN completions c ON c.completion_id = e.completion_id;
    DROP TABLE events;
    ALTER TABLE events_by_user RENAME TO events;
    CREATE INDEX events_completion ON events (completion_id);
    """,
    # The show gate: its verdict on each completion, and the confidence it judged, so that its
    # precision can be measured on real traffic in shadow mode before it withholds anything.
    """
    ALTER TABLE completions ADD COLUMN confidence DOUBLE PRECISION;
    ALTER TABLE completions ADD COLUMN withheld TEXT NOT NULL DEFAULT '';
    """,
    # Text kept with consent for training (capture_text): a completion's prompt inputs and
    # suggestion, and the developer's corrections of it. Deleted per user or tenant, and when
    # older than capture_retention_days.
    """
    CREATE TABLE captures (
        completion_id TEXT PRIMARY KEY REFERENCES completions (completion_id),
        created_ms BIGINT NOT NULL,
        user_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        template_id TEXT NOT NULL,
        repo TEXT NOT NULL,
        path TEXT NOT NULL,
        language TEXT NOT NULL,
        prefix TEXT NOT NULL,
        suffix TEXT NOT NULL,
        healed TEXT NOT NULL,
        context TEXT NOT NULL,
        shown TEXT NOT NULL
    );
    CREATE INDEX captures_owner ON captures (tenant, user_id);
    CREATE INDEX captures_created ON captures (created_ms);
    CREATE TABLE corrections (
        completion_id TEXT NOT NULL REFERENCES captures (completion_id),
        after_s INTEGER NOT NULL,
        text TEXT NOT NULL,
        received_ms BIGINT NOT NULL,
        PRIMARY KEY (completion_id, after_s)
    );
    """,
    # The model registry (server/training/registry.py): each version the flywheel made, with its
    # lineage and its scores, and each promotion to the default, with who made it and why.
    """
    CREATE TABLE model_versions (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        base TEXT NOT NULL,
        path TEXT NOT NULL,
        data_hash TEXT NOT NULL,
        steps INTEGER NOT NULL,
        train_tokens BIGINT NOT NULL,
        quantization TEXT NOT NULL,
        scores TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        note TEXT NOT NULL
    );
    CREATE TABLE model_promotions (
        promoted_ms BIGINT NOT NULL,
        name TEXT NOT NULL,
        by_user TEXT NOT NULL,
        forced INTEGER NOT NULL,
        evidence TEXT NOT NULL
    );
    """,
    # Experiments (server/experiments.py): arms served side by side, at most one experiment
    # running; who started, stopped and promoted them; each completion's experiment and arm.
    # Prompt templates registered beside the built-in files (server/prompts.py), immutable.
    """
    CREATE TABLE experiments (
        name TEXT PRIMARY KEY,
        arms TEXT NOT NULL,
        status TEXT NOT NULL,
        started_ms BIGINT NOT NULL,
        started_by TEXT NOT NULL,
        note TEXT NOT NULL
    );
    CREATE UNIQUE INDEX experiments_one_running ON experiments (status)
        WHERE status = 'running';
    CREATE TABLE experiment_actions (
        experiment TEXT NOT NULL REFERENCES experiments (name),
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE TABLE prompt_versions (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        content TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        parent TEXT NOT NULL,
        author TEXT NOT NULL,
        note TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        PRIMARY KEY (name, version)
    );
    ALTER TABLE completions ADD COLUMN experiment TEXT NOT NULL DEFAULT '';
    ALTER TABLE completions ADD COLUMN arm TEXT NOT NULL DEFAULT '';
    CREATE INDEX completions_arm ON completions (experiment, arm);
    """,
    # Training exports that hold captured text (server/training/export.py): deleting text
    # (per user, per tenant, past retention) forgets the exports holding it too.
    """
    CREATE TABLE exports (
        path TEXT PRIMARY KEY,
        created_ms BIGINT NOT NULL,
        oldest_ms BIGINT NOT NULL,
        owners TEXT NOT NULL,
        forgotten_ms BIGINT
    );
    """,
    # A model version is served in the prompt template it was tuned in.
    """
    ALTER TABLE model_versions ADD COLUMN template TEXT NOT NULL DEFAULT '';
    """,
    # What was deleted stays deleted: text captured before a deletion that reaches the store
    # after it (in a server's write queue then) is dropped. tenant '*': every tenant's; user_id
    # '': every user's of the tenant.
    """
    CREATE TABLE deletions (
        tenant TEXT NOT NULL,
        user_id TEXT NOT NULL,
        before_ms BIGINT NOT NULL,
        PRIMARY KEY (tenant, user_id)
    );
    """,
)
EXPORT_FILES = ("train.jsonl", "heldout.jsonl", "manifest.json")  # deleted when forgotten

Write = tuple[str, Sequence[Any]]  # a statement and its parameters
_COMPLETION_COLUMNS = [f.name for f in fields(CompletionRecord)]
_EVENT_COLUMNS = list(EVENT_COLUMNS)
_CORRECTION_COLUMNS = ["completion_id", "after_s", "text", "received_ms"]
_CAPTURE_CREATED, _CAPTURE_TENANT, _CAPTURE_USER = (
    CAPTURE_COLUMNS.index(name) for name in ("created_ms", "tenant", "user_id")
)


class Store:
    def __init__(self, connection: Any, postgres: bool) -> None:
        self._db = connection
        self._postgres = postgres
        if postgres:
            import psycopg

            self._errors: tuple[type[Exception], ...] = (psycopg.Error,)
        else:
            self._errors = (sqlite3.Error,)

    @classmethod
    def open(cls, database: str, cache_dir: Path) -> Store:
        """`database`: a postgresql:// URL, a SQLite file path, or "" for cache_dir/telemetry.db."""
        if database.startswith(("postgresql://", "postgres://")):
            import psycopg

            store = cls(psycopg.connect(database), postgres=True)
        else:
            path = Path(database) if database else cache_dir / "telemetry.db"
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")  # committed means on disk
            store = cls(connection, postgres=False)
        store.migrate()
        return store

    def migrate(self) -> None:
        self._run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        rows = self.query("SELECT MAX(version) FROM schema_version")
        current = rows[0][0] or 0
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            with self._transaction() as cursor:
                for statement in filter(str.strip, script.split(";")):
                    cursor.execute(statement)
                cursor.execute(self._sql("INSERT INTO schema_version VALUES (?)"), (version,))

    def write(
        self,
        completions: Sequence[CompletionRecord],
        events: Sequence[TelemetryEvent],
        captures: Sequence[CaptureRecord] = (),
    ) -> set[tuple[str, str]]:
        """Commit all in one transaction; returns the keys (user, event id) of events that
        were stored before. A key repeated within `events` is stored once, from its first
        occurrence. An event's correction (`final_text`) is kept only where its completion's
        text is: captured, and not deleted since."""
        return self.write_rows(
            [c.row() for c in completions],
            [e.row() for e in events],
            [c.row() for c in captures],
            corrections(events),
        )

    def write_rows(
        self,
        completions: Sequence[tuple],
        events: Sequence[tuple],
        captures: Sequence[tuple] = (),
        corrections: Sequence[tuple] = (),
    ) -> set[tuple[str, str]]:
        """`write` for rows (`.row()`, `corrections`), which cross to the store's process ten
        times cheaper than the dataclasses."""
        with self._mapped("store telemetry"):
            return self._write(completions, events, captures, corrections)

    def _write(
        self,
        completions: Sequence[tuple],
        events: Sequence[tuple],
        captures: Sequence[tuple],
        corrections: Sequence[tuple],
    ) -> set[tuple[str, str]]:
        before = self._existing_events([_event_key(row) for row in events])
        seen: set[tuple[str, str]] = set()
        fresh = []
        for row in events:
            key = _event_key(row)
            if key not in before and key not in seen:
                seen.add(key)
                fresh.append(_event_row(row))
        with self._transaction() as cursor:
            if completions:
                cursor.executemany(self._insert("completions", _COMPLETION_COLUMNS), completions)
            if captures:
                captures = self._not_deleted(cursor, captures)
            if captures:
                cursor.executemany(self._insert("captures", list(CAPTURE_COLUMNS)), captures)
            if fresh:
                cursor.executemany(self._insert("events", _EVENT_COLUMNS), fresh)
            if corrections:
                columns = ", ".join(_CORRECTION_COLUMNS)
                cursor.executemany(
                    self._sql(
                        f"INSERT INTO corrections ({columns}) SELECT ?, ?, ?, ? WHERE EXISTS "
                        "(SELECT 1 FROM captures WHERE completion_id = ?) ON CONFLICT DO NOTHING"
                    ),
                    [(*row, row[0]) for row in corrections],
                )
        return before

    def delete_captured(
        self, tenant: str, user_id: str | None = None, before_ms: int | None = None
    ) -> tuple[int, int]:
        """Delete captured text: a tenant's ("*": every tenant's), one user's of it, or what was
        captured before `before_ms`. Returns how many completions' text and corrections went."""
        where, parameters = [], []
        if tenant != "*":
            where.append("tenant = ?")
            parameters.append(tenant)
        if user_id is not None:
            where.append("user_id = ?")
            parameters.append(user_id)
        if before_ms is not None:
            where.append("created_ms < ?")
            parameters.append(before_ms)
        chosen = f"SELECT completion_id FROM captures WHERE {' AND '.join(where) or 'TRUE'}"
        now_ms = int(time.time() * 1000)
        tombstone = (tenant, user_id or "", now_ms if before_ms is None else before_ms)
        with self._mapped("delete captured text"), self._transaction() as cursor:
            cursor.execute(
                self._sql(
                    "INSERT INTO deletions (tenant, user_id, before_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (tenant, user_id) DO UPDATE "
                    "SET before_ms = CASE WHEN excluded.before_ms > deletions.before_ms "
                    "THEN excluded.before_ms ELSE deletions.before_ms END"
                ),
                tombstone,
            )
            cursor.execute(
                self._sql(f"DELETE FROM corrections WHERE completion_id IN ({chosen})"),
                parameters,
            )
            corrected = cursor.rowcount
            cursor.execute(
                self._sql(f"DELETE FROM captures WHERE completion_id IN ({chosen})"), parameters
            )
            deleted = cursor.rowcount
            cursor.execute(
                self._sql("SELECT path, oldest_ms, owners FROM exports WHERE forgotten_ms IS NULL")
            )
            holding = [
                path
                for path, oldest_ms, owners in cursor.fetchall()
                if (before_ms is None or oldest_ms < before_ms)
                and any(
                    tenant in ("*", held_tenant) and user_id in (None, held_user)
                    for held_tenant, _, held_user in (o.partition("/") for o in json.loads(owners))
                )
            ]
            cursor.executemany(
                self._sql("UPDATE exports SET forgotten_ms = ? WHERE path = ?"),
                [(now_ms, path) for path in holding],
            )
        self.remove_forgotten_exports()
        return deleted, corrected

    def _not_deleted(self, cursor: Any, captures: Sequence[tuple]) -> list[tuple]:
        """The captures no deletion covers: one made before a deletion of its owner's text
        that reaches the store after it is dropped."""
        cursor.execute("SELECT tenant, user_id, before_ms FROM deletions")
        deleted = {(tenant, user): before for tenant, user, before in cursor.fetchall()}
        if not deleted:
            return list(captures)
        return [
            row
            for row in captures
            if not any(
                row[_CAPTURE_CREATED] < deleted.get(owner, -1)
                for owner in (
                    ("*", ""),
                    (row[_CAPTURE_TENANT], ""),
                    (row[_CAPTURE_TENANT], row[_CAPTURE_USER]),
                )
            )
        ]

    def record_export(self, path: str, created_ms: int, oldest_ms: int, owners: list[str]) -> None:
        """An export at `path` (this machine's) holds text captured from `owners`
        ("tenant/user"), the oldest captured at `oldest_ms`."""
        with self._mapped("record an export"), self._transaction() as cursor:
            cursor.execute(
                self._sql(
                    "INSERT INTO exports (path, created_ms, oldest_ms, owners) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (path) DO UPDATE SET created_ms = excluded.created_ms, "
                    "oldest_ms = excluded.oldest_ms, owners = excluded.owners, forgotten_ms = NULL"
                ),
                (path, created_ms, oldest_ms, json.dumps(sorted(owners))),
            )

    def remove_forgotten_exports(self) -> list[str]:
        """Delete the files of forgotten exports that are on this machine; returns their paths.
        An export made on another machine goes when a deletion runs there."""
        removed = []
        for (path,) in self.query("SELECT path FROM exports WHERE forgotten_ms IS NOT NULL"):
            files = [Path(path) / name for name in EXPORT_FILES]
            if any(f.exists() for f in files):
                for file in files:
                    file.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def ping(self) -> None:
        """Fails unless the connection can write. SQLite opens a file it cannot write read-only,
        where reads (and BEGIN IMMEDIATE) still succeed: it is asked to write, then rolled back."""
        with self._mapped("write"):
            if self._postgres:
                self._query("SELECT 1")
                return
            cursor = self._db.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    (version,) = cursor.execute("PRAGMA user_version").fetchone()
                    cursor.execute(f"PRAGMA user_version = {int(version)}")
                finally:
                    cursor.execute("ROLLBACK")
            finally:
                cursor.close()

    def known_completions(self, completion_ids: Iterable[str]) -> dict[str, CompletionRecord]:
        ids = list(set(completion_ids))
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.query(
            f"SELECT {', '.join(_COMPLETION_COLUMNS)} FROM completions "
            f"WHERE completion_id IN ({marks})",
            ids,
        )
        return {row[0]: CompletionRecord(*row) for row in rows}

    def execute(self, sql: str, parameters: Sequence[Any] = (), *more: Write) -> int:
        """One write, and any `more` (sql, parameters), in a transaction of their own; how many
        rows the first changed."""
        with self._mapped("write"), self._transaction() as cursor:
            cursor.execute(self._sql(sql), tuple(parameters))
            changed = cursor.rowcount
            for statement, values in more:
                cursor.execute(self._sql(statement), tuple(values))
            return changed

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple]:
        with self._mapped("read telemetry"):
            return self._query(sql, parameters)

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple]:
        cursor = self._db.cursor()
        try:
            cursor.execute(self._sql(sql), tuple(parameters))
            rows = cursor.fetchall()
        finally:
            cursor.close()
        if self._postgres:
            self._db.commit()  # end the read transaction psycopg opened
        return rows

    @contextmanager
    def _mapped(self, doing: str) -> Iterator[None]:
        """The one place a driver's error becomes ours."""
        try:
            yield
        except self._errors as exc:
            kind = "PostgreSQL" if self._postgres else "SQLite"
            raise StoreUnavailable(
                f"the telemetry database ({kind}) could not {doing}: {exc}; retry later"
            ) from exc

    def _existing_events(self, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these keys are stored: one query per user, along the primary key."""
        by_user: dict[str, list[str]] = {}
        for user, event_id in keys:
            by_user.setdefault(user, []).append(event_id)
        found = set()
        for user, event_ids in by_user.items():
            marks = ",".join("?" * len(event_ids))
            rows = self._query(
                f"SELECT event_id FROM events WHERE user_id = ? AND event_id IN ({marks})",
                [user, *event_ids],
            )
            found.update((user, row[0]) for row in rows)
        return found

    def _insert(self, table: str, columns: list[str]) -> str:
        marks = ", ".join("?" * len(columns))
        return self._sql(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT DO NOTHING"
        )

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._postgres else sql

    def _run(self, sql: str) -> None:
        with self._transaction() as cursor:
            cursor.execute(sql)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._postgres)


class _Transaction:
    def __init__(self, connection: Any, postgres: bool) -> None:
        self._db = connection
        self._postgres = postgres

    def __enter__(self) -> Any:
        self._cursor = self._db.cursor()
        if not self._postgres:
            self._cursor.execute("BEGIN IMMEDIATE")
        return self._cursor

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        try:
            if error is None:
                self._db.commit() if self._postgres else self._cursor.execute("COMMIT")
            else:
                self._db.rollback() if self._postgres else self._cursor.execute("ROLLBACK")
        finally:
            self._cursor.close()


_FLAGS = [_EVENT_COLUMNS.index(name) for name in ("present", "file_closed")]
_KEY = [_EVENT_COLUMNS.index(name) for name in ("user_id", "event_id")]


def _event_key(row: tuple) -> tuple[str, str]:
    return (row[_KEY[0]], row[_KEY[1]])


def _event_row(row: tuple) -> tuple:
    """Booleans as integers: PostgreSQL's INTEGER columns take no booleans."""
    values = list(row)
    for index in _FLAGS:
        values[index] = None if values[index] is None else int(values[index])
    return tuple(values)
