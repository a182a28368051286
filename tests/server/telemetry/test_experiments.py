"""Experiments: arms drawn sticky and by weight; start, stop and promote recorded with who did
them; the per-arm report equal to what the database holds."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest

from ghostpen.cli import main
from ghostpen.context.template import load_template
from ghostpen.server import experiments
from ghostpen.server.errors import InvalidInput
from ghostpen.server.experiments import Arm, Experiment, parse_arm
from ghostpen.server.telemetry.arms_report import RETENTION_DUE_S, arms_report
from ghostpen.server.telemetry.records import CompletionRecord, TelemetryEvent
from ghostpen.server.telemetry.store import Store

ADAPTERS = {"shop-lora": "/models/shop.gguf"}
NOW_MS = 1_790_000_000_000


def two_arms(weights: tuple[float, float] = (1, 1)) -> tuple[Arm, Arm]:
    return (
        Arm("a", weights[0]),
        Arm("b", weights[1], "qwen25-coder-repo-fim", "shop-lora", (("top_k", "4"),)),
    )


def test_an_arm_is_sticky_and_drawn_by_weight() -> None:
    experiment = Experiment("fim-vs-prefix", two_arms((1, 3)), "running", 0, "pm")
    keys = [f"acme/user{i}" for i in range(20_000)]
    drawn = [experiment.assign(key).name for key in keys]
    share = Counter(drawn)["b"] / len(keys)
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / len(keys))  # 4 standard errors
    again = Experiment("fim-vs-prefix", two_arms((1, 3)), "stopped", 5, "someone else")
    assert [again.assign(key).name for key in keys] == drawn  # the same user, the same arm
    other = Experiment("another", two_arms((1, 3)), "running", 0, "pm")
    moved = sum(other.assign(k).name != d for k, d in zip(keys, drawn, strict=True))
    assert moved > 0.3 * len(keys)  # another experiment draws afresh: no arm carries over


def test_an_arm_is_parsed_from_the_command_line() -> None:
    arm = parse_arm("b:3:template=qwen25-coder-repo-fim,adapter=shop-lora,top_k=4")
    assert arm == Arm("b", 3.0, "qwen25-coder-repo-fim", "shop-lora", (("top_k", "4"),))
    assert parse_arm("a:1") == Arm("a", 1.0)
    with pytest.raises(InvalidInput, match="name:weight"):
        parse_arm("a")
    with pytest.raises(InvalidInput, match="not key=value"):
        parse_arm("a:1:top_k")


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ((Arm("a", 1),), "2 to 8 arms"),
        ((Arm("a", 1), Arm("a", 1)), "names must differ"),
        ((Arm("a", 1), Arm("B", 1)), "lowercase"),
        ((Arm("a", 1), Arm("b", 0)), "weight must be above 0"),
        ((Arm("a", 1), Arm("b", 1, adapter="nope")), "adapter 'nope' is not loaded"),
        ((Arm("a", 1), Arm("b", 1, template="nope")), "arm 'b'"),
        ((Arm("a", 1), Arm("b", 1, settings=(("top_kk", "4"),))), "unknown setting"),
        ((Arm("a", 1), Arm("b", 1, settings=(("top_k", "many"),))), "arm 'b'"),
        ((Arm("a", 1), Arm("b", 1, settings=(("template", "x"),))), "template="),
    ],
)
def test_arms_that_cannot_be_served_are_refused(arms: tuple[Arm, ...], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        experiments.check(arms, ADAPTERS, load_template)  # the built-in templates


def test_start_stop_and_promote_are_recorded_with_who(store: Store) -> None:
    started = experiments.start(store, "fim", two_arms(), "pm", ADAPTERS, "FIM on the tuned model")
    assert experiments.current(store) == started == experiments.get(store, "fim")
    assert started.arms[1].template == "qwen25-coder-repo-fim@v1"  # pinned to its version
    with pytest.raises(InvalidInput, match="'fim' is running; stop it first"):
        experiments.start(store, "other", two_arms(), "eng", ADAPTERS)
    experiments.stop(store, "fim", "eng")
    assert experiments.current(store) is None
    assert experiments.get(store, "fim").status == "stopped"  # type: ignore[union-attr]
    with pytest.raises(InvalidInput, match="stopped, not running"):
        experiments.stop(store, "fim", "eng")
    assert experiments.default(store) is None
    promoted = experiments.promote(store, "fim", "b", "lead")
    pinned = dataclasses.replace(two_arms()[1], template="qwen25-coder-repo-fim@v1")
    assert experiments.default(store) == promoted == pinned  # the version it was started on
    with pytest.raises(InvalidInput, match="no arm 'c'"):
        experiments.promote(store, "fim", "c", "lead")
    # a later experiment's arms start from the default: an arm that says little keeps its adapter
    experiments.start(store, "budget", (Arm("a", 1), Arm("c", 1, settings=(("top_k", "2"),))),
                      "pm", ADAPTERS)  # fmt: skip
    experiments.promote(store, "budget", "c", "lead")
    assert experiments.default(store) == Arm(
        "c", 1, "qwen25-coder-repo-fim@v1", "shop-lora", (("top_k", "2"),)
    )
    done = [(a.experiment, a.actor, a.action) for a in experiments.actions(store)]
    assert done == [
        ("fim", "pm", "start"),
        ("fim", "eng", "stop"),
        ("fim", "lead", "promote"),
        ("budget", "pm", "start"),
        ("budget", "lead", "promote"),
    ]
    assert [e.status for e in experiments.listed(store)] == ["promoted", "promoted"]


def test_actions_in_one_millisecond_keep_their_order(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last promotion is the default: two promotions in one millisecond must not tie."""
    monkeypatch.setattr(experiments, "_now_ms", lambda: 1_790_000_000_000)
    experiments.start(store, "fim", two_arms(), "pm", ADAPTERS)
    experiments.stop(store, "fim", "pm")
    for arm in ("b", "a", "b", "a"):
        experiments.promote(store, "fim", arm, "lead")
    assert experiments.default(store).name == "a"  # type: ignore[union-attr]
    done = experiments.actions(store)
    assert [a.action for a in done] == ["start", "stop", *["promote"] * 4]
    assert [a.at_ms for a in done] == [done[0].at_ms + i for i in range(6)]


