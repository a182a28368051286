from ghostpen.editor_client.cache import Anchor, CompletionCache, Suggestion

BEFORE = "def area(r):\n    return "
AFTER = "\n"


def test_typing_through_a_suggestion_shows_the_rest_without_a_request() -> None:
    cache = CompletionCache(entries=4)
    cache.put(Anchor("a.py", BEFORE, AFTER), "c1", "3.14 * r * r")
    assert cache.get(Anchor("a.py", BEFORE, AFTER)) == Suggestion("c1", "3.14 * r * r")
    assert cache.get(Anchor("a.py", BEFORE + "3.1", AFTER)) == Suggestion("c1", "4 * r * r")
    assert cache.get(Anchor("a.py", BEFORE + "3.2", AFTER)) is None  # typed something else
    assert cache.get(Anchor("a.py", BEFORE + "3.14 * r * r", AFTER)) is None  # all typed
    assert cache.get(Anchor("a.py", BEFORE + "3", "x\n")) is None  # text after changed
    assert cache.get(Anchor("b.py", BEFORE, AFTER)) is None


def test_the_newest_matching_entry_wins_and_old_ones_are_dropped() -> None:
    cache = CompletionCache(entries=2)
    cache.put(Anchor("a.py", BEFORE, AFTER), "c1", "r * r")
    cache.put(Anchor("a.py", BEFORE + "r", AFTER), "c2", " ** 2")
    assert cache.get(Anchor("a.py", BEFORE + "r", AFTER)) == Suggestion("c2", " ** 2")
    cache.put(Anchor("a.py", "x", ""), "c3", "y")
    cache.put(Anchor("a.py", "y", ""), "c4", "z")
    assert cache.get(Anchor("a.py", BEFORE + "r", AFTER)) is None
