"""What the developer did with each suggestion, as telemetry events for the server.

Every event carries the completion id the server minted; the server joins it to the model,
template and language. Accepted text is then followed for retention checks.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from ghostpen.editor_client.retention import RetentionCheck, RetentionTracker
from ghostpen.proto import ghostpen_pb2 as pb

SHOWN_KEPT = 1000  # completions whose time of showing is remembered
CORRECTION_AFTER_S = 300  # the retention check that carries the correction, with consent
UNITS = {"word": pb.PartiallyAccepted.UNIT_WORD, "line": pb.PartiallyAccepted.UNIT_LINE}
REASONS = {
    "dismissed": pb.Rejected.REASON_DISMISSED,
    "typed_over": pb.Rejected.REASON_TYPED_OVER,
}


class Feedback:
    def __init__(
        self,
        report: Callable[[pb.TelemetryEvent], None],
        clock: Callable[[], float] = time.monotonic,
        corrections: Callable[[], int] = lambda: 0,
    ) -> None:
        """`corrections()`: the longest final text of an accepted completion the server takes
        (Welcome.max_correction_chars), or 0 when it keeps no text for training
        (Welcome.capture_text); asked when a check is due. A longer correction is not sent: cut,
        it would teach a wrong ending."""
        self._report = report
        self._clock = clock
        self._corrections = corrections
        self._shown_at: OrderedDict[str, float] = OrderedDict()
        self.retention = RetentionTracker(clock, self._retention)

    def shown(self, completion_id: str) -> None:
        """Once per completion, however often the editor redraws it."""
        if completion_id not in self._shown_at:
            self._shown_at[completion_id] = self._clock()
            if len(self._shown_at) > SHOWN_KEPT:
                self._shown_at.popitem(last=False)
            self._send(completion_id, shown=pb.Shown())

    def accepted(self, completion_id: str, path: str, offset: int, text: str) -> None:
        self._send(
            completion_id,
            accepted=pb.Accepted(
                ms_since_shown=self._since_shown(completion_id), accepted_chars=len(text)
            ),
        )
        self.retention.accepted(completion_id, path, offset, text)

    def partially_accepted(
        self, completion_id: str, path: str, offset: int, text: str, unit: str
    ) -> None:
        """`unit`: "word" or "line"; a ValueError otherwise."""
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}: {unit!r}")
        self._send(
            completion_id,
            partially_accepted=pb.PartiallyAccepted(
                ms_since_shown=self._since_shown(completion_id),
                accepted_chars=len(text),
                unit=UNITS[unit],
            ),
        )
        self.retention.accepted(completion_id, path, offset, text)

    def rejected(self, completion_id: str, reason: str) -> None:
        """`reason`: "dismissed" or "typed_over"; a ValueError otherwise."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {', '.join(REASONS)}: {reason!r}")
        self._send(
            completion_id,
            rejected=pb.Rejected(
                ms_since_shown=self._since_shown(completion_id), reason=REASONS[reason]
            ),
        )

    def _since_shown(self, completion_id: str) -> int:
        shown = self._shown_at.get(completion_id)
        return 0 if shown is None else int((self._clock() - shown) * 1000)

    def _retention(self, check: RetentionCheck) -> None:
        limit = self._corrections() if check.after_s == CORRECTION_AFTER_S else 0
        corrected = 0 < len(check.final_text) <= limit
        self._send(
            check.completion_id,
            retention=pb.Retention(
                after_s=check.after_s,
                retained_fraction=check.retained_fraction,
                present=check.present,
                file_closed=check.file_closed,
                final_text=check.final_text.encode() if corrected else b"",
            ),
        )

    def _send(self, completion_id: str, **kind: object) -> None:
        self._report(
            pb.TelemetryEvent(
                event_id=uuid.uuid4().hex,
                completion_id=completion_id,
                client_time_unix_ms=int(time.time() * 1000),
                **kind,
            )
        )
