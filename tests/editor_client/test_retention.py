from ghostpen.editor_client.retention import INTERVALS_S, RetentionCheck, RetentionTracker

ACCEPTED = "total = sum(item.price for item in cart)\n"
BEFORE = "def checkout(cart):\n    "
AFTER = "    return total\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker_with(text: str) -> tuple[RetentionTracker, FakeClock, list[RetentionCheck], dict]:
    clock = FakeClock()
    checks: list[RetentionCheck] = []
    files = {"shop.py": text}
    tracker = RetentionTracker(clock, checks.append)
    tracker.accepted("c1", "shop.py", len(BEFORE), ACCEPTED)
    return tracker, clock, checks, files


def advance(tracker, clock, files, seconds: float) -> None:
    clock.now += seconds
    tracker.check_due(files.get)


def test_checks_come_at_each_interval_and_unchanged_text_is_fully_retained() -> None:
    tracker, clock, checks, files = tracker_with(BEFORE + ACCEPTED + AFTER)
    advance(tracker, clock, files, 14.9)
    assert checks == []
    for seconds in (0.1, 15, 90, 180, 300):
        advance(tracker, clock, files, seconds)
    assert [c.after_s for c in checks] == list(INTERVALS_S)
    assert all(c.retained_fraction == 1.0 and c.present and not c.file_closed for c in checks)
    assert tracker.pending == 0


def test_edited_text_is_partly_retained() -> None:
    tracker, clock, checks, files = tracker_with(BEFORE + ACCEPTED + AFTER)
    edited = ACCEPTED.replace("item.price", "line.unit_price * line.qty").replace("item", "line")
    files["shop.py"] = BEFORE + edited + AFTER
    advance(tracker, clock, files, 15)
    [check] = checks
    assert 0.5 <= check.retained_fraction < 0.9 and check.present


def test_partly_deleted_text() -> None:
    tracker, clock, checks, files = tracker_with(BEFORE + ACCEPTED + AFTER)
    files["shop.py"] = BEFORE + "total = sum(\n" + AFTER
    advance(tracker, clock, files, 15)
    assert checks[0].retained_fraction < 0.5 and not checks[0].present


def test_text_moved_by_edits_above_is_found_where_it_went() -> None:
    header = "import decimal\n" * 40
    tracker, clock, checks, files = tracker_with(BEFORE + ACCEPTED + AFTER)
    files["shop.py"] = header + BEFORE + ACCEPTED + AFTER
    tracker.edited("shop.py", 0, 0, header)
    advance(tracker, clock, files, 15)
    assert checks[0].retained_fraction == 1.0


def test_removed_text_is_not_present() -> None:
    tracker, clock, checks, files = tracker_with(BEFORE + ACCEPTED + AFTER)
    files["shop.py"] = BEFORE + AFTER
    advance(tracker, clock, files, 15)
    assert checks[0].retained_fraction < 0.5 and not checks[0].present


def test_a_closed_file_reports_on_its_last_text() -> None:
    tracker, clock, checks, files = tracker_with(BEFORE + ACCEPTED + AFTER)
    tracker.closed("shop.py", BEFORE + ACCEPTED + AFTER)
    del files["shop.py"]
    advance(tracker, clock, files, 30)
    assert [(c.after_s, c.retained_fraction, c.file_closed) for c in checks] == [
        (15, 1.0, True),
        (30, 1.0, True),
    ]


def test_stopping_drops_pending_checks_and_says_which() -> None:
    tracker, clock, checks, files = tracker_with(BEFORE + ACCEPTED + AFTER)
    advance(tracker, clock, files, 20)
    assert tracker.abandon() == [("c1", 30), ("c1", 120), ("c1", 300), ("c1", 600)]
    advance(tracker, clock, files, 600)
    assert [c.after_s for c in checks] == [15]


def test_the_best_match_is_the_correction_of_the_accepted_text() -> None:
    tracker, clock, checks, files = tracker_with(BEFORE + ACCEPTED + AFTER)
    corrected = "total = sum(item.price * item.qty for item in cart)\n"
    files["shop.py"] = BEFORE + corrected + AFTER
    advance(tracker, clock, files, 15)
    [check] = checks
    assert check.final_text == corrected
