import os
import subprocess
from pathlib import Path

import pytest

from ghostpen.benchmarks.eval.metrics import edit_similarity, exact_match, identifier_match
from ghostpen.benchmarks.eval.strategies import STRATEGIES
from ghostpen.benchmarks.eval.tasks import build_tasks, source_files
from ghostpen.context.chunker import Chunk
from ghostpen.context.ranker import Exclusion
from ghostpen.context.template import load_template


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
    first = build_tasks(tmp_path, 6, seed=3, max_files=12, max_bytes=10_000)
    again = build_tasks(tmp_path, 6, seed=3, max_files=12, max_bytes=10_000)
    assert first == again and len(first) == 6
    for task in first:
        text = task.file.text
        assert text[task.cursor :].startswith(task.expected)
        assert task.expected and "\n" not in task.expected
        assert task.left + task.expected + task.right == text
        assert task.file.path not in {f.path for f in task.context}
    assert build_tasks(tmp_path, 6, seed=4, max_files=12, max_bytes=10_000) != first


def test_block_tasks_take_the_body_after_an_opener(tmp_path: Path) -> None:
    write_tree(tmp_path)
    tasks = build_tasks(tmp_path, 3, seed=0, max_files=12, max_bytes=10_000, kinds=("block",))
    assert len(tasks) == 3
    for task in tasks:
        assert task.kind == "block"
        assert task.left + task.expected + task.right == task.file.text
        assert task.left.rstrip(" ").endswith(":\n")
        assert task.expected.startswith(("return", "total"))
    mixed = build_tasks(
        tmp_path, 6, seed=0, max_files=12, max_bytes=10_000, kinds=("line", "block")
    )
    assert sorted(task.kind for task in mixed) == ["block"] * 3 + ["line"] * 3
    with pytest.raises(ValueError, match="task kinds must be among line, rest_of_line, block"):
        build_tasks(tmp_path, 1, seed=0, max_files=12, max_bytes=10_000, kinds=("blocks",))


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
    from ghostpen.benchmarks.eval.run import evaluate, markdown, summarize, variants
    from ghostpen.server.completion import Completer, Discard

    write_tree(tmp_path)
    tasks = build_tasks(tmp_path, 2, seed=1, max_files=12, max_bytes=10_000)
    completer = Completer.from_settings(server.engine, settings, sink=Discard())
    chosen = variants(
        ["none", "edit-distance"], [load_template("generic-prefix")], ablate_truncation=True
    )
    names = ["none", "edit-distance", "template generic-prefix@v1", "no truncation"]
    assert [v.name for v in chosen] == names
    outcomes = await evaluate(completer, tasks, chosen, "shop")
    assert [(o.variant, o.kind) for o in outcomes] == [(n, t.kind) for t in tasks for n in names]
    rows = summarize(outcomes, chosen)
    for row in rows[: len(names)]:
        assert row["tasks"] == 2
        assert 0 <= row["edit_similarity"] <= 1 and 0 <= row["identifier_f1"] <= 1
        assert row["total_ms_p50"] > row["context_ms_p50"] > 0
    kinds = sorted({t.kind for t in tasks})
    per_kind = [f"{n} [{k}]" for k in kinds for n in names] if len(kinds) > 1 else []
    assert [row["variant"] for row in rows] == names + per_kind
    assert markdown(rows).count("\n") == len(rows) + 1
    # Single-line tasks: the raw output runs on past the line, the truncated one does not.
    by_variant = {o.variant: o for o in outcomes if o.kind == tasks[0].kind}
    assert by_variant["no truncation"].exact <= by_variant["edit-distance"].exact
