"""Text kept with consent for training (capture_text): what is kept, for whom, and its deletion
per user, per tenant and past the retention period. The engine is scripted: these tests are
about the code around it."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from ghostpen.cli import main
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.server.auth import TokenFile
from ghostpen.server.telemetry.records import CaptureRecord, CompletionRecord, TelemetryEvent
from ghostpen.server.telemetry.store import Store
from tests.conftest import SessionStream
from tests.edge_server import Edge, edge_server, until

NOW_MS = int(time.time() * 1000)
DAY_MS = 86_400_000
COMPLETION = CompletionRecord(
    "c",
    NOW_MS,
    "qwen",
    "t@v1",
    "h",
    "llama.cpp",
    "python",
    "single_line",
    10,
    3,
    50.0,
    90.0,
    "stop",
    7,
    user_id="alice",
    tenant="acme",
)
CAPTURE = CaptureRecord(
    "c",
    NOW_MS,
    "alice",
    "acme",
    "t@v1",
    "shop",
    "a.py",
    "python",
    "x = ",
    "\n",
    "",
    "[]",
    "total()",
)
OLD = DAY_MS * 40
SOURCE = "def total(cart):\n    return "
HELPERS = "def price(item):\n    return item.price * item.quantity\n"


def retention(completion_id: str, final_text: bytes, after_s: int = 300) -> pb.TelemetryEvent:
    return pb.TelemetryEvent(
        event_id=uuid.uuid4().hex,
        completion_id=completion_id,
        retention=pb.Retention(
            after_s=after_s, retained_fraction=0.9, present=True, final_text=final_text
        ),
    )


def correction(completion_id: str, text: str, after_s: int = 300) -> TelemetryEvent:
    return TelemetryEvent(
        uuid.uuid4().hex,
        completion_id,
        "retention",
        NOW_MS,
        NOW_MS,
        after_s=after_s,
        fraction=0.9,
        present=True,
        file_closed=False,
        user_id="alice",
        final_text=text,
    )


def test_corrections_are_kept_only_with_their_captured_text(store: Store) -> None:
    uncaptured = replace(COMPLETION, completion_id="u")
    store.write([COMPLETION, uncaptured], [], [CAPTURE])
    store.write([], [correction("c", "total(cart)"), correction("u", "secret = 1")])
    assert store.query("SELECT completion_id, text FROM corrections") == [("c", "total(cart)")]
    assert store.query("SELECT COUNT(*) FROM events") == [(2,)]  # the events themselves stay
    assert store.query("SELECT completion_id, shown FROM captures") == [("c", "total()")]


def test_deletion_by_user_tenant_and_age(store: Store) -> None:
    rows = [
        ("bob-acme", "bob", "acme", NOW_MS),
        ("alice-old", "alice", "acme", NOW_MS - OLD),
        ("alice-other", "alice", "other", NOW_MS),
        ("carol-other", "carol", "other", NOW_MS),
    ]
    completions, captures = [COMPLETION], [CAPTURE]
    for completion_id, user, tenant, created in rows:
        completions.append(replace(COMPLETION, completion_id=completion_id, created_ms=created))
        captures.append(
            replace(
                CAPTURE,
                completion_id=completion_id,
                user_id=user,
                tenant=tenant,
                created_ms=created,
            )
        )
    store.write(completions, [], captures)
    store.write([], [correction(c.completion_id, "kept") for c in captures])

    def left() -> set[str]:
        return {row[0] for row in store.query("SELECT completion_id FROM captures")}

    assert store.delete_captured("*", before_ms=NOW_MS - DAY_MS) == (1, 1)
    assert left() == {"c", "bob-acme", "alice-other", "carol-other"}
    assert store.delete_captured("acme", "alice") == (1, 1)  # alice's of acme, not of other
    assert left() == {"bob-acme", "alice-other", "carol-other"}
    assert store.delete_captured("other") == (2, 2)
    assert left() == {"bob-acme"}
    assert store.query("SELECT completion_id FROM corrections") == [("bob-acme",)]
    assert store.query("SELECT COUNT(*) FROM completions") == [(5,)]  # telemetry stays


def tokens(tmp_path: Path) -> dict[str, str]:
    """alice and bob of tenant acme, which consents; carol of tenant other, which does not."""
    file = TokenFile(tmp_path / "tokens.json")
    return {
        "alice": file.add("alice", "", "acme")[0],
        "bob": file.add("bob", "", "acme")[0],
        "carol": file.add("carol", "", "other")[0],
    }


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def session_completion(edge: Edge, token: str) -> tuple[pb.Welcome, pb.CompletionChunk]:
    session = SessionStream(edge.stub, metadata=bearer(token))
    session.send(hello=pb.Hello(workspace="shop"))
    welcome = (await session.read()).welcome
    await session.open_file("cart.py", SOURCE + "\n\nprint(total([]))\n")
    _, final = await session.complete(
        request_id="r", path="cart.py", version=1, cursor_offset=len(SOURCE)
    )
    session.send(event=retention(final.chunk.completion_id, b"total(cart)\n"))
    assert (await session.read()).HasField("event_ack")
    return welcome, final.chunk


async def test_consenting_tenants_text_is_kept_with_its_correction_until_deleted(
    tmp_path: Path,
) -> None:
    users = tokens(tmp_path)
    async with edge_server(tmp_path, capture_text="acme") as edge:
        welcome, alice = await session_completion(edge, users["alice"])
        assert welcome.capture_text and welcome.max_correction_chars == 16_384  # the default
        other, carol = await session_completion(edge, users["carol"])
        assert not other.capture_text
        _, bob = await session_completion(edge, users["bob"])

        [kept] = edge.rows(
            "SELECT user_id, repo, path, language, prefix, healed, suffix, context, shown, "
            "template_id FROM captures WHERE completion_id = ?",
            alice.completion_id,
        )
        user, repo, path, language, prefix, healed, suffix, context, shown, template = kept
        assert (user, repo, path, language) == ("alice", "shop", "cart.py", "python")
        assert (prefix, healed) == (SOURCE[:-1], " ")  # the blank the prompt leaves to the model
        assert suffix.startswith("\n\nprint(total([]))")
        assert shown == "total()" and template == alice.template_id
        assert isinstance(json.loads(context), list)  # chunks as they were ready, maybe none
        assert edge.rows("SELECT completion_id, after_s, text FROM corrections") == [
            (alice.completion_id, 300, "total(cart)\n"),
            (bob.completion_id, 300, "total(cart)\n"),
        ]
        # carol's tenant did not consent: her completion and events are counted, no text kept
        assert edge.rows("SELECT COUNT(*) FROM captures WHERE user_id = 'carol'") == [(0,)]
        assert edge.rows("SELECT COUNT(*) FROM events WHERE completion_id = ?", carol.completion_id)

        deleted = await edge.stub.DeleteCapturedText(
            pb.DeleteCapturedTextRequest(), metadata=bearer(users["alice"])
        )
        assert (deleted.completions, deleted.corrections) == (1, 1)
        assert edge.rows("SELECT user_id FROM captures") == [("bob",)]
        assert edge.rows("SELECT completion_id FROM corrections") == [(bob.completion_id,)]
        assert edge.rows("SELECT COUNT(*) FROM completions") == [(3,)]


async def test_a_complete_call_is_captured_and_an_oversized_correction_refused(
    tmp_path: Path,
) -> None:
    async with edge_server(tmp_path, capture_text="*", max_correction_chars="8") as edge:
        request = pb.CompleteRequest(
            request_id="r",
            path="a.py",
            prefix=b"x = ",
            suffix=b"\n",
            workspace="w",
            context_files=[pb.ContextFile(path="prices.py", text=HELPERS.encode())],
        )
        final = [chunk async for chunk in edge.stub.Complete(request)][-1]
        [(prefix, healed, suffix, shown, context)] = edge.rows(
            "SELECT prefix, healed, suffix, shown, context FROM captures"
        )
        assert (prefix, healed, suffix, shown) == ("x =", " ", "\n", "total()")
        [chunk] = json.loads(context)
        assert chunk == {"path": "prices.py", "start_line": 0, "end_line": 3, "text": HELPERS}
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            too_long = retention(final.completion_id, b"total(cart)")
            await edge.stub.Report(pb.ReportRequest(events=[too_long]))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_correction_chars" in refused.value.details()
        assert edge.rows("SELECT COUNT(*) FROM corrections") == [(0,)]


async def test_text_past_the_retention_period_is_deleted_by_the_server(tmp_path: Path) -> None:
    settings = {"capture_text": "*", "capture_retention_days": "0", "capture_purge_s": "0.05"}
    async with edge_server(tmp_path, **settings) as edge:
        request = pb.CompleteRequest(request_id="r", path="a.py", prefix=b"x = ")
        [chunk async for chunk in edge.stub.Complete(request)]

        async def expired() -> bool:
            return edge.rows("SELECT COUNT(*) FROM captures") == [(0,)]

        await until(expired)
        assert edge.rows("SELECT COUNT(*) FROM completions") == [(1,)]


def test_the_data_command_deletes_a_users_or_a_tenants_text(tmp_path: Path, capsys) -> None:
    database = tmp_path / "telemetry.db"
    store = Store.open(str(database), tmp_path)
    bob = replace(CAPTURE, completion_id="b", user_id="bob")
    store.write([COMPLETION, replace(COMPLETION, completion_id="b")], [], [CAPTURE, bob])
    store.close()
    where = ["--set", f"database={database}"]
    assert main([*where, "data", "delete", "--tenant", "acme", "--user", "alice"]) == 0
    assert "1 completions' text and 0 corrections" in capsys.readouterr().out
    assert main([*where, "data", "delete", "--tenant", "acme"]) == 0
    assert "1 completions' text" in capsys.readouterr().out
    store = Store.open(str(database), tmp_path)
    assert store.query("SELECT COUNT(*) FROM captures") == [(0,)]
    store.close()


def test_text_in_flight_when_it_is_deleted_stays_deleted(store: Store) -> None:
    """A server's write queue may still hold text captured before its owner's deletion: it is
    dropped when it reaches the store. Text captured after the deletion, and others', is kept."""
    early_ms = int(time.time() * 1000) - 1
    store.delete_captured("acme", "alice")
    late_ms = int(time.time() * 1000) + 1
    captures = {
        "early": replace(CAPTURE, completion_id="early", created_ms=early_ms),
        "late": replace(CAPTURE, completion_id="late", created_ms=late_ms),
        "bob": replace(CAPTURE, completion_id="bob", user_id="bob", created_ms=early_ms),
        "globex": replace(CAPTURE, completion_id="globex", tenant="globex", created_ms=early_ms),
    }
    completions = [replace(COMPLETION, completion_id=c) for c in captures]
    store.write(completions, [], list(captures.values()))
    kept = {c for (c,) in store.query("SELECT completion_id FROM captures")}
    assert kept == {"late", "bob", "globex"}
    assert store.query("SELECT COUNT(*) FROM completions") == [(4,)]  # the records stay
    # a tenant's deletion covers its every user; the retention period's, every tenant
    store.delete_captured("acme")
    store.delete_captured("*", before_ms=late_ms + 10)
    again = [replace(c, completion_id=f"{c.completion_id}-2") for c in captures.values()]
    store.write([replace(COMPLETION, completion_id=c.completion_id) for c in again], [], again)
    assert store.query("SELECT COUNT(*) FROM captures") == [(0,)]
    newer = replace(CAPTURE, completion_id="newer", tenant="globex", created_ms=late_ms + 10)
    store.write([replace(COMPLETION, completion_id="newer")], [], [newer])
    assert store.query("SELECT completion_id FROM captures") == [("newer",)]
