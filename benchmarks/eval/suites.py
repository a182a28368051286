"""The evaluation's third-party code: pinned archives (suites.toml) fetched from the package
registries into a cache at eval time, checked against their sha256, unpacked once.

    files = project_files(load_projects()["toolz"], cache_dir / "eval")

Archives are PyPI sdists and npm tarballs (.tar.gz, .tgz), Debian source tarballs (.tar.xz) and
Debian binary packages (.deb, an `ar` archive around data.tar.*), read here without dpkg so any
Linux or macOS machine can run the evaluation.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import tomllib
import urllib.request
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from ghostpen.context.languages import language_of
from ghostpen.server.training.tasks import SourceFile

SUITES_FILE = Path(__file__).with_name("suites.toml")
FETCH_TIMEOUT_S = 120.0
# Never library sources: tests, examples, benchmarks, vendored and generated code, declarations.
ALWAYS_EXCLUDED = (
    "*test*/*", "*/test*/*", "test_*.py", "*_test.go", "*.test.ts", "*.spec.ts", "*.test.js",
    "*.spec.js", "*.d.ts", "vendor/*", "*/vendor/*", "third_party/*", "examples/*", "benches/*",
)  # fmt: skip


@dataclass(frozen=True)
class Project:
    name: str
    language: str
    url: str
    sha256: str
    root: str  # the library sources' folder inside the archive
    exclude: tuple[str, ...] = ()
    tests: str = ""  # the project's tests inside the archive (function-body tasks run them)

    @property
    def archive_name(self) -> str:
        return PurePosixPath(self.url).name


class SuiteError(Exception):
    """A suite that cannot be had: unknown, unreachable, or not what was pinned."""


def load_projects(path: Path = SUITES_FILE) -> dict[str, Project]:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return {
        name: Project(
            name=name,
            language=fields["language"],
            url=fields["url"],
            sha256=fields["sha256"],
            root=fields["root"],
            exclude=tuple(fields.get("exclude", ())),
            tests=fields.get("tests", ""),
        )
        for name, fields in raw["project"].items()
    }


def load_suites(path: Path = SUITES_FILE) -> dict[str, tuple[Project, ...]]:
    projects = load_projects(path)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return {name: tuple(projects[p] for p in members) for name, members in raw["suite"].items()}


def suite(name: str, path: Path = SUITES_FILE) -> tuple[Project, ...]:
    suites = load_suites(path)
    if name not in suites:
        raise SuiteError(f"unknown suite {name!r}; suites: {', '.join(sorted(suites))}")
    return suites[name]


def unpacked(project: Project, cache: Path) -> Path:
    """The project's archive unpacked under `cache` (fetched and verified the first time)."""
    target = cache / project.name / project.sha256[:12]
    if (target / ".complete").is_file():
        return target
    archive = cache / "archives" / project.archive_name
    if not archive.is_file() or _sha256(archive) != project.sha256:
        _fetch(project, archive)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    _unpack(archive, target)
    (target / ".complete").touch()
    return target


def project_files(project: Project, cache: Path, max_bytes: int) -> list[SourceFile]:
    """The project's library sources in its language, by path, each at most `max_bytes`."""
    root = unpacked(project, cache) / project.root
    if not root.is_dir():
        raise SuiteError(f"{project.name}: {project.root} is not in {project.archive_name}")
    patterns = ALWAYS_EXCLUDED + project.exclude
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or language_of(path.name) != project.language:
            continue
        if any(fnmatch(relative, pattern) for pattern in patterns):
            continue
        if path.stat().st_size > max_bytes:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found.append(SourceFile(f"{project.name}/{relative}", project.language, text))
    return found


def _fetch(project: Project, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(archive.suffix + ".partial")
    try:
        with urllib.request.urlopen(project.url, timeout=FETCH_TIMEOUT_S) as response:
            partial.write_bytes(response.read())
    except OSError as error:
        raise SuiteError(f"{project.name}: cannot fetch {project.url}: {error}") from error
    digest = _sha256(partial)
    if digest != project.sha256:
        partial.unlink()
        raise SuiteError(
            f"{project.name}: {project.url} has sha256 {digest}, not the pinned {project.sha256}"
        )
    partial.replace(archive)


def _unpack(archive: Path, target: Path) -> None:
    if archive.suffix == ".deb":
        data = _deb_member(archive.read_bytes(), "data.tar")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(target, filter="data")
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")


def _deb_member(deb: bytes, prefix: str) -> bytes:
    """The first member of a .deb (an `ar` archive) whose name starts with `prefix`."""
    if not deb.startswith(b"!<arch>\n"):
        raise SuiteError("not a Debian package (no ar header)")
    offset = 8
    while offset + 60 <= len(deb):
        header = deb[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        start = offset + 60
        if name.startswith(prefix):
            return deb[start : start + size]
        offset = start + size + (size % 2)
    raise SuiteError(f"no {prefix}* member in the Debian package")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
