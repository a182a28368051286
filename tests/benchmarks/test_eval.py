import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from ghostpen.benchmarks.eval.metrics import identifier_match
from ghostpen.benchmarks.eval.strategies import STRATEGIES
from ghostpen.context.chunker import Chunk
from ghostpen.context.ranker import Exclusion
from ghostpen.server.training.heldout import edit_similarity, exact_match
from ghostpen.server.training.tasks import SourceFile, build_tasks, related, source_files


def write_tree(root: Path) -> None:
    (root / "pkg").mkdir()
    (root / "pkg" / "money.py").write_text(
        "def cents_to_display_string(cents):\n    return f'${cents // 100}.{cents % 100:02d}'\n"
    )
    (root / "pkg" / "cart.py").write_text(
        "import money\n\n\ndef total_label(items):\n"
        "    total = sum(item.price_cents for item in items)\n"
        "    return money.cents_to_display_string(total)\n"
    )
    (root / "notes.bin").write_bytes(b"\xff\xfe")


def test_task_building_is_deterministic_and_faithful(tmp_path: Path) -> None:
    write_tree(tmp_path)
    files = source_files(tmp_path, 10_000)
    first = build_tasks(files, 4, seed=3, max_files=12)
    assert first == build_tasks(files, 4, seed=3, max_files=12) and len(first) == 4
    assert len({task.task_id for task in first}) == 4, "a cursor is drawn once"
    for task in first:
        text = task.file.text
        assert text[task.cursor :].startswith(task.expected)
        assert task.expected and "\n" not in task.expected
        assert task.left + task.expected + task.right == text
        assert task.file.path not in {f.path for f in task.context}
    assert build_tasks(files, 4, seed=4, max_files=12) != first


def test_the_files_a_task_hands_over_are_those_it_mentions_then_the_nearest(tmp_path) -> None:
    files = [
        SourceFile("p/a/far.py", "python", "x = 1\n"),
        SourceFile("p/b/sibling.py", "python", "y = 2\n"),
        SourceFile("p/c/money.py", "python", "z = 3\n"),
        SourceFile("p/b/cart.py", "python", "import money\n\ntotal = money.z\n"),
    ]
    assert [f.path for f in related(files[3], files, max_files=12)] == [
        "p/c/money.py", "p/b/sibling.py", "p/a/far.py",
    ]  # fmt: skip
    assert len(related(files[3], files, max_files=2)) == 1


def test_block_tasks_take_the_body_after_an_opener(tmp_path: Path) -> None:
    write_tree(tmp_path)
    files = source_files(tmp_path, 10_000)
    tasks = build_tasks(files, 2, seed=0, max_files=12, kinds=("block",))
    assert len(tasks) == 2
    for task in tasks:
        assert task.kind == "block"
        assert task.left + task.expected + task.right == task.file.text
        assert task.left.rstrip(" ").endswith(":\n")
        assert task.expected.startswith(("return", "total"))
    go = SourceFile("m/main.go", "go", "func add(a, b int) int {\n\treturn a + b\n}\n")
    (task,) = build_tasks([go], 1, seed=0, max_files=12, kinds=("block",))
    assert task.expected == "return a + b" and task.right == "\n}\n"
    mixed = build_tasks(files, 4, seed=0, max_files=12, kinds=("line", "block"))
    assert sorted(task.kind for task in mixed) == ["block"] * 2 + ["line"] * 2
    with pytest.raises(ValueError, match="task kinds must be among line, rest_of_line, block"):
        build_tasks(files, 1, seed=0, max_files=12, kinds=("blocks",))


def test_in_a_git_repository_recency_is_the_last_commit(tmp_path: Path) -> None:
    write_tree(tmp_path)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    for path, day in (("pkg/cart.py", "2024-01-01"), ("pkg/money.py", "2024-06-01")):
        subprocess.run([*git, "add", path], check=True)
        when = {"GIT_AUTHOR_DATE": f"{day}T12:00:00", "GIT_COMMITTER_DATE": f"{day}T12:00:00"}
        subprocess.run([*git, "commit", "-q", "-m", path], check=True, env={**os.environ, **when})
    os.utime(tmp_path / "pkg" / "cart.py")  # touched now, but committed long before money.py
    assert [f.path for f in source_files(tmp_path, 10_000)] == ["pkg/money.py", "pkg/cart.py"]
    os.utime(tmp_path / "pkg" / "money.py", (0, 0))
    (tmp_path / "pkg" / "new.py").write_text("x = 1\n")  # never committed: its mtime counts
    assert next(f.path for f in source_files(tmp_path, 10_000)) == "pkg/new.py"


