"""The telemetry messages that cross layers, and the checks an event must pass to be stored."""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields

from ghostpen.server.errors import InvalidInput

RETENTION_INTERVALS_S = (15, 30, 120, 300, 600)
KINDS = ("shown", "accepted", "partially_accepted", "rejected", "retention")


@dataclass(frozen=True)
class CompletionRecord:
    """What the server knows of a completion it served; events are joined to it."""

    completion_id: str
    created_ms: int
    model: str
    template_id: str
    template_hash: str
    engine: str
    language: str
    mode: str
    prompt_tokens: int
    completion_tokens: int
    first_token_ms: float
    total_ms: float
    finish: str
    chars: int  # shown: what an accepted event may accept at most
    user_id: str = ""  # the owner (server/identity.py): only they report on it
    team: str = ""
    tenant: str = ""
    confidence: float | None = None  # the mean log-probability of its tokens, if the engine said
    withheld: str = ""  # the show gate's verdict ("": shown); kept in shadow mode too

    def row(self) -> tuple:
        """Its fields in order, as the database stores them."""
        return _COMPLETION_ROW(self)


@dataclass(frozen=True)
class TelemetryEvent:
    event_id: str
    completion_id: str
    kind: str
    client_ms: int
    received_ms: int
    ms_since_shown: int | None = None
    accepted_chars: int | None = None
    unit: str | None = None  # partially_accepted: word | line
    reason: str | None = None  # rejected: dismissed | typed_over
    after_s: int | None = None  # retention
    fraction: float | None = None
    present: bool | None = None
    file_closed: bool | None = None
    user_id: str = ""  # who reported it: event ids are unique per user

    @property
    def key(self) -> tuple[str, str]:
        return (self.user_id, self.event_id)

    def row(self) -> tuple:
        """Its fields in order, as the database stores them."""
        return _EVENT_ROW(self)

    def check(self, max_id_chars: int) -> None:
        if not self.event_id or len(self.event_id) > max_id_chars:
            raise InvalidInput(
                f"event_id must have 1..{max_id_chars} characters (max_request_id_chars)"
            )
        if not self.completion_id:
            raise InvalidInput(f"event {self.event_id!r} has no completion_id")
        if self.kind not in KINDS:
            raise InvalidInput(
                f"event {self.event_id!r} has no known kind; set one of {', '.join(KINDS)}"
            )
        if self.kind == "retention":
            if self.after_s not in RETENTION_INTERVALS_S:
                raise InvalidInput(
                    f"retention after {self.after_s} s: the intervals are "
                    f"{', '.join(map(str, RETENTION_INTERVALS_S))} s"
                )
            if self.fraction is None or not 0.0 <= self.fraction <= 1.0:
                raise InvalidInput(
                    f"retained_fraction {self.fraction} of event {self.event_id!r} is outside 0..1"
                )


_COMPLETION_ROW = operator.attrgetter(*(f.name for f in fields(CompletionRecord)))
_EVENT_ROW = operator.attrgetter(*(f.name for f in fields(TelemetryEvent)))
