"""Completion tasks cut from a real source tree, deterministically from a seed.

In the manner of RepoEval and CrossCodeEval: pick a line, keep everything before the cursor and
after it, and hand over the tree's other files, most recently modified first, as the recently
touched files. Two kinds: the whole next line (cursor after its indentation) and the rest of a
line (cursor after its first token).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from context.languages import language_of

_SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv", "build", "dist"}


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the tree
    language: str
    text: str


@dataclass(frozen=True)
class Task:
    kind: str  # "line" | "rest_of_line"
    file: SourceFile
    cursor: int
    expected: str
    context: tuple[SourceFile, ...]  # other files, most recently modified first

    @property
    def left(self) -> str:
        return self.file.text[: self.cursor]

    @property
    def right(self) -> str:
        """What follows the expected text: the model must not see the answer."""
        return self.file.text[self.cursor + len(self.expected) :]


def source_files(root: Path, max_bytes: int) -> list[SourceFile]:
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or _SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        language = language_of(path.name)
        if not language or path.stat().st_size > max_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found.append(
            (path.stat().st_mtime, SourceFile(str(path.relative_to(root)), language, text))
        )
    found.sort(key=lambda item: (-item[0], item[1].path))
    return [source for _, source in found]


def build_tasks(root: Path, count: int, seed: int, max_files: int, max_bytes: int) -> list[Task]:
    files = source_files(root, max_bytes)
    if not files:
        raise ValueError(f"no source files of a known language under {root}")
    rng = random.Random(seed)
    tasks: list[Task] = []
    attempts = 0
    while len(tasks) < count and attempts < count * 50:
        attempts += 1
        chosen = rng.choice(files)
        lines = chosen.text.split("\n")
        index = rng.randrange(len(lines))
        line = lines[index]
        stripped = line.strip()
        if len(stripped) < 8 or stripped.startswith(("#", "//", '"""', "'''", "*")):
            continue
        start = sum(len(previous) + 1 for previous in lines[:index])
        indent = len(line) - len(line.lstrip())
        if rng.random() < 0.5:
            cursor, kind = start + indent, "line"
        else:
            first_space = line.find(" ", indent)
            if first_space < 0:
                continue
            cursor, kind = start + first_space, "rest_of_line"
        expected = chosen.text[cursor : start + len(line)].rstrip()
        others = tuple(f for f in files if f.path != chosen.path)[: max_files - 1]
        tasks.append(Task(kind, chosen, cursor, expected, others))
    return tasks
