"""Paired bootstrap intervals, the report built on them, variant specs and the retrieval oracle."""

import dataclasses
import json

import pytest

from ghostpen.benchmarks.eval.report import (
    compare,
    gate_markdown,
    gate_rows,
    markdown,
    read_records,
    summary,
)
from ghostpen.benchmarks.eval.run import Record, Variant, _oracle, parse_variant
from ghostpen.context.chunker import Chunk
from ghostpen.server.stats import paired_bootstrap, proportion
from ghostpen.server.training.tasks import SourceFile, Task


def test_a_paired_difference_is_shown_only_when_its_interval_excludes_zero() -> None:
    same = paired_bootstrap([0.2, 0.5, 0.9], [0.2, 0.5, 0.9])
    assert (same.mean, same.low, same.high, same.shown) == (0.0, 0.0, 0.0, False)
    assert same.describe().endswith("no difference shown")
    better = paired_bootstrap([0.0] * 50, [1.0] * 40 + [0.0] * 10)
    assert better.mean == pytest.approx(0.8) and better.shown and 0.65 < better.low < 0.8
    noisy = paired_bootstrap([0.0, 1.0] * 20, [1.0, 0.0] * 20)
    assert noisy.low < 0 < noisy.high and not noisy.shown
    # Pairing: a constant shift over very different tasks is certain.
    shifted = paired_bootstrap([0.1, 0.9, 0.4, 0.7], [0.15, 0.95, 0.45, 0.75])
    assert shifted.low == pytest.approx(0.05) and shifted.high == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_tasks_of_one_file_are_resampled_together() -> None:
    """Ten files, each with ten cuts that all gained or all lost: ten observations, not 100.
    By task the interval is too sure of the +0.4; by file it is as wide as ten files allow."""
    gains = [1.0] * 70 + [-1.0] * 30  # seven files gained, three lost
    files = [f"f{i // 10}" for i in range(100)]
    by_task = paired_bootstrap([0.0] * 100, gains)
    by_file = paired_bootstrap([0.0] * 100, gains, clusters=files)
    assert by_task.mean == by_file.mean == pytest.approx(0.4)
    assert by_task.shown and not by_file.shown
    assert by_file.high - by_file.low > 2 * (by_task.high - by_task.low)
    # unequal files weigh by their tasks: the estimate stays the mean over tasks
    uneven = paired_bootstrap([0.0] * 4, [1.0, 1.0, 1.0, 0.0], clusters=["a", "a", "a", "b"])
    assert uneven.mean == pytest.approx(0.75) and uneven.low == 0.0 and uneven.high == 1.0
    with pytest.raises(ValueError, match="one cluster a task"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], clusters=["a"])


def record(task_id: str, variant: str, exact: float, **fields) -> Record:
    values = dict(
        task_id=task_id, project="p", language="python", kind="line", variant=variant,
        expected="x", predicted="x" if exact else "y", exact=exact, edit_similarity=exact,
        identifier_exact=exact, identifier_f1=exact, oracle=False, recalled=False, passed=None,
        prompt_tokens=10, completion_tokens=2, context_ms=1.0, total_ms=2.0,
    )  # fmt: skip
    return Record(**{**values, **fields})


def test_the_summary_pairs_tasks_and_groups_by_language_and_kind(tmp_path) -> None:
    records = [record(f"t{i}", "ed", 1.0) for i in range(30)]
    records += [record(f"t{i}", "none", 0.0) for i in range(30)]
    records += [record("g", "ed", 1.0, language="go", oracle=True, recalled=True)]
    records += [record("g", "none", 1.0, language="go", oracle=True, recalled=False)]
    rows = summary(records, ["ed", "none"])
    assert [(r["group"], r["variant"]) for r in rows] == [
        ("all", "ed"), ("all", "none"), ("go", "ed"), ("go", "none"),
        ("python", "ed"), ("python", "none"), ("needs context", "ed"), ("needs context", "none"),
    ]  # fmt: skip
    assert (
        rows[1]["exact_match"] == pytest.approx(1 / 31, abs=1e-4)
        and "exact_match_diff" not in rows[0]
    )
    assert rows[1]["exact_match_diff"].startswith("-0.968 (CI")
    assert rows[2]["recall_at_k"] == 1.0 and rows[2]["recall_at_k_tasks"] == 1
    assert rows[0]["pass_at_1"] is None
    table = markdown(rows, ["ed", "none"])
    assert "pass_at_1" not in table and "Differences from `ed`" in table
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
    assert read_records(path) == records
    later = [dataclasses.replace(r, exact=1.0) for r in records]
    (row_ed, row_none) = compare(records, later)
    assert row_ed["variant"] == "ed" and "no difference shown" in row_ed["exact_match"]
    assert row_none["exact_match"].startswith("+0.968")