def test_metrics_match_hand_computed_values() -> None:
    assert exact_match(" total)", "total)") == 1.0
    assert edit_similarity("abcd", "abce") == 0.75
    assert identifier_match("f(a, b)", "f(a, b)") == (1.0, 1.0)
    exact, f1 = identifier_match("foo(bar)", "foo(baz, qux)")
    assert exact == 0.0 and f1 == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))


@pytest.mark.parametrize("name", ["edit-distance", "jaccard", "bm25"])
def test_every_strategy_finds_the_chunk_that_shares_the_names(name: str) -> None:
    chunks = [
        Chunk.of("a.py", 0, 2, "def cents_to_display_string(cents):\n    return cents / 100"),
        Chunk.of("b.py", 0, 2, "class Parser:\n    def parse(self, text): return text.split()"),
    ]
    ranked = STRATEGIES[name](
        "total = cents_to_display_string(cents)", chunks, Exclusion("", 0, 0), 2
    )
    assert ranked[0].chunk.path == "a.py"
    assert STRATEGIES["none"]("x", chunks, Exclusion("", 0, 0), 2) == []


async def test_the_harness_runs_tasks_through_the_real_pipeline(server, settings, tmp_path) -> None:
    from ghostpen.benchmarks.eval.report import markdown, summary
    from ghostpen.benchmarks.eval.run import EvalTask, evaluate, parse_variant
    from ghostpen.server.completion import Completer, Discard

    write_tree(tmp_path)
    tasks = build_tasks(source_files(tmp_path, 10_000), 2, seed=1, max_files=12)
    completer = Completer.from_settings(server.engine, settings, sink=Discard())
    names = [
        "edit-distance", "none", "template:generic-prefix", "raw", "suffix_token_budget=0",
        "oracle",
    ]  # fmt: skip
    records = []
    await evaluate(
        completer, [EvalTask(t, "shop") for t in tasks], [parse_variant(n) for n in names],
        runners={}, concurrency=4, record=records.append,
    )  # fmt: skip
    assert sorted((r.task_id, r.variant) for r in records) == sorted(
        (t.task_id, n) for t in tasks for n in names
    )
    for record in records:
        assert 0 <= record.edit_similarity <= 1 and record.passed is None
        assert record.total_ms > record.context_ms > 0 and record.prompt_tokens > 0
        # every suggestion scored, with the model's confidence and the show gate's verdict
        assert record.confidence is not None and record.confidence <= 0
        assert record.withheld in ("", "blank", "closers", "repeats", "unsure")
    by = {(r.task_id, r.variant): r for r in records}
    for task in tasks:
        # Single-line tasks: the raw output runs on past the line, the truncated one does not.
        assert "\n" not in by[task.task_id, "edit-distance"].predicted.strip()
        truncated, raw = by[task.task_id, "edit-distance"], by[task.task_id, "raw"]
        assert raw.completion_tokens >= truncated.completion_tokens
        # No suffix in the prompt, no context in it: fewer prompt tokens than the server's.
        assert by[task.task_id, "suffix_token_budget=0"].prompt_tokens <= (
            by[task.task_id, "edit-distance"].prompt_tokens
        )
        assert by[task.task_id, "none"].recalled is False
        assert by[task.task_id, "oracle"].recalled is by[task.task_id, "oracle"].oracle
    rows = summary(records, names)
    assert [row["variant"] for row in rows[: len(names)]] == names
    assert markdown(rows, names).count("(CI ") >= len(names) - 1


def retrieval_plan(tmp_path: Path):
    """Four next-line tasks of the small tree, under edit distance and none, without the engine."""
    from ghostpen.benchmarks.eval.harness import Plan, variants_of

    (tmp_path / "tree").mkdir()
    write_tree(tmp_path / "tree")
    return Plan(
        suites=(), tree=tmp_path / "tree", tasks=4, function_tasks=0, kinds=("line",),
        variants=variants_of(["edit-distance", "none"]), seed=0, concurrency=1,
        retrieval_only=True,
    )  # fmt: skip


