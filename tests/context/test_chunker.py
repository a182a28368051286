from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghostpen.context.chunker import (
    ChunkedFile,
    IncrementalChunker,
    changed_span,
    chunk_file,
    edit_tree,
)
from ghostpen.context.languages import parser_for

PYTHON = '''import os


def first():
    return 1


class Thing:
    """A thing."""

    def method(self):
        return os.getcwd()

    def other(self):
        return 2
'''

JAVASCRIPT = """import fs from "fs";

function first() {
  return 1;
}

class Thing {
  method() {
    return fs.readFileSync("x");
  }
}
"""

TYPESCRIPT = """interface Shape {
  area(): number;
}

function first(): number {
  return 1;
}

export class Square implements Shape {
  constructor(private side: number) {}
  area(): number {
    return this.side * this.side;
  }
}
"""

GO = """package main

import "fmt"

func first() int {
\treturn 1
}

type Thing struct {
\tName string
}

func (t Thing) Method() string {
\treturn fmt.Sprint(t.Name)
}
"""

RUST = """use std::fmt;

fn first() -> i32 {
    1
}

struct Thing {
    name: String,
}

impl Thing {
    fn method(&self) -> &str {
        &self.name
    }
}
"""

JAVA = """import java.util.List;

class Thing {
    int first() {
        return 1;
    }

    String method(List<String> names) {
        return names.get(0);
    }
}
"""

CASES = {
    "python": (PYTHON, "def first():", "def method(self):"),
    "javascript": (JAVASCRIPT, "function first()", "method() {"),
    "typescript": (TYPESCRIPT, "function first()", "area(): number {\n    return"),
    "go": (GO, "func first()", "func (t Thing) Method()"),
    "rust": (RUST, "fn first()", "fn method(&self)"),
    "java": (JAVA, "int first()", "String method("),
}


@pytest.mark.parametrize("language", sorted(CASES))
def test_chunks_follow_syntax_and_cover_the_file(language: str) -> None:
    text, first_unit, nested_unit = CASES[language]
    chunks = chunk_file(f"f.{language}", language, text, max_lines=4).chunks
    lines = text.split("\n")
    # No chunk starts inside a function's signature line: units begin at their first line.
    starts = {lines[c.start_line].strip() for c in chunks}
    assert any(s.startswith(first_unit) for s in starts), starts
    assert any(nested_unit in c.text for c in chunks)
    # Chunks are whole lines, in order, without overlap, and every non-blank line is in one.
    covered = [i for c in chunks for i in range(c.start_line, c.end_line)]
    assert covered == sorted(set(covered))
    assert {i for i, line in enumerate(lines) if line.strip()} <= set(covered)
    for chunk in chunks:
        assert chunk.text == "\n".join(lines[chunk.start_line : chunk.end_line])


def test_a_unit_that_fits_is_never_split() -> None:
    chunks = chunk_file("f.py", "python", PYTHON, max_lines=24).chunks
    method = next(c for c in chunks if "def method" in c.text)
    assert "return os.getcwd()" in method.text


def test_long_units_are_split_into_windows_no_longer_than_the_limit() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(100))
    text = f"def big():\n{body}\n"
    chunks = chunk_file("big.py", "python", text, max_lines=10).chunks
    assert max(c.end_line - c.start_line for c in chunks) <= 10
    assert sum(c.text.count("x") for c in chunks) == 100


def test_unknown_language_falls_back_to_line_windows() -> None:
    text = "\n".join(f"line {i}" for i in range(25))
    chunks = chunk_file("notes.txt", "", text, max_lines=10).chunks
    assert [(c.start_line, c.end_line) for c in chunks] == [(0, 10), (10, 20), (20, 25)]


def test_blank_only_windows_are_dropped() -> None:
    assert chunk_file("empty.txt", "", "\n\n\n", max_lines=2).chunks == ()