def test_the_tasks_that_need_another_file_are_reported_apart_per_language() -> None:
    """Context can only help where the answer needs another file's definition: a run of all
    tasks also reports those, overall and per language, from the same records."""
    records = [record(f"p{i}", "none", 0.0, oracle=i < 4) for i in range(10)]
    records += [record(f"p{i}", "ed", float(i < 4), oracle=i < 4) for i in range(10)]
    records += [
        record(f"g{i}", v, 0.0, language="go", oracle=i < 2)
        for i in range(6)
        for v in ("none", "ed")
    ]
    rows = {(r["group"], r["variant"]): r for r in summary(records, ["none", "ed"])}
    assert rows["needs context", "ed"]["tasks"] == 6
    assert rows["needs context", "ed"]["exact_match"] == pytest.approx(4 / 6, abs=1e-4)
    assert rows["needs context: python", "ed"]["exact_match_diff"].startswith("+1.000")
    assert rows["needs context: go", "ed"]["exact_match_diff"].startswith("+0.000")
    assert rows["all", "ed"]["exact_match"] == pytest.approx(4 / 16, abs=1e-4)
    every = [dataclasses.replace(r, oracle=True) for r in records]
    assert not any("needs context" in str(r["group"]) for r in summary(every, ["none", "ed"]))


def test_the_report_resamples_the_files_tasks_were_cut_from() -> None:
    """As above: ten files of ten tasks, seven files gained and three lost, in the report and
    in the comparison of two runs. By task the +0.2 would be shown; by file it is not."""
    ids = [f"src/f{i // 10}.py:{i}:line" for i in range(100)]
    records = [record(t, "base", 0.5) for t in ids]
    records += [record(t, "new", 1.0 if i < 70 else 0.0) for i, t in enumerate(ids)]
    assert records[0].file == "p/src/f0.py"
    assert paired_bootstrap([0.5] * 100, [r.exact for r in records[100:]]).shown
    [_, new] = [r for r in summary(records, ["base", "new"]) if r["group"] == "all"]
    assert new["exact_match_diff"].startswith("+0.200")
    assert new["exact_match_diff"].endswith("no difference shown")
    later = [dataclasses.replace(r, variant="base") for r in records[100:]]
    [row] = compare(records[:100], later)
    assert row["exact_match"].startswith("+0.200")
    assert row["exact_match"].endswith("no difference shown")


def test_variant_specs_change_one_part_each() -> None:
    assert parse_variant("none") == Variant("none", strategy="none")
    assert parse_variant("template:generic-prefix") == Variant(
        "template:generic-prefix", template="generic-prefix"
    )
    assert parse_variant("bm25+suffix_token_budget=0+raw") == Variant(
        "bm25+suffix_token_budget=0+raw", "bm25", "", False, (("suffix_token_budget", 0),)
    )
    assert parse_variant("chars_per_token=2.5").context == (("chars_per_token", 2.5),)
    assert parse_variant("show_min_confidence=-0.5").context == (("show_min_confidence", -0.5),)
    assert parse_variant("oracle+template:generic-prefix").strategy == "oracle"
    with pytest.raises(ValueError, match="variant part 'fast' is none of"):
        parse_variant("fast")
    with pytest.raises(ValueError, match="unknown prompt template 'nope'"):
        parse_variant("template:nope")


def test_the_oracle_is_the_chunks_that_define_the_names_the_answer_needs() -> None:
    here = SourceFile("p/cart.py", "python", "import money\n\nlabel = \nmore = 1\n")
    task = Task("line", here, here.text.index("label = ") + 8, "money.to_display(cents)", ())
    defines = Chunk.of("p/money.py", 0, 2, "def to_display(cents):\n    return str(cents)")
    uses = Chunk.of("p/report.py", 0, 1, "print(to_display(5))")
    java = Chunk.of("p/M.java", 0, 1, "  public static String to_display(int cents) {")
    call = Chunk.of("p/J.java", 0, 1, "    return to_display(cents);")
    assert _oracle(task, [defines, uses, java, call]) == {defines, java}


def test_a_share_gets_wilsons_interval() -> None:
    half = proportion(10, 20)
    assert half.value == 0.5 and (half.low, half.high) == pytest.approx((0.299, 0.701), abs=1e-3)
    none = proportion(0, 10)  # never zero-width at the edges, unlike the normal approximation
    assert (none.low, round(none.high, 3)) == (0.0, 0.278)
    assert proportion(0, 0).describe() == "none"
    with pytest.raises(ValueError, match="0 <= hits <= of"):
        proportion(3, 2)


def test_the_gate_table_trades_precision_for_recall_by_the_recorded_verdicts() -> None:
    def shadowed(i: int, kept: bool, sure: float, withheld: str = "") -> Record:
        return record(f"t{i}", "ed", 1.0 if kept else 0.0, confidence=sure, withheld=withheld)

    records = [shadowed(i, True, -0.1) for i in range(6)]  # kept and sure
    records += [shadowed(10 + i, False, -2.0, "unsure") for i in range(3)]  # rejected, unsure
    records += [shadowed(20, True, -2.0, "unsure")]  # kept, though unsure
    records += [shadowed(30, False, -0.1, "closers")]  # withheld whatever the floor
    records += [record("t40", "ed", 0.0, predicted="")]  # no suggestion: not counted
    rows = {row["rule"]: row for row in gate_rows(records, ["ed"])}
    assert rows["no gate"]["shown"] == "11 of 11"
    assert rows["no gate"]["precision"].startswith("0.636")  # 7 of 11
    assert rows["blank, closers, repeats"]["shown"] == "10 of 11"
    floor = rows["... and confidence >= -1.0"]
    assert floor["shown"] == "6 of 11"
    assert floor["precision"].startswith("1.000") and floor["recall"].startswith("0.857")
    assert "| ed | no gate | 11 of 11 |" in gate_markdown(list(rows.values()))
