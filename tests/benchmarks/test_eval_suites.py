"""The evaluation's suites (pinned archives, fetched and unpacked) and its execution-checked
function-body tasks, on archives and a project made here."""

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from ghostpen.benchmarks.eval.execution import STUB, ScratchProject, function_tasks
from ghostpen.benchmarks.eval.suites import (
    Project,
    SuiteError,
    load_projects,
    load_suites,
    project_files,
)
from ghostpen.context.languages import GRAMMARS

LIBRARY = '''\
def double(x):
    """Twice x."""
    y = x * 2
    return y


def greet(name):
    """A greeting."""
    text = "hello " + name
    return text


def untested(a):
    b = a + 1
    return b


def phone_home():
    import socket

    socket.create_connection(("192.0.2.1", 80), timeout=5)
    return True
'''

TESTS = """\
from shop.lib import double, greet, phone_home


def test_double():
    assert double(3) == 6


def test_greet_is_not_checked():
    assert callable(greet)


def test_phone_home():
    assert phone_home()
"""


def tar_gz(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def deb(data_tar: bytes) -> bytes:
    """A Debian package: an ar archive of debian-binary, control.tar.gz and data.tar.gz."""
    out = b"!<arch>\n"
    for name, body in (
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", tar_gz({"control": "Package: x\n"})),
        ("data.tar.gz", data_tar),
    ):
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        out += header + body + (b"\n" if len(body) % 2 else b"")
    return out


def pinned(tmp_path: Path, name: str, archive: bytes, suffix: str, **fields) -> Project:
    path = tmp_path / f"{name}{suffix}"
    path.write_bytes(archive)
    digest = hashlib.sha256(archive).hexdigest()
    return Project(name, fields.pop("language", "python"), path.as_uri(), digest, **fields)


def shop(tmp_path: Path) -> Project:
    archive = tar_gz(
        {
            "shop-1.0/shop/__init__.py": "",
            "shop-1.0/shop/lib.py": LIBRARY,
            "shop-1.0/shop/vendor/six.py": "x = 1\n",
            "shop-1.0/tests/test_lib.py": TESTS,
        }
    )
    return pinned(
        tmp_path, "shop", archive, ".tar.gz", root="shop-1.0/shop", tests="shop-1.0/tests"
    )


def test_every_suite_names_known_projects_in_one_language_and_five_languages_are_covered():
    projects, suites = load_projects(), load_suites()
    assert set(projects) == {p.name for members in suites.values() for p in members}
    for name, members in suites.items():
        assert len({p.language for p in members}) == 1, name
        assert all(p.language in GRAMMARS and len(p.sha256) == 64 for p in members)
    assert {"python", "typescript", "javascript", "go", "rust", "java"} <= set(suites)


def test_an_archive_is_fetched_verified_unpacked_and_its_library_sources_listed(tmp_path):
    project = shop(tmp_path)
    files = project_files(project, tmp_path / "cache", max_bytes=10_000)
    assert [f.path for f in files] == ["shop/__init__.py", "shop/lib.py"]  # no vendored code
    assert files[1].text == LIBRARY
    (tmp_path / "shop.tar.gz").unlink()  # a second look needs the cache only
    assert project_files(project, tmp_path / "cache", max_bytes=10_000) == files


def test_a_debian_package_is_read_without_dpkg(tmp_path):
    data = tar_gz({"./usr/share/gocode/src/m/add.go": "package m\n", "./usr/share/doc/x": "d"})
    project = pinned(tmp_path, "m", deb(data), ".deb", language="go", root="usr/share/gocode/src/m")
    (file,) = project_files(project, tmp_path / "cache", max_bytes=10_000)
    assert (file.path, file.language, file.text) == ("m/add.go", "go", "package m\n")


def test_an_archive_that_is_not_what_was_pinned_is_refused(tmp_path):
    project = shop(tmp_path)
    (tmp_path / "shop.tar.gz").write_bytes(tar_gz({"shop-1.0/shop/lib.py": "evil = 1\n"}))
    with pytest.raises(SuiteError, match=f"not the pinned {project.sha256}"):
        project_files(project, tmp_path / "cache", max_bytes=10_000)
    (tmp_path / "shop.tar.gz").unlink()
    with pytest.raises(SuiteError, match="cannot fetch"):
        project_files(project, tmp_path / "cache", max_bytes=10_000)


def test_function_tasks_are_the_functions_their_tests_exercise(tmp_path):
    project = shop(tmp_path)
    cache = tmp_path / "cache"
    files = project_files(project, cache, max_bytes=10_000)
    checked = function_tasks(project, cache, files, count=10, seed=0, max_files=12)
    # greet's test passes with a stub, untested has none, phone_home fails without network.
    assert [(c.task.expected, c.tests) for c in checked] == [
        ("y = x * 2\n    return y", ("tests/test_lib.py::test_double",))
    ]
    task = checked[0].task
    assert task.left.endswith('"""Twice x."""\n    ') and task.kind == "function"
    runner = ScratchProject(project, cache)
    try:
        assert runner.passes(task, "return x + x", checked[0].tests)
        assert not runner.passes(task, "return x", checked[0].tests)
        assert not runner.passes(task, STUB, checked[0].tests)
        assert not runner.passes(task, "return (", checked[0].tests)  # a syntax error
    finally:
        runner.close()
    assert (cache / "shop").is_dir() and "y = x * 2" in files[1].text  # the cache is untouched


def test_tests_run_without_network(tmp_path):
    project = shop(tmp_path)
    cache = tmp_path / "cache"
    files = project_files(project, cache, max_bytes=10_000)
    runner = ScratchProject(project, cache)
    try:
        from ghostpen.server.training.tasks import Task

        text = files[1].text
        cursor = text.index("socket.create_connection")
        expected = text[cursor : text.index("return True") + len("return True")]
        task = Task("function", files[1], cursor, expected, ())
        assert not runner.passes(task, expected, ("tests/test_lib.py::test_phone_home",))
        assert runner.passes(task, "return True", ("tests/test_lib.py::test_phone_home",))
    finally:
        runner.close()
