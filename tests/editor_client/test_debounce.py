import pytest

from ghostpen.editor_client.debounce import AdaptiveDebounce, automatic_request_allowed
from ghostpen.editor_client.settings import ClientSettings


@pytest.mark.parametrize(
    ("before", "after", "allowed"),
    [
        ("    return ", "", True),
        ("    x = foo(", ")", True),
        ("    x = foo(", ")]:  ", True),  # only closers follow
        ("    val", "ue = 1", False),  # in the middle of a word
        ("    x = ", "_private", False),
        ("    x = ", "1 + 2 + 3", False),  # real text follows
        ("    x = ", "-1;", True),  # a few characters follow
    ],
)
def test_automatic_requests_only_where_a_completion_can_go(before, after, allowed) -> None:
    assert automatic_request_allowed(before, after, max_chars_after=3) is allowed


def typed(debounce: AdaptiveDebounce, interval_ms: float, keys: int = 10) -> None:
    for key in range(keys):
        debounce.keystroke(key * interval_ms)


def test_the_wait_follows_the_typing_rhythm_within_its_bounds() -> None:
    settings = ClientSettings(debounce_min_ms=25, debounce_max_ms=250)
    fast, slow, glacial = (AdaptiveDebounce(settings) for _ in range(3))
    typed(fast, 40)
    typed(slow, 110)
    typed(glacial, 900)
    mid_line = ("    x = foo", "")
    assert 25 <= fast.delay_ms(*mid_line) < slow.delay_ms(*mid_line) <= 250
    assert glacial.delay_ms(*mid_line) == 250
    assert fast.typical_interval_ms == pytest.approx(40)


def test_a_likely_completion_point_waits_less_and_pauses_are_not_rhythm() -> None:
    debounce = AdaptiveDebounce(ClientSettings(debounce_min_ms=0, debounce_max_ms=1000))
    typed(debounce, 100)
    debounce.keystroke(10_000)  # a long pause: thinking, not typing
    assert debounce.typical_interval_ms == pytest.approx(100)
    at_opener = debounce.delay_ms("    x = foo(", "")
    mid_word = debounce.delay_ms("    x = fo", "")
    assert at_opener == pytest.approx(100) and mid_word == pytest.approx(150)
