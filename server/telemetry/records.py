"""The telemetry messages that cross layers, and the checks an event must pass to be stored."""

from __future__ import annotations

import operator
from collections.abc import Sequence
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
    experiment: str = ""  # the experiment it was served in, if any; its events are joined to it
    arm: str = ""

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
    # retention, with consent: the accepted region as the developer corrected it. Never in the
    # events table: it is captured text, kept (and deleted) with its completion's capture.
    final_text: str | None = None

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


@dataclass(frozen=True)
class CaptureRecord:
    """A completion's text, kept with consent (TelemetrySettings.capture_text) to train on:
    what its prompt was made of and what it suggested. `prefix` and `suffix` are the prompt's
    windows; `healed`, the blanks the prompt left out before the cursor (the model wrote them)."""

    completion_id: str
    created_ms: int
    user_id: str
    tenant: str
    template_id: str
    repo: str
    path: str
    language: str
    prefix: str
    suffix: str
    healed: str
    context: str  # JSON: [{"path", "start_line", "end_line", "text"}], in prompt order
    shown: str  # the suggestion (a withheld one is not captured)

    def row(self) -> tuple:
        return _CAPTURE_ROW(self)


def corrections(events: Sequence[TelemetryEvent]) -> list[tuple]:
    """The corrections the events carry, as rows of the corrections table."""
    return [
        (e.completion_id, e.after_s, e.final_text, e.received_ms)
        for e in events
        if e.final_text is not None
    ]


EVENT_COLUMNS = tuple(f.name for f in fields(TelemetryEvent) if f.name != "final_text")
CAPTURE_COLUMNS = tuple(f.name for f in fields(CaptureRecord))
_COMPLETION_ROW = operator.attrgetter(*(f.name for f in fields(CompletionRecord)))
_EVENT_ROW = operator.attrgetter(*EVENT_COLUMNS)
_CAPTURE_ROW = operator.attrgetter(*CAPTURE_COLUMNS)
