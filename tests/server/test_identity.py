"""Who calls, over real gRPC and HTTP: per-user tokens from `ghostpen tokens`, what each user may
touch, the limit on failed attempts, and TLS. The engine is scripted: these tests are about the
code around it."""

from __future__ import annotations

import base64
import json
import ssl
import stat
import subprocess
import uuid
from pathlib import Path

import aiohttp
import grpc
import pytest

from ghostpen.cli import main
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.auth import TokenFile
from tests.conftest import SessionStream
from tests.edge_server import Edge, edge_server, until


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def complete(edge: Edge, token: str, request_id: str = "r") -> pb.CompletionChunk:
    request = pb.CompleteRequest(request_id=request_id, path="a.py", prefix=b"x = ")
    chunks = [chunk async for chunk in edge.stub.Complete(request, metadata=bearer(token))]
    return chunks[-1]


def accepted(completion_id: str, chars: int, event_id: str = "") -> pb.TelemetryEvent:
    return pb.TelemetryEvent(
        event_id=event_id or uuid.uuid4().hex,
        completion_id=completion_id,
        accepted=pb.Accepted(accepted_chars=chars),
    )


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


def test_the_tokens_command_keeps_hashes_and_revokes(tmp_path, capsys) -> None:
    tokens = tmp_path / "tokens.json"
    where = ["--set", f"tokens_file={tokens}"]
    assert main([*where, "tokens", "add", "alice", "--team", "platform"]) == 0
    token = capsys.readouterr().out.splitlines()[-1]
    assert token.startswith("gp_") and len(token) > 40
    text = tokens.read_text()
    assert token not in text and "alice" in text  # its hash only
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert main([*where, "tokens", "list"]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "platform" in listed and token not in listed
    assert main([*where, "tokens", "revoke", "alice"]) == 0
    assert TokenFile(tokens).entries() == []
    assert main([*where, "tokens", "revoke", "alice"]) == 1  # nothing left to revoke


def tokens_of(tmp_path: Path) -> TokenFile:
    """The tokens file `edge_server` reads."""
    return TokenFile(tmp_path / "tokens.json")


async def test_each_user_is_known_by_their_token_until_it_is_revoked(tmp_path) -> None:
    tokens = tokens_of(tmp_path)
    alice, _ = tokens.add("alice", "platform", "acme")
    bob, _ = tokens.add("bob", "web", "acme")
    async with edge_server(tmp_path, auth_failures_max="1000") as edge:
        final = await complete(edge, alice, "mine")
        owner = "SELECT user_id, team, tenant FROM completions WHERE completion_id = ?"
        assert edge.rows(owner, final.completion_id) == [("alice", "platform", "acme")]
        request = pb.CompleteRequest(request_id="r", path="a.py", prefix=b"x = ")
        anonymous = await refused(edge.stub.Complete(request).read())
        assert anonymous.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "no token" in anonymous.details()

        tokens.revoke("alice")

        async def alice_refused() -> bool:
            return not await _admitted(edge, alice)

        await until(alice_refused)  # the file is reread without a restart
        assert (await complete(edge, bob)).final  # bob's token still works


async def test_events_are_taken_only_from_the_completions_owner(tmp_path) -> None:
    tokens = tokens_of(tmp_path)
    alice, _ = tokens.add("alice")
    bob, _ = tokens.add("bob")
    async with edge_server(tmp_path) as edge:
        mine = await complete(edge, alice)  # "total()": 7 characters shown
        theirs = await complete(edge, bob)

        report = edge.stub.Report
        stolen = pb.ReportRequest(events=[accepted(mine.completion_id, 7)])
        denied = await refused(report(stolen, metadata=bearer(bob)))
        assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "served to another user" in denied.details()

        inflated = pb.ReportRequest(events=[accepted(mine.completion_id, 10**9)])
        too_many = await refused(report(inflated, metadata=bearer(alice)))
        assert too_many.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "accepts 1000000000 characters" in too_many.details()
        assert "which showed 7" in too_many.details()

        # The same event id from two users: each is stored, neither is the other's duplicate.
        ours = await report(
            pb.ReportRequest(events=[accepted(mine.completion_id, 7, "e1")]),
            metadata=bearer(alice),
        )
        also = await report(
            pb.ReportRequest(events=[accepted(theirs.completion_id, 7, "e1")]),
            metadata=bearer(bob),
        )
        assert [a.duplicate for a in (*ours.acks, *also.acks)] == [False, False]
        stored = edge.rows("SELECT user_id, accepted_chars FROM events ORDER BY user_id")
        assert stored == [("alice", 7), ("bob", 7)]


async def _admitted(edge: Edge, token: str) -> bool:
    try:
        await complete(edge, token)
        return True
    except grpc.aio.AioRpcError:
        return False


async def test_the_shared_token_is_one_user(tmp_path) -> None:
    async with edge_server(tmp_path, auth_token="secret") as edge:
        final = await complete(edge, "secret")
        owner = "SELECT user_id FROM completions WHERE completion_id = ?"
        assert edge.rows(owner, final.completion_id) == [("shared",)]


async def test_failed_attempts_are_limited_per_address(tmp_path) -> None:
    async with edge_server(tmp_path, auth_token="secret", auth_failures_max="3") as edge:
        for _ in range(3):
            wrong = await refused(complete(edge, "guess"))
            assert wrong.code() is grpc.StatusCode.UNAUTHENTICATED
        locked = await refused(complete(edge, "secret"))  # even the right one, for a while
        assert locked.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 failed authentications from this address" in locked.details()
        assert "auth_failures_max=3" in locked.details()


async def test_sessions_are_limited_per_user(tmp_path) -> None:
    tokens = tokens_of(tmp_path)
    alice, _ = tokens.add("alice")
    bob, _ = tokens.add("bob")
    async with edge_server(tmp_path, max_sessions_per_user="1") as edge:
        first = SessionStream(edge.stub, metadata=bearer(alice))
        first.send(hello=pb.Hello())
        assert (await first.read()).HasField("welcome")
        second = SessionStream(edge.stub, metadata=bearer(alice))
        second.send(hello=pb.Hello())
        over = await refused(second.read())
        assert over.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_user=1" in over.details()
        other = SessionStream(edge.stub, metadata=bearer(bob))
        other.send(hello=pb.Hello())
        assert (await other.read()).HasField("welcome")
        first.close()
        other.close()


async def get(url: str, authorization: str = "", context: ssl.SSLContext | None = None) -> tuple:
    """The status, and the body (or the challenge of a 401)."""
    headers = {"Authorization": authorization} if authorization else {}
    async with (
        aiohttp.ClientSession() as client,
        client.get(url, headers=headers, ssl=context if context else False) as response,
    ):
        if response.status == 401:
            return response.status, response.headers.get("WWW-Authenticate", "")
        return response.status, await response.text()


async def test_metrics_and_the_dashboard_want_a_token_and_show_the_viewers_tenant(
    tmp_path,
) -> None:
    tokens = tokens_of(tmp_path)
    alice, _ = tokens.add("alice", "platform", "acme")
    bob, _ = tokens.add("bob", "web", "acme")
    eve, _ = tokens.add("eve", "", "elsewhere")
    async with edge_server(tmp_path, metrics_port="0", metrics_token="scrape") as edge:
        await complete(edge, alice)
        await complete(edge, bob)
        await complete(edge, eve)
        web = f"http://127.0.0.1:{edge.running.web_port}"

        for path in ("/metrics", "/dashboard", "/dashboard.json"):
            status, challenge = await get(web + path)
            assert (status, challenge) == (401, 'Basic realm="ghostpen"'), path
        assert (await get(web + "/metrics", "Bearer scrape"))[0] == 200
        scrape_only = await get(web + "/dashboard", "Bearer scrape")
        assert scrape_only[0] == 401  # a scrape token, nothing more
        login = "Basic " + base64.b64encode(f"alice:{alice}".encode()).decode()  # a browser's
        status, page = await get(web + "/dashboard.json", login)
        assert status == 200
        assert json.loads(page)["overall"]["served"] == 2  # alice's and bob's: not eve's tenant
        status, page = await get(web + "/dashboard.json?team=web", f"Bearer {alice}")
        assert json.loads(page)["overall"]["served"] == 1
        status, page = await get(web + "/dashboard.json", f"Bearer {eve}")
        assert json.loads(page)["overall"]["served"] == 1


@pytest.fixture
def certificate(tmp_path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, made here by openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_serves_grpc_and_http_and_refuses_plaintext(tmp_path, certificate) -> None:
    cert, key = certificate
    async with edge_server(
        tmp_path, metrics_port="0", tls_cert=str(cert), tls_key=str(key), auth_token="secret"
    ) as edge:
        address = f"localhost:{edge.running.port}"
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(address, credentials) as channel:
            request = pb.CompleteRequest(request_id="t", path="a.py", prefix=b"x = ")
            stub = pb_grpc.CompletionStub(channel)
            chunks = [c async for c in stub.Complete(request, metadata=bearer("secret"))]
            assert chunks[-1].final
        async with grpc.aio.insecure_channel(address) as plain:
            cleartext = await refused(
                pb_grpc.CompletionStub(plain).Complete(request, metadata=bearer("secret")).read()
            )
            assert cleartext.code() is grpc.StatusCode.UNAVAILABLE
        trusted = ssl.create_default_context(cafile=str(cert))
        web = f"https://localhost:{edge.running.web_port}"
        assert (await get(web + "/metrics", "Bearer secret", trusted))[0] == 200


async def test_complete_calls_in_flight_are_limited_per_user(tmp_path) -> None:
    tokens = tokens_of(tmp_path)
    alice, _ = tokens.add("alice")
    bob, _ = tokens.add("bob")
    async with edge_server(tmp_path, max_calls_per_user="1") as edge:
        edge.engine.text, edge.engine.delay = "x" * 400, 0.05  # in flight for a while
        request = pb.CompleteRequest(request_id="long", path="a.py", prefix=b"x = ", max_tokens=400)
        running = edge.stub.Complete(request, metadata=bearer(alice))
        assert (await running.read()).text == "x"
        over = await refused(complete(edge, alice, "second"))
        assert over.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_calls_per_user=1" in over.details()
        edge.engine.text, edge.engine.delay = "total()\n", 0.0
        assert (await complete(edge, bob)).final  # another user's call goes through
        running.cancel()
        await until(lambda: _admitted(edge, alice))  # the slot is free again
