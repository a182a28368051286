"""Completion tasks cut from real source files, deterministically from a seed: what the evaluation
asks (benchmarks/eval) and what training learns from a repository (export.py).

In the manner of RepoEval and CrossCodeEval: pick a line, keep everything before the cursor and
after it, and hand over the project's other files as the recently touched files: those whose
name the file mentions first (what a developer opens beside it), then the nearest by folder,
then the most recently changed (git history in a git repository, modification time elsewhere).
Three kinds: the whole next line (cursor after its indentation), the rest of a line (cursor
after its first token), and the next block (cursor at the start of the body after a line that
opens one, `:` or `{`; the expected text is the body, up to BLOCK_MAX_LINES lines). A cursor is
drawn at most once.
"""

from __future__ import annotations

import random
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ghostpen.context.languages import language_of
from ghostpen.context.postprocess import Mode

_SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv", "build", "dist"}
KINDS = ("line", "rest_of_line", "block")
BLOCK_MAX_LINES = 8


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the tree
    language: str
    text: str
    changed: float = 0.0  # Unix time of its last commit, or of its last modification


@dataclass(frozen=True)
class Task:
    kind: str  # one of KINDS, or "function" (a function body checked by its tests)
    file: SourceFile
    cursor: int
    expected: str
    context: tuple[SourceFile, ...]  # other files, most related first

    @property
    def task_id(self) -> str:
        """Stable across runs, so two runs compare task by task."""
        return f"{self.file.path}:{self.cursor}:{self.kind}"

    @property
    def left(self) -> str:
        return self.file.text[: self.cursor]

    @property
    def right(self) -> str:
        """What follows the expected text: the model must not see the answer."""
        return self.file.text[self.cursor + len(self.expected) :]


def mode_of(kind: str) -> Mode:
    """The completion mode a task (or sample) of this kind asks for; a captured completion's
    is decided at its cursor, as it was served."""
    if kind in ("block", "function"):
        return Mode.MULTI_LINE
    return Mode.SINGLE_LINE if kind in ("line", "rest_of_line") else Mode.AUTO


def source_files(root: Path, max_bytes: int) -> list[SourceFile]:
    """The tree's readable source files, most recently changed first."""
    committed = last_commit_times(root)
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
        changed = committed.get(path.resolve(), path.stat().st_mtime)
        found.append(SourceFile(str(path.relative_to(root)), language, text, changed))
    found.sort(key=lambda source: (-source.changed, source.path))
    return found


