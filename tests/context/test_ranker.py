from ghostpen.context.chunker import Chunk
from ghostpen.context.ranker import Exclusion, query_text, rank_chunks

NOWHERE = Exclusion("", 0, 0)


def chunk(path: str, start: int, text: str) -> Chunk:
    return Chunk.of(path, start, start + text.count("\n") + 1, text)


def test_the_most_similar_chunk_ranks_first() -> None:
    chunks = [
        chunk("a.py", 0, "class Parser:\n    def parse(self, text):\n        return text.split()"),
        chunk(
            "b.py",
            0,
            "def load_config(path):\n    with open(path) as f:\n        return json.load(f)",
        ),
        chunk("c.py", 0, "SELECT * FROM users WHERE id = ?"),
    ]
    query = "def load_settings(path):\n    with open(path) as f:\n"
    ranked = rank_chunks(query, chunks, NOWHERE, top_k=3)
    assert ranked[0].chunk.path == "b.py"
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    assert 0 <= ranked[-1].score < ranked[0].score <= 1


def test_top_k_limits_the_result() -> None:
    chunks = [chunk(f"{i}.py", 0, f"value_{i} = {i}") for i in range(10)]
    assert len(rank_chunks("value_3 = 3", chunks, NOWHERE, top_k=4)) == 4


def test_the_chunk_at_the_cursor_is_excluded_even_if_it_matches_best() -> None:
    here = chunk("main.py", 10, "total = sum(values)\nprint(total)")
    elsewhere = chunk("main.py", 40, "count = len(values)")
    other_file = chunk("util.py", 10, "total = sum(values)\nprint(total)")
    exclude = Exclusion("main.py", 8, 12)
    ranked = rank_chunks(
        "total = sum(values)\nprint(total)", [here, elsewhere, other_file], exclude, 5
    )
    assert here not in [r.chunk for r in ranked]
    assert {r.chunk for r in ranked} == {elsewhere, other_file}


def test_nothing_to_rank_gives_nothing() -> None:
    assert rank_chunks("   \n", [chunk("a.py", 0, "x = 1")], NOWHERE, 3) == []
    assert rank_chunks("x = 1", [], NOWHERE, 3) == []


def test_query_is_the_last_complete_lines_behind_the_cursor() -> None:
    assert query_text("a\nb\nc\nd", 2) == "b\nc"
    assert query_text("a\nb\nc\nd", 2) == query_text("a\nb\nc\ndef f", 2)
    assert query_text("only", 5) == "only"
