"""Which KV sequence a request gets, what it reuses and what is evicted: no model needed."""

from __future__ import annotations

from ghostpen.server.engines.sequences import SequenceTable


def served(table: SequenceTable, key: str, prompt: list[int], now: float, adapter: str = ""):
    """Assign, pretend the prompt was read into the KV, release."""
    assignment = table.assign(key, adapter, prompt, now)
    assert assignment is not None
    assignment.sequence.tokens.extend(prompt[assignment.reused :])
    table.release(assignment.sequence, now)
    return assignment


def test_a_session_reuses_the_prefix_its_sequence_shares_with_the_new_prompt() -> None:
    table = SequenceTable(2)
    first = served(table, "a", [1, 2, 3, 4], 1.0)
    assert (first.reused, first.evicted) == (0, False)
    again = served(table, "a", [1, 2, 3, 9, 9], 2.0)
    assert again.sequence is first.sequence
    assert again.reused == 3
    assert again.sequence.tokens == [1, 2, 3, 9, 9]


def test_an_identical_prompt_leaves_its_last_token_to_be_read_for_logits() -> None:
    table = SequenceTable(1)
    served(table, "a", [1, 2, 3], 1.0)
    again = table.assign("a", "", [1, 2, 3], 2.0)
    assert again is not None and again.reused == 2
    assert again.sequence.tokens == [1, 2]


def test_new_sessions_take_empty_sequences_then_evict_the_least_recently_used() -> None:
    table = SequenceTable(2)
    a = served(table, "a", [1, 2], 1.0)
    b = served(table, "b", [3, 4], 2.0)
    assert a.sequence is not b.sequence and not b.evicted
    served(table, "a", [1, 2, 5], 3.0)  # a is used again: b is now the oldest
    c = served(table, "c", [1, 2, 6], 4.0)
    assert c.sequence is b.sequence and c.evicted and c.reused == 0
    assert table.resident == 2
    back = served(table, "b", [3, 4], 5.0)  # b lost its KV: it reads its prompt again
    assert back.evicted and back.reused == 0 and back.sequence is a.sequence


def test_busy_sequences_are_never_taken() -> None:
    table = SequenceTable(1)
    held = table.assign("a", "", [1, 2], 1.0)
    assert held is not None
    assert table.assign("a", "", [1, 2, 3], 2.0) is None  # its own, still busy
    assert table.assign("b", "", [5], 2.0) is None  # the only one, busy
    table.release(held.sequence, 3.0)
    assert table.assign("b", "", [5], 4.0) is not None


def test_requests_without_a_session_take_the_longest_shared_prefix() -> None:
    table = SequenceTable(3)
    served(table, "", [1, 2, 3, 4], 1.0)
    served(table, "s", [7, 8, 9], 2.0)
    best = served(table, "", [7, 8, 9, 10], 3.0)
    assert best.reused == 3 and best.evicted  # the session's prefix was the best, and is gone
    plain = served(table, "", [1, 2, 5], 4.0)
    assert plain.reused == 2 and not plain.evicted


def test_kv_computed_under_another_adapter_is_not_reused() -> None:
    table = SequenceTable(1)
    served(table, "a", [1, 2, 3], 1.0)
    tuned = served(table, "a", [1, 2, 3, 4], 2.0, adapter="team")
    assert tuned.reused == 0
    assert tuned.sequence.adapter == "team"
    assert table.tokens_used == 4


def test_runs_that_moved_left_are_shifted_when_shifting_is_on() -> None:
    """The prompt dropped [3, 4] (a context chunk) and [7] (a line): what follows moved left."""
    table = SequenceTable(1, shift_min_tokens=2)
    served(table, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 1.0)
    again = served(table, "a", [1, 2, 5, 6, 8, 9, 10, 11], 2.0)
    assert [(s.start, s.end, s.by) for s in again.shifts] == [(4, 6, -2), (7, 10, -3)]
    assert again.reused == 7  # 1 2 | 5 6 | 8 9 10 in the KV; 11 is read
    assert again.sequence.tokens == [1, 2, 5, 6, 8, 9, 10, 11]


def test_runs_shorter_than_the_minimum_and_text_inserted_before_them_are_read_again() -> None:
    table = SequenceTable(1, shift_min_tokens=3)
    served(table, "a", [1, 2, 3, 4, 5, 6, 7], 1.0)
    short = served(table, "a", [1, 4, 5, 9], 2.0)  # the run 4 5 is under the minimum
    assert (short.shifts, short.reused) == ((), 1)
    served(table, "b", [1, 2, 3, 4, 5, 6, 7, 8], 3.0)
    inserted = served(table, "b", [1, 2, 0, 4, 5, 6, 7, 8], 4.0)  # removal only
    assert (inserted.shifts, inserted.reused) == ((), 2)


def test_the_last_prompt_token_is_never_shifted_in_and_off_means_no_shifts() -> None:
    table = SequenceTable(1, shift_min_tokens=2)
    served(table, "a", [1, 2, 3, 4, 5], 1.0)
    again = served(table, "a", [1, 3, 4, 5], 2.0)
    assert [(s.start, s.end, s.by) for s in again.shifts] == [(2, 4, -1)]
    assert again.reused == 3  # 5, the last, is read for its logits
    off = SequenceTable(1)
    served(off, "a", [1, 2, 3, 4, 5], 1.0)
    assert served(off, "a", [1, 3, 4, 5], 2.0).reused == 1
