"""An acknowledged event survives the server being killed right after the acknowledgement."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import grpc
import pytest

from ghostpen.benchmarks.server_process import running_server
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.telemetry.store import Store


@pytest.mark.system
async def test_acknowledged_events_survive_sigkill(tmp_path: Path) -> None:
    database = tmp_path / "killed.db"
    events = []
    with running_server(
        "--engine", "llama.cpp", env={"GHOSTPEN_DATABASE": str(database)}
    ) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.CompletionStub(channel)
            request = pb.CompleteRequest(
                request_id="k", path="a.py", prefix=b"def add(a, b):\n    return ", max_tokens=4
            )
            chunks = [chunk async for chunk in stub.Complete(request)]
            completion_id = chunks[-1].completion_id
            for kind in ("shown", "accepted"):
                events.append(
                    pb.TelemetryEvent(
                        event_id=uuid.uuid4().hex,
                        completion_id=completion_id,
                        client_time_unix_ms=int(time.time() * 1000),
                        **{kind: pb.Shown() if kind == "shown" else pb.Accepted(accepted_chars=1)},
                    )
                )
            reply = await stub.Report(pb.ReportRequest(events=events))
            os.kill(server.process.pid, signal.SIGKILL)  # right after the acknowledgement
        assert len(reply.acks) == 2
        server.process.wait(timeout=30)
    assert server.process.returncode == -signal.SIGKILL
    store = Store.open(str(database), tmp_path)
    try:
        rows = store.query("SELECT event_id FROM events ORDER BY kind DESC")
        completion = store.query(
            "SELECT COUNT(*) FROM completions WHERE completion_id = ?", [completion_id]
        )
    finally:
        store.close()
    assert {row[0] for row in rows} == {e.event_id for e in events}
    assert completion == [(1,)]