def served(store: Store, completion_id: str, arm: str, created_ms: int, total_ms: float) -> None:
    record = CompletionRecord(
        completion_id, created_ms, "m", "t", "h", "llama.cpp", "python", "single_line",
        100, 5, 50.0, total_ms, "stop", 20, experiment="fim", arm=arm,
    )  # fmt: skip
    store.write([record], [event(completion_id, "shown", created_ms)])


def event(completion_id: str, kind: str, at_ms: int, **fields: object) -> TelemetryEvent:
    return TelemetryEvent(f"{completion_id}-{kind}-{fields.get('after_s', '')}", completion_id,
                          kind, at_ms, at_ms, **fields)  # type: ignore[arg-type]  # fmt: skip


def test_the_report_per_arm_is_what_the_database_holds(store: Store) -> None:
    experiments.start(store, "fim", two_arms(), "pm", ADAPTERS)
    old = NOW_MS - (300 + RETENTION_DUE_S + 1) * 1000  # every check due
    late = NOW_MS - 20 * 1000  # none due
    # arm a: 12 shown, 3 accepted (10 chars each), their 5-minute checks 1.0, 0.5 and none
    for i in range(12):
        served(store, f"a{i}", "a", old, 100.0 + i)
    events = [event(f"a{i}", "accepted", old + 1, accepted_chars=10) for i in range(3)]
    events += [event("a0", "retention", old + 2, after_s=300, fraction=1.0, present=1),
               event("a1", "retention", old + 2, after_s=300, fraction=0.5, present=1)]  # fmt: skip
    # arm b: 10 shown long ago, all accepted with 20 chars, fully kept; 5 shown just now
    for i in range(10):
        served(store, f"b{i}", "b", old, 200.0)
        events += [event(f"b{i}", "accepted", old + 1, accepted_chars=20)]
        events += [event(f"b{i}", "retention", old + 2, after_s=s, fraction=1.0, present=1)
                   for s in (15, 30, 120, 300)]  # fmt: skip
    for i in range(5):
        served(store, f"late{i}", "b", late, 200.0)
    store.write([], events)
    served(store, "not-shown", "a", old, 1.0)  # recorded without its shown event: not counted
    store.execute("DELETE FROM events WHERE completion_id = 'not-shown'")
    report = arms_report(store, "fim", now_ms=NOW_MS)
    a, b = report["arms"]
    assert (a["shown"], b["shown"]) == (12, 15)
    assert a["acceptance_rate"]["estimate"] == round(3 / 12, 4)
    assert b["acceptance_rate"]["estimate"] == round(10 / 15, 4)
    assert a["accepted_chars"]["estimate"] == round(30 / 12, 4)
    # retained at 5 minutes: only the due ones count (b's late five do not)
    assert a["retained_chars_300s"] == {**a["retained_chars_300s"], "estimate": 1.25, "count": 12}
    assert b["retained_chars_300s"]["estimate"] == 20.0 and b["retained_chars_300s"]["count"] == 10
    assert a["latency_p50_ms"]["estimate"] == 106.0
    versus = b["retained_chars_300s_vs_control"]
    assert versus["estimate"] == round(20 - 1.25, 4) and versus["verdict"] in (
        "better",
        "not yet known",
    )
    assert [x["action"] for x in report["actions"]] == ["start"]


def test_the_command_starts_reports_and_promotes(tmp_path, capsys) -> None:
    database = f"--set=database={tmp_path / 't.db'}"
    fim = "b:1:template=qwen25-coder-repo-fim,top_k=4"
    assert main([database, "experiments", "start", "fim", "--arm", "a:1", "--arm", fim,
                 "--by", "pm"]) == 0  # fmt: skip
    assert main([database, "experiments", "start", "x", "--arm", "a:1", "--arm", "a:1"]) == 2
    assert "arm names must differ" in capsys.readouterr().err
    assert main([database, "experiments", "report", "fim"]) == 0
    assert "arm b (weight 1): 0 shown" in capsys.readouterr().out
    assert main([database, "experiments", "promote", "fim", "b", "--by", "lead"]) == 0
    assert main([database, "experiments", "list"]) == 0
    listed = capsys.readouterr().out
    assert "fim\tpromoted\ta:1, b:1" in listed and "lead promote fim" in listed