def test_retrieval_alone_runs_without_an_engine(tmp_path: Path, capsys) -> None:
    from ghostpen.benchmarks.eval.harness import run_plan
    from ghostpen.benchmarks.eval.report import read_records
    from ghostpen.server.settings import Settings

    plan = retrieval_plan(tmp_path)
    run_plan(plan, Settings.load({"cache_dir": str(tmp_path / "home")}), tmp_path / "out")
    records = read_records(tmp_path / "out" / "records.jsonl")
    assert sorted(r.variant for r in records) == ["edit-distance"] * 4 + ["none"] * 4
    assert all(r.exact is None and r.predicted == "" for r in records)
    assert not any(r.recalled for r in records if r.variant == "none")
    # cart.py's line needs money.cents_to_display_string, which money.py defines.
    needing = [r for r in records if r.oracle and r.variant == "edit-distance"]
    assert needing and all(r.recalled for r in needing)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "recall_at_k" in report and "exact_match" not in report
    progress = capsys.readouterr().err.splitlines()
    assert progress[0].startswith("eval: 1 of 8 (12%)") and progress[-1].startswith("eval: 8 of 8")
    assert "a minute, about 0 min left" in progress[-1]


def test_a_stopped_run_resumes_where_it_was(tmp_path: Path, capsys) -> None:
    from ghostpen.benchmarks.eval.harness import run_plan
    from ghostpen.benchmarks.eval.report import read_records
    from ghostpen.server.settings import Settings

    plan = retrieval_plan(tmp_path)
    settings = Settings.load({"cache_dir": str(tmp_path / "home")})
    out = tmp_path / "out"
    run_plan(plan, settings, out)
    first = read_records(out / "records.jsonl")
    whole = (out / "records.jsonl").read_text().splitlines(keepends=True)
    (out / "records.jsonl").write_text("".join(whole[:3] + whole[:1]))  # stopped; one twice
    capsys.readouterr()
    run_plan(plan, settings, out, resume=True)
    records = read_records(out / "records.jsonl")
    assert (out / "records.jsonl").read_text().splitlines(keepends=True)[:3] == whole[:3]
    assert sorted((r.task_id, r.variant) for r in records) == sorted(
        (r.task_id, r.variant) for r in first
    )
    progress = capsys.readouterr().err.splitlines()
    assert progress[0].startswith("eval: 1 of 5") and progress[-1].startswith("eval: 5 of 5")
    assert "8 completions (3 kept from an earlier run); 5 in" in (out / "report.md").read_text()


def test_needing_context_keeps_the_tasks_with_an_oracle_which_the_oracle_variant_recalls(
    tmp_path: Path,
) -> None:
    from ghostpen.benchmarks.eval.harness import Plan, eval_tasks, run_plan, variants_of
    from ghostpen.benchmarks.eval.report import read_records
    from ghostpen.server.settings import Settings

    (tmp_path / "tree").mkdir()
    write_tree(tmp_path / "tree")
    settings = Settings.load({"cache_dir": str(tmp_path / "home")})
    plan = Plan(
        suites=(), tree=tmp_path / "tree", tasks=6, function_tasks=0, kinds=("line",),
        variants=variants_of(["none", "oracle"]), seed=0, concurrency=1, retrieval_only=True,
    )  # fmt: skip
    drawn = eval_tasks(plan, settings)
    needing = dataclasses.replace(plan, needs_context=True)
    kept = eval_tasks(needing, settings)
    assert 0 < len(kept) < len(drawn) and {t.task.task_id for t in kept} <= {
        t.task.task_id for t in drawn
    }
    run_plan(needing, settings, tmp_path / "out")
    records = read_records(tmp_path / "out" / "records.jsonl")
    assert len(records) == 2 * len(kept) and all(r.oracle for r in records)
    assert [r.recalled for r in records if r.variant == "oracle"] == [True] * len(kept)
    assert not any(r.recalled for r in records if r.variant == "none")


def test_a_bad_variant_or_suite_is_refused_with_what_is_known(capsys) -> None:
    from ghostpen.cli import main

    assert main(["eval", "--suite", "python", "--variants", "edit-distance,fastest"]) == 2
    assert "variant part 'fastest' is none of" in capsys.readouterr().err
    assert main(["eval", "--suite", "cobol", "--retrieval-only"]) == 2
    assert "unknown suite 'cobol'; suites: gate, go, java" in capsys.readouterr().err
