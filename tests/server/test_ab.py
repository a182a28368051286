"""A simulated A/B on the real server: developers on Session streams, each kept in the arm the
server drew for them, accept what they are shown by a known rule (70% in arm b, 30% in arm a)
and keep all of it. The report recovers the difference: its interval covers the rule's 40
points and calls b better, and what was kept is what was accepted. Both arms serve alike (the
difference is the simulated developers'), with the show gate off so that every completion with
text is shown."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from functools import partial

from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.server import experiments
from ghostpen.server.app import RunningServer
from ghostpen.server.experiments import Arm
from ghostpen.server.settings import Settings
from ghostpen.server.telemetry.arms_report import arms_report
from ghostpen.server.telemetry.store import Store
from tests.conftest import SessionStream
from tests.edge_server import until

ACCEPTS = {"a": 0.3, "b": 0.7}
DEVELOPERS = 40
REQUESTS = 8  # each: about 160 shown an arm, enough to call a 40-point lift
AT_ONCE = 4  # developers typing at the same time
CODE = "import math\n\n\ndef area(radius):\n    return math.pi * radius ** 2\n\n\ndef volume("


def event(completion_id: str, at_ms: int, name: str, **kind: object) -> pb.TelemetryEvent:
    return pb.TelemetryEvent(
        event_id=f"{completion_id}-{name}",
        completion_id=completion_id,
        client_time_unix_ms=at_ms,
        **kind,
    )


async def developer(stub, key: str, arm: str) -> list[pb.TelemetryEvent]:
    """One developer's session: completions asked for at a few cursors, and what they did."""
    rng = random.Random(key)
    session = SessionStream(stub, (("x-ghostpen-affinity", key),))
    session.send(hello=pb.Hello(client="test", workspace="shapes"))
    assert (await session.read()).HasField("welcome")
    await session.open_file("shapes.py", CODE)
    events = []
    for n in range(REQUESTS):
        text, final = await session.complete(
            request_id=f"{key}-{n}", path="shapes.py", version=1,
            cursor_offset=len(CODE) - n, max_tokens=4,
        )  # fmt: skip
        chunk = final.chunk
        if not text or chunk.finish_reason == pb.FINISH_REASON_WITHHELD:
            continue
        about = partial(event, chunk.completion_id, int(time.time() * 1000))
        events.append(about("shown", shown=pb.Shown()))
        if rng.random() < ACCEPTS[arm]:
            events.append(about("accepted", accepted=pb.Accepted(accepted_chars=len(text))))
            events += [
                about(f"kept{after_s}", retention=pb.Retention(
                    after_s=after_s, retained_fraction=1.0, present=True))
                for after_s in (15, 30, 120, 300)
            ]  # fmt: skip
    session.close()
    return events


async def test_a_simulated_ab_recovers_the_known_difference(
    server: RunningServer, stub, settings: Settings
) -> None:
    store = Store.open(settings.telemetry.database, settings.cache_dir)
    name = f"ab-{uuid.uuid4().hex[:8]}"
    every = (("show_gate", "false"),)  # all that has text is shown, in both arms alike
    arms = (Arm("a", 1, settings=every), Arm("b", 1, settings=every))
    experiment = experiments.start(store, name, arms, "test", {})

    async def served() -> bool:
        return server.traffic.experiment == experiment

    try:
        await until(served, timeout_s=3 * settings.telemetry.experiment_refresh_s)
        keys = [f"{name}-dev{i}" for i in range(DEVELOPERS)]
        for start in range(0, DEVELOPERS, AT_ONCE):
            batch = keys[start : start + AT_ONCE]
            done = await asyncio.gather(
                *(developer(stub, k, experiment.assign(k).name) for k in batch)
            )
            for events in done:
                if events:
                    await stub.Report(pb.ReportRequest(events=events))
    finally:
        experiments.stop(store, name, "test")
    report = arms_report(store, name, now_ms=int(time.time() * 1000) + 3_600_000)
    store.close()
    a, b = report["arms"]
    assert a["shown"] > 40 and b["shown"] > 40  # both arms drawn, and served
    versus = b["acceptance_rate_vs_control"]
    assert versus["low"] <= ACCEPTS["b"] - ACCEPTS["a"] <= versus["high"]
    assert versus["verdict"] == "better"
    for arm in (a, b):  # all that was accepted was kept: retained characters are accepted ones
        assert arm["retained_chars_300s"]["estimate"] == arm["accepted_chars"]["estimate"] > 0
    # every completion of the experiment is in one of its arms, as the server recorded it
    database = Store.open(settings.telemetry.database, settings.cache_dir)
    arms = database.query("SELECT DISTINCT arm FROM completions WHERE experiment = ?", (name,))
    database.close()
    assert sorted(arm for (arm,) in arms) == ["a", "b"]
