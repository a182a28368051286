import pytest

from ghostpen.editor_client.feedback import Feedback
from ghostpen.proto import ghostpen_pb2 as pb


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_events_carry_the_completion_and_time_since_shown_and_retention_follows() -> None:
    clock, sent = Clock(), []
    feedback = Feedback(sent.append, clock)
    feedback.shown("c1")
    feedback.shown("c1")  # redrawn: still one event
    clock.now += 1.25
    feedback.accepted("c1", "a.py", 4, "x = 1\n")
    feedback.rejected("c2", "typed_over")
    assert [e.WhichOneof("kind") for e in sent] == ["shown", "accepted", "rejected"]
    assert all(e.completion_id for e in sent) and len({e.event_id for e in sent}) == 3
    assert sent[1].accepted == pb.Accepted(ms_since_shown=1250, accepted_chars=6)
    assert sent[2].rejected.reason == pb.Rejected.REASON_TYPED_OVER

    clock.now += 15
    feedback.retention.check_due({"a.py": "def x = 1\n"}.get)
    (check,) = sent[3:]
    assert check.retention.after_s == 15 and check.retention.retained_fraction == 1.0


def test_unknown_units_and_reasons_are_refused() -> None:
    feedback = Feedback(lambda event: None)
    with pytest.raises(ValueError, match="unit must be one of word, line"):
        feedback.partially_accepted("c1", "a.py", 0, "x", "char")
    with pytest.raises(ValueError, match="reason must be one of dismissed, typed_over"):
        feedback.rejected("c1", "bored")


@pytest.mark.parametrize(
    ("limit", "sent_text"), [(100, b"x = 12\n"), (7, b"x = 12\n"), (6, b""), (0, b"")]
)
def test_the_correction_goes_with_the_5_minute_check_with_consent_and_within_the_limit(
    limit: int, sent_text: bytes
) -> None:
    """0: no consent (Welcome.capture_text false); the correction is 7 characters."""
    clock, sent = Clock(), []
    feedback = Feedback(sent.append, clock, corrections=lambda: limit)
    feedback.accepted("c1", "a.py", 0, "x = 1\n")
    for seconds in (15, 15, 90, 180):
        clock.now += seconds
        feedback.retention.check_due({"a.py": "x = 12\ny = 2\n"}.get)
    checks = [e.retention for e in sent if e.WhichOneof("kind") == "retention"]
    assert [c.after_s for c in checks] == [15, 30, 120, 300]
    assert [c.final_text for c in checks] == [b""] * 3 + [sent_text]
