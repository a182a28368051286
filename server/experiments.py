"""Experiments: arms served side by side on real traffic, each a template, an adapter and context
settings, and the record of who started, stopped and promoted them.

At most one experiment runs at a time; its arms split the traffic by weight. A developer stays in
one arm for the experiment's life: the arm is drawn from a hash of the experiment and the user
(a server without authentication has one user, so there it is the editor's session affinity,
stable across reconnects, or else the session). Promoting an arm makes it the default: what
every completion outside an experiment is served with, and what a later experiment's arms
start from. Records live in the telemetry database; the CLI and the dashboard write them, and a
server picks them up within `experiment_refresh_s`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ghostpen.context.settings import ContextSettings
from ghostpen.server import prompts
from ghostpen.server.errors import InvalidInput
from ghostpen.server.settings import updated
from ghostpen.server.telemetry.store import Store, Write

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_ARMS = 8
STATUSES = ("running", "stopped", "promoted")


@dataclass(frozen=True)
class Arm:
    name: str
    weight: float  # its share of the traffic, against the other arms' weights
    template: str = ""  # a template id; "": the default's
    adapter: str = ""  # a LoRA adapter the engine loads (lora_adapters); "": the default's
    settings: tuple[tuple[str, str], ...] = ()  # context settings over the default's

    def context(self, base: ContextSettings) -> ContextSettings:
        return updated(base, dict(self.settings))

    def over(self, default: Arm | None) -> Arm:
        """This arm with what it leaves unsaid taken from the default."""
        if default is None:
            return self
        return dataclasses.replace(
            self,
            template=self.template or default.template,
            adapter=self.adapter or default.adapter,
            settings=tuple({**dict(default.settings), **dict(self.settings)}.items()),
        )


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]  # the first is the control the others are compared with
    status: str
    started_ms: int
    started_by: str
    note: str = ""

    def assign(self, key: str) -> Arm:
        """The arm of whoever `key` names: a uniform draw from the hash of the experiment and
        the key, cut by the arms' cumulative weights."""
        digest = hashlib.sha256(f"{self.name}\0{key}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64 * sum(a.weight for a in self.arms)
        for arm in self.arms:
            draw -= arm.weight
            if draw < 0:
                return arm
        return self.arms[-1]


@dataclass(frozen=True)
class Action:
    experiment: str
    at_ms: int
    actor: str
    action: str  # start | stop | promote
    detail: str = ""


def parse_arm(text: str) -> Arm:
    """`name:weight[:key=value,...]`, where a key is template, adapter or a context setting:
    `b:1:template=qwen25-coder-repo-fim,top_k=4`."""
    name, _, rest = text.partition(":")
    weight_text, _, options = rest.partition(":")
    try:
        weight = float(weight_text)
    except ValueError:
        raise InvalidInput(f"arm {text!r}: wants name:weight[:key=value,...]") from None
    values = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise InvalidInput(f"arm {name!r}: {item!r} is not key=value")
        values[key] = value
    template, adapter = values.pop("template", ""), values.pop("adapter", "")
    return Arm(name, weight, template, adapter, tuple(sorted(values.items())))


def check(
    arms: tuple[Arm, ...], adapters: Mapping[str, object], template: Callable[[str], object]
) -> None:
    """InvalidInput unless the arms can be served: named, weighted, at most MAX_ARMS, their
    templates known (`template` resolves a name or raises), their adapters loaded, their
    settings context settings of the right type."""
    if not 2 <= len(arms) <= MAX_ARMS:
        raise InvalidInput(f"an experiment has 2 to {MAX_ARMS} arms, not {len(arms)}")
    if len({arm.name for arm in arms}) < len(arms):
        raise InvalidInput("arm names must differ")
    for arm in arms:
        if not NAME.fullmatch(arm.name):
            raise InvalidInput(f"arm name {arm.name!r}: lowercase letters, digits, . _ -")
        if not arm.weight > 0:
            raise InvalidInput(f"arm {arm.name!r}: its weight must be above 0, not {arm.weight}")
        if arm.adapter and arm.adapter not in adapters:
            loaded = ", ".join(adapters) or "none"
            raise InvalidInput(
                f"arm {arm.name!r}: adapter {arm.adapter!r} is not loaded (lora_adapters: {loaded})"
            )
        try:
            if arm.template:
                template(arm.template)
            if "template" in dict(arm.settings):
                raise ValueError("the template is the arm's own: template=")
            arm.context(ContextSettings())
        except (ValueError, InvalidInput) as error:
            raise InvalidInput(f"arm {arm.name!r}: {error}") from None


def start(
    store: Store,
    name: str,
    arms: tuple[Arm, ...],
    actor: str,
    adapters: Mapping[str, object],
    note: str = "",
) -> Experiment:
    """Start serving `arms`; their templates may be registered versions (server/prompts.py)."""
    if not NAME.fullmatch(name):
        raise InvalidInput(f"experiment name {name!r}: lowercase letters, digits, . _ -")
    check(arms, adapters, lambda reference: prompts.resolve(store, reference))
    arms = tuple(  # pinned: `name` is its latest version now, for the experiment's life
        dataclasses.replace(arm, template=prompts.resolve(store, arm.template).template_id)
        if arm.template
        else arm
        for arm in arms
    )
    running = current(store)
    if running is not None:
        raise InvalidInput(f"experiment {running.name!r} is running; stop it first")
    if get(store, name) is not None:
        raise InvalidInput(f"experiment {name!r} exists; choose another name")
    experiment = Experiment(name, arms, "running", _now_ms(), actor, note)
    store.execute(
        "INSERT INTO experiments (name, arms, status, started_ms, started_by, note) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (name, _arms_json(arms), "running", experiment.started_ms, actor, note),
        _recorded(Action(name, experiment.started_ms, actor, "start", _arms_json(arms))),
    )
    return experiment


def stop(store: Store, name: str, actor: str) -> None:
    _running(store, name)
    store.execute(
        "UPDATE experiments SET status = 'stopped' WHERE name = ?",
        (name,),
        _recorded(Action(name, _now_ms(), actor, "stop")),
    )


def promote(store: Store, name: str, arm_name: str, actor: str) -> Arm:
    """The arm becomes the default (as the default it is served: over the one before); its
    experiment, if still running, ends."""
    experiment = get(store, name)
    if experiment is None:
        raise InvalidInput(f"no experiment named {name!r}")
    arm = next((a for a in experiment.arms if a.name == arm_name), None)
    if arm is None:
        names = ", ".join(a.name for a in experiment.arms)
        raise InvalidInput(f"experiment {name!r} has no arm {arm_name!r} (arms: {names})")
    served = arm.over(default(store))
    store.execute(
        "UPDATE experiments SET status = 'promoted' WHERE name = ?",
        (name,),
        _recorded(Action(name, _now_ms(), actor, "promote", _arms_json((served,)))),
    )
    return served


def get(store: Store, name: str) -> Experiment | None:
    found = _experiments(store, "WHERE name = ?", (name,))
    return found[0] if found else None


def listed(store: Store) -> list[Experiment]:
    return _experiments(store, "ORDER BY started_ms", ())


def current(store: Store) -> Experiment | None:
    found = _experiments(store, "WHERE status = 'running'", ())
    return found[0] if found else None


def default(store: Store) -> Arm | None:
    """The arm last promoted, as it was served then; None: the server's settings."""
    rows = store.query(
        "SELECT detail FROM experiment_actions WHERE action = 'promote' ORDER BY at_ms DESC LIMIT 1"
    )
    return _arms(rows[0][0])[0] if rows else None


def actions(store: Store, name: str = "") -> list[Action]:
    where, values = ("WHERE experiment = ?", (name,)) if name else ("", ())
    rows = store.query(
        f"SELECT experiment, at_ms, actor, action, detail FROM experiment_actions {where} "
        "ORDER BY at_ms",
        values,
    )
    return [Action(*row) for row in rows]


def _running(store: Store, name: str) -> Experiment:
    experiment = get(store, name)
    if experiment is None:
        raise InvalidInput(f"no experiment named {name!r}")
    if experiment.status != "running":
        raise InvalidInput(f"experiment {name!r} is {experiment.status}, not running")
    return experiment


def _experiments(store: Store, clause: str, values: tuple) -> list[Experiment]:
    rows = store.query(
        f"SELECT name, arms, status, started_ms, started_by, note FROM experiments {clause}",
        values,
    )
    return [Experiment(n, _arms(a), s, ms, by, note) for n, a, s, ms, by, note in rows]


def _recorded(action: Action) -> Write:
    """Actions are ordered by their time, and the last promotion is the default: one that falls
    in the same millisecond as the action before it is recorded a millisecond after it."""
    return (
        "INSERT INTO experiment_actions (experiment, at_ms, actor, action, detail) "
        "SELECT ?, CASE WHEN MAX(at_ms) >= ? THEN MAX(at_ms) + 1 ELSE ? END, ?, ?, ? "
        "FROM experiment_actions",
        (
            action.experiment, action.at_ms, action.at_ms, action.actor, action.action,
            action.detail,
        ),
    )  # fmt: skip


def _arms_json(arms: tuple[Arm, ...]) -> str:
    return json.dumps([dataclasses.asdict(arm) for arm in arms])


def _arms(text: str) -> tuple[Arm, ...]:
    return tuple(
        Arm(a["name"], a["weight"], a["template"], a["adapter"], tuple(map(tuple, a["settings"])))
        for a in json.loads(text)
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
