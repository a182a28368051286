import pytest

from ghostpen.context.gate import confidence, withhold_reason
from ghostpen.context.postprocess import CursorSurroundings, Mode
from ghostpen.context.settings import ContextSettings

SETTINGS = ContextSettings(show_min_confidence=-1.0)
PREFIX = "def total(items):\n    result = 0\n    for item in items:\n        result += item\n    "


def verdict(text: str, sure: float | None = -0.1, prefix: str = PREFIX) -> str:
    cursor = CursorSurroundings.around(prefix, "\n", Mode.MULTI_LINE, ())
    return withhold_reason(text, cursor, sure, SETTINGS)


@pytest.mark.parametrize(
    ("text", "sure", "reason"),
    [
        ("return result", -0.1, ""),
        ("return result", None, ""),  # an engine that gives no log-probabilities: not judged
        ("return result", -1.5, "unsure"),
        ("  \n ", -0.1, "blank"),
        ("});", -0.1, "closers"),
        ("result += item", -0.1, "repeats"),  # the line just above, again
        ("for item in items:\n        result += item", -0.1, "repeats"),
        ("for item in items:\n        result -= item", -0.1, ""),  # one new line: not a copy
    ],
)
def test_verdicts(text: str, sure: float | None, reason: str) -> None:
    assert verdict(text, sure) == reason


def test_a_copied_line_counts_with_what_the_cursor_line_already_holds() -> None:
    # "    result" + " += item" is the line above: the completed cursor line repeats it
    assert verdict(" += item", prefix=PREFIX + "result") == "repeats"
    assert verdict(" *= item", prefix=PREFIX + "result") == ""


def test_confidence_is_the_mean_log_probability() -> None:
    assert confidence([-0.5, -1.5]) == -1.0
    assert confidence([]) is None
