"""Replay before going live: captured, accepted completions re-run on the real engine under a
candidate arm (another template and a LoRA adapter) and the control, scored against what the
developer kept, pair by pair."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostpen.cli import main
from ghostpen.server.app import RunningServer
from ghostpen.server.errors import InvalidInput
from ghostpen.server.experiments import Arm
from ghostpen.server.replay import arms, recorded, replay
from ghostpen.server.settings import Settings
from ghostpen.server.telemetry.store import Store
from tests.server.training.test_export import kept_completions

CANDIDATE = Arm("candidate", 1, template="qwen25-coder-repo-fim", adapter="seeded")
CONTROL = Arm("control", 1)


@pytest.fixture
def captured_store(tmp_path: Path) -> Iterator[Store]:
    store = kept_completions(tmp_path)
    yield store
    store.close()


async def test_both_arms_are_scored_on_what_developers_kept(
    server: RunningServer,
    settings: Settings,
    captured_store: Store,
) -> None:
    replayed = arms(captured_store, settings, CANDIDATE, CONTROL)
    report = await replay(server.engine, settings, captured_store, replayed)
    # c1 corrected, c2 as accepted (c5 the same text, once), c3 mostly undone; c4 held a key
    # and c6 has no 5-minute check yet
    assert report["captures"] == 3
    control, candidate = report["arms"]["control"], report["arms"]["candidate"]
    assert (control["template"], control["adapter"]) == (f"{settings.context.template}@v1", "")
    assert (candidate["template"], candidate["adapter"]) == ("qwen25-coder-repo-fim@v1", "seeded")
    for arm in (control, candidate):
        assert arm["failed"] == 0 and arm["prompt_tokens"] > 0
        assert 0.0 <= arm["exact"] <= arm["similarity"] <= 1.0
    difference = report["difference"]["similarity"]
    assert difference["tasks"] == 3
    assert difference["mean"] == pytest.approx(candidate["similarity"] - control["similarity"])
    assert difference["low"] <= difference["mean"] <= difference["high"]

    kept = [recorded(captured_store, arm, 200) for arm in replayed]
    assert all("<|fim_prefix|>" in s.prompt for s in kept[1])  # the candidate's own template
    assert not any("<|fim_prefix|>" in s.prompt for s in kept[0])
    expected = {s.expected for s in kept[0]}
    assert expected == {"return sum(item.price for item in cart)", "return", "pass"}


async def test_replay_refuses_what_it_cannot_run(
    settings: Settings, captured_store: Store, tmp_path: Path
) -> None:
    unknown = dataclasses.replace(CANDIDATE, adapter="nope")
    with pytest.raises(InvalidInput, match="adapter 'nope' is not loaded"):
        arms(captured_store, settings, unknown, CONTROL)
    empty = Store.open(str(tmp_path / "empty.db"), tmp_path)
    with pytest.raises(InvalidInput, match="capture needs consent"):
        await replay(None, settings, empty, arms(empty, settings, CANDIDATE, CONTROL))  # type: ignore[arg-type]
    empty.close()


def test_the_command_names_a_bad_arm_before_it_loads_a_model(tmp_path: Path, capsys) -> None:
    database = ["--set", f"database={tmp_path / 'empty.db'}"]
    assert main([*database, "replay", "--candidate", "template=nope"]) == 2
    assert "no template named 'nope'" in capsys.readouterr().err
