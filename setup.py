"""Packaging that pyproject.toml cannot say: the namespace map and the generated gRPC stubs.

The repository keeps its folders at the top (server/, context/, proto/, editor_client/,
benchmarks/); installed, they are one namespace, `ghostpen.<folder>`, beside the top-floor package
`ghostpen` (the command line). The stubs are generated from proto/ghostpen.proto at build time,
never committed: into the build for a wheel, into proto/ for an editable install.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

FOLDERS = ("server", "context", "proto", "editor_client", "benchmarks")
PROTO = Path("proto") / "ghostpen.proto"


def packages() -> tuple[list[str], dict[str, str]]:
    names = ["ghostpen"]
    directories = {"ghostpen": "ghostpen"}
    for folder in FOLDERS:
        directories[f"ghostpen.{folder}"] = folder
        names.append(f"ghostpen.{folder}")
        names += [f"ghostpen.{folder}.{sub}" for sub in find_packages(folder)]
    return names, directories


def generate_stubs(target: Path) -> None:
    """protoc run on a copy placed at ghostpen/proto/, so the stubs import `ghostpen.proto`."""
    with tempfile.TemporaryDirectory() as staging:
        source = Path(staging) / "ghostpen" / "proto" / PROTO.name
        source.parent.mkdir(parents=True)
        shutil.copyfile(PROTO, source)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{staging}",
                f"--python_out={staging}",
                f"--grpc_python_out={staging}",
                f"--pyi_out={staging}",
                str(source.relative_to(staging)),
            ],
            check=True,
        )
        target.mkdir(parents=True, exist_ok=True)
        for stub in source.parent.glob("ghostpen_pb2*"):
            shutil.copyfile(stub, target / stub.name)


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate_stubs(
            Path("proto") if self.editable_mode else Path(self.build_lib) / "ghostpen" / "proto"
        )


names, directories = packages()
setup(packages=names, package_dir=directories, cmdclass={"build_py": BuildWithStubs})