def last_commit_times(root: Path) -> dict[Path, float]:
    """Each file's last commit time, when `root` is in a git repository; {} otherwise."""
    try:
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        log = subprocess.run(
            ["git", "-C", str(root), "log", "--format=@%ct", "--name-only", "--no-renames",
             "--", "."],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {}
    times: dict[Path, float] = {}
    when = 0.0
    for line in log.splitlines():
        if line.startswith("@"):
            when = float(line[1:])
        elif line:
            times.setdefault((Path(top) / line).resolve(), when)  # newest commit comes first
    return times


def build_tasks(
    files: Sequence[SourceFile],
    count: int,
    seed: int,
    max_files: int,
    kinds: tuple[str, ...] = ("line", "rest_of_line"),
    weights: Sequence[float] | None = None,
) -> list[Task]:
    """`count` tasks from one project's files; line and rest-of-line tasks drawn as one pool,
    block tasks as another, in proportion to the kinds asked for. `weights`: how likely each
    file is drawn, relative to the others (default: alike)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"task kinds must be among {', '.join(KINDS)}: {', '.join(kinds)}")
    files = list(files)
    if not files:
        raise ValueError("no source files of a known language")
    blocks = round(count * kinds.count("block") / len(kinds))
    line_kinds = tuple(kind for kind in kinds if kind != "block")
    chances = list(weights) if weights is not None else None
    tasks = (
        _line_tasks(files, count - blocks, seed, max_files, line_kinds, chances)
        if line_kinds
        else []
    )
    return tasks + _block_tasks(files, blocks, seed, max_files, chances)


def _draw(
    files: list[SourceFile],
    count: int,
    seed: int,
    max_files: int,
    tries: int,
    cut: Callable[[random.Random, SourceFile, list[str]], tuple[str, int, str] | None],
    weights: list[float] | None,
) -> list[Task]:
    """Up to `count` distinct tasks, `cut` choosing (kind, cursor, expected) in a random file, or
    None to try another; at most `tries` attempts a task."""
    rng = random.Random(seed)
    tasks: list[Task] = []
    seen: set[tuple[str, int]] = set()
    attempts = 0
    while len(tasks) < count and attempts < count * tries:
        attempts += 1
        chosen = rng.choices(files, weights)[0] if weights else rng.choice(files)
        found = cut(rng, chosen, chosen.text.split("\n"))
        if found is None or (chosen.path, found[1]) in seen:
            continue
        seen.add((chosen.path, found[1]))
        tasks.append(Task(found[0], chosen, found[1], found[2], related(chosen, files, max_files)))
    return tasks


def related(
    chosen: SourceFile, files: Sequence[SourceFile], max_files: int
) -> tuple[SourceFile, ...]:
    """The `max_files - 1` other files a developer editing `chosen` would have open: the files
    whose name it mentions, then those in the nearest folders, then in the given order."""
    mentioned = set(_WORD.findall(chosen.text))
    here = PurePosixPath(chosen.path).parent.parts

    def closeness(item: tuple[int, SourceFile]) -> tuple[bool, int, int]:
        index, other = item
        path = PurePosixPath(other.path)
        shared = 0
        for mine, theirs in zip(here, path.parent.parts, strict=False):
            if mine != theirs:
                break
            shared += 1
        return path.stem not in mentioned, -shared, index

    others = [(i, f) for i, f in enumerate(files) if f.path != chosen.path]
    return tuple(f for _, f in sorted(others, key=closeness)[: max_files - 1])


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _line_tasks(
    files: list[SourceFile],
    count: int,
    seed: int,
    max_files: int,
    kinds: tuple[str, ...],
    weights: list[float] | None,
) -> list[Task]:
    def cut(
        rng: random.Random, chosen: SourceFile, lines: list[str]
    ) -> tuple[str, int, str] | None:
        index = rng.randrange(len(lines))
        line = lines[index]
        stripped = line.strip()
        if len(stripped) < 8 or stripped.startswith(("#", "//", '"""', "'''", "*")):
            return None
        start = sum(len(previous) + 1 for previous in lines[:index])
        indent = _indent(line)
        whole_line = rng.random() < 0.5 if len(kinds) == 2 else kinds == ("line",)
        if whole_line:
            cursor, kind = start + indent, "line"
        else:
            first_space = line.find(" ", indent)
            if first_space < 0:
                return None
            cursor, kind = start + first_space, "rest_of_line"
        return kind, cursor, chosen.text[cursor : start + len(line)].rstrip()

    return _draw(files, count, seed, max_files, 50, cut, weights)


def _block_tasks(
    files: list[SourceFile], count: int, seed: int, max_files: int, weights: list[float] | None
) -> list[Task]:
    def cut(
        rng: random.Random, chosen: SourceFile, lines: list[str]
    ) -> tuple[str, int, str] | None:
        index = rng.randrange(len(lines) - 1) if len(lines) > 1 else 0
        opener = lines[index].rstrip()
        if not opener.endswith((":", "{")) or opener.lstrip().startswith(("#", "//")):
            return None
        depth = _indent(opener)
        body = []
        for line in lines[index + 1 :]:
            if line.strip() and _indent(line) <= depth:
                break
            body.append(line)
        while body and not body[-1].strip():
            body.pop()
        if not body or len(body) > BLOCK_MAX_LINES or len("".join(body).strip()) < 8:
            return None
        start = sum(len(previous) + 1 for previous in lines[: index + 1])
        return "block", start + _indent(body[0]), "\n".join(body)[_indent(body[0]) :]

    return _draw(files, count, seed, max_files, 200, cut, weights)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())
