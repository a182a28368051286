"""Which completer serves whom: the running experiment's arms over the promoted default, as the
server last read them from the database (server/experiments.py).

A session is served by one completer for its life, the one its arm had when it started: a
developer's completions do not change arm mid-session when an experiment starts or stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ghostpen.context.template import Template
from ghostpen.server import experiments, prompts
from ghostpen.server.completion import OUTSIDE, Assignment, Completer
from ghostpen.server.errors import GhostpenError, StoreUnavailable
from ghostpen.server.experiments import Arm, Experiment
from ghostpen.server.identity import LOCAL, Identity
from ghostpen.server.telemetry.store import Store

log = logging.getLogger(__name__)

Read = Callable[[Callable[[Store], Any]], Awaitable[Any]]  # StoreProcess.call


class Traffic:
    def __init__(self, base: Completer, adapters: Mapping[str, object]) -> None:
        self._base = base  # the server's settings
        self._adapters = adapters
        self._read: tuple[Experiment | None, Arm | None] = (None, None)  # as last loaded
        self._experiment: Experiment | None = None  # served: None when it cannot be
        self._completers: dict[str, Completer] = {"": base}  # by arm; "" for the default

    @property
    def experiment(self) -> Experiment | None:
        return self._experiment

    @property
    def default(self) -> Completer:
        """What serves outside the experiment: the promoted default, else the settings."""
        return self._completers[""]

    def load(
        self,
        experiment: Experiment | None,
        default: Arm | None,
        templates: Mapping[str, Template] = {},
    ) -> None:
        """Serve `experiment` over `default` from now on; `templates`: those their arms name,
        resolved (server/prompts.py). An arm this server cannot serve (an adapter it has not
        loaded) keeps the whole experiment off here, with a logged reason."""
        if (experiment, default) == self._read:  # unchanged, whether it was served or not
            return
        self._read = (experiment, default)
        served = self._completer(default, OUTSIDE, templates) if default else self._base
        completers = {"": served}
        if experiment is not None:
            try:
                experiments.check(experiment.arms, self._adapters, templates.__getitem__)
                for arm in experiment.arms:
                    assignment = Assignment(experiment.name, arm.name)
                    arm_over = arm.over(default)
                    completers[arm.name] = self._completer(arm_over, assignment, templates)
            except (GhostpenError, ValueError, KeyError) as error:
                log.error("experiment %s is not served here: %s", experiment.name, error)
                experiment, completers = None, {"": served}
        self._experiment, self._completers = experiment, completers

    def completer(self, owner: Identity, session_key: str) -> Completer:
        """Whose arm: the user's, or on a server without users the editor's session key."""
        if self._experiment is None:
            return self._completers[""]
        key = session_key if owner == LOCAL else f"{owner.tenant}/{owner.user}"
        return self._completers[self._experiment.assign(key).name]

    async def refresh(self, read: Read) -> None:
        """Load what the database says now."""
        self.load(*await read(_read))

    async def follow(self, read: Read, every_s: float) -> None:
        """Refresh every `every_s`."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh(read)
            except StoreUnavailable as error:
                log.warning("experiments not read; serving what was read before: %s", error)
            except Exception:  # a bug of ours must not stop the following for good
                log.exception("experiments not read")

    def _completer(
        self, arm: Arm, assignment: Assignment, templates: Mapping[str, Template]
    ) -> Completer:
        base = self._base
        return base.varied(
            template=templates[arm.template] if arm.template else None,
            context=arm.context(base.context_settings),
            adapter=arm.adapter,
            assignment=assignment,
        )


def _read(store: Store) -> tuple[Experiment | None, Arm | None, dict[str, Template]]:
    running, default = experiments.current(store), experiments.default(store)
    arms = [*(running.arms if running else ()), *((default,) if default else ())]
    named = {arm.template for arm in arms if arm.template}
    return running, default, {name: prompts.resolve(store, name) for name in named}
