from pathlib import Path

import pytest

from benchmarks.eval.metrics import edit_similarity, exact_match, identifier_match
from benchmarks.eval.strategies import STRATEGIES
from benchmarks.eval.tasks import build_tasks
from context.chunker import Chunk
from context.ranker import Exclusion


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
    from benchmarks.eval.run import evaluate, markdown, summarize
    from context.template import load_template
    from server.completion import Completer
    from server.metrics import Metrics

    write_tree(tmp_path)
    tasks = build_tasks(tmp_path, 2, seed=1, max_files=12, max_bytes=10_000)
    completer = Completer(
        server.engine,
        load_template(settings.context.template),
        settings.context,
        settings.limits,
        Metrics(),
        record=lambda _: None,
    )
    strategies = ["none", "edit-distance"]
    outcomes = await evaluate(completer, tasks, strategies, "shop")
    assert [(o.strategy, o.kind) for o in outcomes] == [
        (s, t.kind) for t in tasks for s in strategies
    ]
    rows = summarize(outcomes, strategies)
    for row in rows:
        assert row["tasks"] == 2
        assert 0 <= row["edit_similarity"] <= 1 and 0 <= row["identifier_f1"] <= 1
        assert row["total_ms_p50"] > row["context_ms_p50"] > 0
    assert markdown(rows).count("\n") == 3
