"""Function-body tasks checked by execution (pass@1): the cursor at the start of a Python
function's body, after its docstring; the completion goes in its place and the project's own
tests that exercise the function decide.

A function qualifies when tests mention its name, those tests pass with the original body and
fail with `raise NotImplementedError` in its place (so they do exercise it). That check runs
once per project archive; its verdicts are cached beside the unpacked archive.

Tests run in a subprocess of this Python, with a timeout, no pytest plugins but the project's
own, and no network: an audit hook refuses any socket connection that is not to this machine.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ghostpen.benchmarks.eval.suites import Project, unpacked
from ghostpen.server.training.tasks import SourceFile, Task, related

BODY_MIN_LINES = 2
BODY_MAX_LINES = 10  # fits the multi-line token budget
MAX_TESTS_PER_FUNCTION = 4
TEST_TIMEOUT_S = 30.0
STUB = "raise NotImplementedError"

_NO_NETWORK = """
import socket, sys

def _refuse(event, args):
    if event in ("socket.connect", "socket.sendto") and args[1:]:
        address = args[1]
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost"):
            raise PermissionError(f"the evaluation runs tests without network: {host}")

sys.addaudithook(_refuse)
"""


@dataclass(frozen=True)
class Checked:
    """A function-body task and the tests (pytest node ids) that judge it."""

    task: Task
    tests: tuple[str, ...]


def function_tasks(
    project: Project, cache: Path, files: Sequence[SourceFile], count: int, seed: int,
    max_files: int,
) -> list[Checked]:  # fmt: skip
    """Up to `count` qualifying functions of the project, drawn by `seed`."""
    if not project.tests or count == 0:
        return []
    top = unpacked(project, cache)
    tests = _tests_by_name(top, project.tests)
    candidates = [
        (source, name, cursor, expected)
        for source in files
        for name, cursor, expected in _bodies(source.text)
        if name in tests
    ]
    random.Random(seed).shuffle(candidates)
    verdicts_file = top / "function_verdicts.json"
    verdicts = json.loads(verdicts_file.read_text()) if verdicts_file.is_file() else {}
    runner = None  # made only when a verdict is not cached yet
    chosen = []
    try:
        for source, name, cursor, expected in candidates:
            if len(chosen) == count:
                break
            task = Task("function", source, cursor, expected, related(source, files, max_files))
            ids = tuple(tests[name][:MAX_TESTS_PER_FUNCTION])
            if task.task_id not in verdicts:
                runner = runner or ScratchProject(project, cache)
                verdicts[task.task_id] = runner.passes(task, expected, ids) and not runner.passes(
                    task, STUB, ids
                )
                verdicts_file.write_text(json.dumps(verdicts, indent=0, sort_keys=True))
            if verdicts[task.task_id]:
                chosen.append(Checked(task, ids))
    finally:
        if runner is not None:
            runner.close()
    return chosen


class ScratchProject:
    """A scratch copy of the project in which one task's file at a time is replaced."""

    def __init__(self, project: Project, cache: Path) -> None:
        top = unpacked(project, cache)
        first = PurePosixPath(project.tests).parts[0]
        self._scratch = Path(tempfile.mkdtemp(prefix=f"ghostpen-eval-{project.name}-"))
        self._root = self._scratch / first
        shutil.copytree(top / first, self._root)
        self._project = project
        (self._scratch / "guard").mkdir()
        (self._scratch / "guard" / "sitecustomize.py").write_text(_NO_NETWORK)
        library = self._scratch / PurePosixPath(project.root).parent
        self._env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(self._scratch / "guard"), str(library)]),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "no_proxy": "*",
        }

    def passes(self, task: Task, body: str, tests: Sequence[str]) -> bool:
        """Whether `tests` pass with `body` at the task's cursor in place of the expected text."""
        inside = PurePosixPath(task.file.path).relative_to(self._project.name)
        path = self._scratch / self._project.root / inside
        original = path.read_text(encoding="utf-8")
        path.write_text(task.left + body + task.right, encoding="utf-8")
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                cwd=self._root, env=self._env, capture_output=True, timeout=TEST_TIMEOUT_S,
            )  # fmt: skip
            return result.returncode == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            path.write_text(original, encoding="utf-8")

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)


def _tests_by_name(top: Path, tests: str) -> dict[str, list[str]]:
    """Each name a test function mentions -> those tests' node ids (relative to the archive's
    top folder), the tests named after it first."""
    found: dict[str, list[str]] = defaultdict(list)
    first = PurePosixPath(tests).parts[0]
    for path in sorted((top / tests).rglob("test_*.py")):
        module = ast.parse(path.read_text(encoding="utf-8"))
        relative = path.relative_to(top / first).as_posix()
        for node, prefix in _test_functions(module):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            for name in names:
                found[name].append(f"{relative}::{prefix}{node.name}")
    for name, ids in found.items():
        ids.sort(key=lambda test_id: name not in test_id.rsplit("::", 1)[-1])
    return found


def _test_functions(module: ast.Module) -> list[tuple[ast.FunctionDef, str]]:
    functions = []
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            functions.append((node, ""))
        elif isinstance(node, ast.ClassDef):
            functions += [
                (item, f"{node.name}::")
                for item in node.body
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test")
            ]
    return functions


def _bodies(text: str) -> list[tuple[str, int, str]]:
    """(name, cursor, body) of each top-level function and method whose body after its docstring
    is BODY_MIN_LINES to BODY_MAX_LINES lines."""
    try:
        module = ast.parse(text)
    except SyntaxError:
        return []
    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    nodes = [n for n in module.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for cls in (n for n in module.body if isinstance(n, ast.ClassDef)):
        nodes += [n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    found = []
    for node in nodes:
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring stays in the prompt
        if not body or body[-1].end_lineno is None:
            continue
        first, last = body[0].lineno, body[-1].end_lineno
        if not BODY_MIN_LINES <= last - first + 1 <= BODY_MAX_LINES:
            continue
        cursor = starts[first - 1] + body[0].col_offset
        end = starts[last] - 1  # the end of the body's last line
        expected = text[cursor:end].rstrip()
        if expected.strip() in ("pass", STUB, "..."):
            continue
        found.append((node.name, cursor, expected))
    return found
