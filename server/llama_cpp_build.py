"""What `benchmarks/build_llama_server` (run by scripts/setup) makes from the llama.cpp source our
llama-cpp-python pin vendors: where each piece lives, and which are missing.

`llama-server` is the peer of the benchmarks and the remote engine's upstream in the tests;
`llama-quantize` and the two converters (with the `conversion/` and `gguf-py/` they import from
beside themselves) turn the flywheel's checkpoints into GGUF (server/training/quantize.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("llama-server", "llama-quantize")  # cmake targets, into bin/
SOURCES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")


@dataclass(frozen=True)
class LlamaCppBuild:
    root: Path

    @classmethod
    def at(cls, cache_dir: Path) -> LlamaCppBuild:
        """One directory per llama-cpp-python version and CPU feature set: llama.cpp builds for
        the CPU it is built on, so a cache carried to a machine with another CPU builds again
        instead of dying of an illegal instruction."""
        version = importlib.metadata.version("llama-cpp-python")
        return cls(cache_dir / "llama-server" / f"{version}-{cpu_signature()}")

    def binary(self, name: str) -> Path:
        return self.root / "bin" / name

    def source(self, name: str) -> Path:
        return self.root / name

    def missing(self) -> list[str]:
        """The pieces of BINARIES and SOURCES not there yet, relative to the root: bin/NAME for
        a program to build, NAME for a file or folder to copy from the source."""
        binaries = [f"bin/{name}" for name in BINARIES if not self.binary(name).is_file()]
        return binaries + [name for name in SOURCES if not self.source(name).exists()]


def cpu_signature() -> str:
    """A short hash of the CPU's feature flags."""
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    words = sorted(flags.partition(":")[2].split())
    return hashlib.sha256(" ".join(words).encode()).hexdigest()[:12]
