"""The wheel a team installs: one top-level name, the generated stubs inside, and it runs.

Built from a copy of the source without the stubs that setup generated into proto/, so the wheel
proves it makes its own. Installed into a fresh virtual environment with `--no-deps`; the
dependencies come from this test run's environment (offline), added as a plain path, so the
checkout's editable install is not visible there.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip"]
pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "ghostpen"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "*.egg-info", "__pycache__", ".*_cache", "out", "ghostpen_pb2*"
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            *PIP,
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
    )
    (built,) = out.glob("ghostpen-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def test_the_wheel_holds_one_top_level_name_with_stubs_and_templates(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"ghostpen"}
    for needed in (
        "ghostpen/cli.py",
        "ghostpen/proto/ghostpen_pb2.py",
        "ghostpen/proto/ghostpen_pb2_grpc.py",
        "ghostpen/proto/ghostpen.proto",
        "ghostpen/context/templates/qwen25-coder-repo-fim.toml",
        "ghostpen/server/engines/worker.py",
        "ghostpen/editor_client/agent.py",
        "ghostpen/benchmarks/eval/run.py",
        "ghostpen/benchmarks/eval/suites.toml",
        "ghostpen/benchmarks/eval/gate.toml",
    ):
        assert needed in names


def test_the_installed_wheel_runs_its_command_and_its_module(
    installed: Path, tmp_path: Path
) -> None:
    for command in (
        [installed / "bin" / "ghostpen", "--help"],
        [installed / "bin" / "python", "-m", "ghostpen", "--help"],
    ):
        shown = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True)
        assert "serve" in shown.stdout and "agent" in shown.stdout
    where = subprocess.run(
        [
            installed / "bin" / "python",
            "-c",
            "import ghostpen.server; print(ghostpen.server.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(installed))


def test_the_installed_agent_answers_lsp_without_the_server_extra(
    installed: Path, tmp_path: Path
) -> None:
    initialize = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"processId": None, "rootUri": None, "capabilities": {}},
        }
    ).encode()
    probe = (
        "import runpy, sys, atexit\n"
        "report = lambda: sys.stderr.write('\\nmodules: ' + ' '.join(sys.modules) + '\\n')\n"
        "atexit.register(report)\n"
        "sys.argv = ['ghostpen', 'agent', '--stdio']\n"
        "runpy.run_module('ghostpen', run_name='__main__')\n"
    )
    done = subprocess.run(
        [installed / "bin" / "python", "-c", probe],
        input=b"Content-Length: %d\r\n\r\n%s" % (len(initialize), initialize),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    header, _, body = done.stdout.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in header.split(b"\r\n"))
    reply = json.loads(body[: int(fields[b"Content-Length"])])
    assert reply["id"] == 1 and "inlineCompletionProvider" in reply["result"]["capabilities"]
    loaded = done.stderr.decode().rsplit("modules: ", 1)[1].split()
    server_only = ("llama_cpp", "prometheus_client", "tree_sitter", "psycopg", "aiohttp")
    assert not [name for name in loaded if name.startswith(server_only)]