def test_incremental_reparse_gives_the_same_chunks_as_a_fresh_parse() -> None:
    first = chunk_file("f.py", "python", PYTHON, max_lines=4)
    tree = first.tree.copy()
    edits = [(PYTHON.index("return 1"), PYTHON.index("return 1") + 8, "return compute(1)\n    # é")]
    text = PYTHON
    for start, end, new in edits:
        edit_tree(tree, text, start, end, new)
        text = text[:start] + new + text[end:]
    incremental = chunk_file("f.py", "python", text, 4, ChunkedFile(first.chunks, tree))
    fresh = chunk_file("f.py", "python", text, 4)
    assert incremental.chunks == fresh.chunks
    unchanged = next(c for c in incremental.chunks if "def other" in c.text)
    assert any(unchanged.tokens is c.tokens for c in first.chunks)  # reused, not re-encoded


def test_a_language_without_a_grammar_never_reaches_the_parser_cache() -> None:
    from ghostpen.context.languages import _language, parser_for

    parser_for("python")
    before = _language.cache_info().currsize
    for n in range(50):  # what a hostile client sends as its language
        assert parser_for(f"lang-{n}-" + "x" * 10_000) is None
    assert _language.cache_info().currsize == before
    assert parser_for("python") is parser_for("python")  # known ones are kept


def test_each_thread_parses_with_a_parser_of_its_own() -> None:
    """A tree-sitter parser is not safe to share: each thread that chunks gets its own."""
    with ThreadPoolExecutor(1) as other:
        theirs = other.submit(parser_for, "python").result()
        assert theirs is not None and theirs is not parser_for("python")
        chunked = other.submit(chunk_file, "f.py", "python", PYTHON, 4).result()
    assert chunked.chunks == chunk_file("f.py", "python", PYTHON, 4).chunks


@given(
    st.text(alphabet="ab\né", max_size=200),
    st.integers(0, 200),
    st.integers(0, 200),
    st.text(alphabet="ab\né", max_size=20),
)
def test_changed_span_finds_the_one_edit_between_two_versions(
    old: str, start: int, length: int, inserted: str
) -> None:
    start = min(start, len(old))
    end = min(start + length, len(old))
    new = old[:start] + inserted + old[end:]
    first, old_end, new_end = changed_span(old, new)
    assert new == old[:first] + new[first:new_end] + old[old_end:]
    assert first == min(len(old), len(new)) or old[first] != new[first]  # the longest prefix
    assert old_end - first <= end - start and new_end - first <= len(inserted)


def test_incremental_chunker_parses_a_keys_next_version_incrementally(monkeypatch) -> None:
    from ghostpen.context import chunker as module

    old_trees: list[bool] = []
    real = module._parse

    def parse(parser, source, old_tree):  # type: ignore[no-untyped-def]
        old_trees.append(old_tree is not None)
        return real(parser, source, old_tree)

    monkeypatch.setattr(module, "_parse", parse)
    chunker = IncrementalChunker(max_lines=4, max_chars=10**6)
    chunker.chunk("s1", "f.py", "python", PYTHON)
    edited = PYTHON.replace("return 1", "return compute(1)  # é")
    assert (
        chunker.chunk("s1", "f.py", "python", edited)
        == chunk_file("f.py", "python", edited, 4).chunks
    )
    chunker.chunk("s1", "g.py", "python", PYTHON)  # another file: the session's head moves
    chunker.chunk("s1", "f.py", "python", PYTHON)
    chunker.forget("s1")
    chunker.chunk("s1", "f.py", "python", PYTHON)
    assert old_trees == [False, True, False, False, False, False]  # the third: the fresh parse


def test_incremental_chunker_keeps_trees_for_max_chars_least_recent_out(monkeypatch) -> None:
    from ghostpen.context import chunker as module

    old_trees: list[bool] = []
    real = module._parse
    monkeypatch.setattr(
        module, "_parse", lambda p, s, t: (old_trees.append(t is not None), real(p, s, t))[1]
    )
    chunker = IncrementalChunker(max_lines=4, max_chars=2 * len(PYTHON))
    for key in ("s1", "s2", "s3"):  # s1 is forgotten to make room for s3
        chunker.chunk(key, "f.py", "python", PYTHON)
    old_trees.clear()
    chunker.chunk("s3", "f.py", "python", PYTHON + "\n")
    chunker.chunk("s1", "f.py", "python", PYTHON + "\n")
    assert old_trees == [True, False]
