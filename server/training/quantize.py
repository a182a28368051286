"""The fine-tune's checkpoints as GGUF for the llama.cpp engine, by llama.cpp's own tools.

A merged checkpoint becomes a quantized model: `convert_hf_to_gguf.py` writes a 16-bit GGUF, and
`llama-quantize` quantizes it (Q4_K_M, as the default model is served). An adapter becomes a GGUF
LoRA that the engine applies per request (setting lora_adapters): `convert_lora_to_gguf.py`. The
tools come from the llama.cpp source our llama-cpp-python pin vendors, built by scripts/setup
(server/llama_cpp_build.py); they run offline and download nothing.

    build = LlamaCppBuild.at(settings.cache_dir)
    to_gguf(out / "merged", out / "model-q4_k_m.gguf", build)
    adapter_to_gguf(out / "adapter", base_dir, out / "adapter.gguf", build)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ghostpen.server.errors import ModelError
from ghostpen.server.llama_cpp_build import LlamaCppBuild

QUANT = "Q4_K_M"
_FLOAT_TYPES = ("F32", "F16", "BF16")  # left as llama-quantize keeps them: norms and biases
ADAPTER_TYPE = "f16"  # the adapter's tensors: a tenth of the model's size at rank 16
ERROR_TAIL_CHARS = 2000  # of a failed tool's output, in the ModelError


def to_gguf(
    merged_dir: Path,
    out_path: Path,
    build: LlamaCppBuild,
    quant: str = QUANT,
    like: Path | None = None,
) -> Path:
    """The Hugging Face checkpoint `merged_dir` as a `quant` GGUF at out_path, which appears
    whole or not at all. K-quants take rows of 256 values; llama-quantize gives tensors with
    other row sizes a type that fits them.

    `like`: a GGUF (the base's) whose quantized tensors' types the output takes, tensor by
    tensor. Which tensors a Q4_K_M gives more bits changes between llama-quantize versions: the
    default model's GGUF has Q6_K in other layers than ours chooses, and a tuned model quantized
    otherwise than its base differs from it by more than its tune."""
    converter = _tool(build.source("convert_hf_to_gguf.py"))
    quantizer = _tool(build.binary("llama-quantize"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".gguf-") as scratch:
        wide = Path(scratch) / "model-16bit.gguf"
        _run([sys.executable, str(converter), str(merged_dir), "--outfile", str(wide)])
        partial = Path(scratch) / out_path.name
        types: list[str] = []
        if like is not None:
            listed = Path(scratch) / "tensor-types.txt"
            listed.write_text("".join(f"{line}\n" for line in tensor_types(like)))
            types = ["--tensor-type-file", str(listed)]
        cores = str(os.cpu_count() or 1)
        _run([str(quantizer), *types, str(wide), str(partial), quant, cores])
        os.replace(partial, out_path)
    return out_path


def tensor_types(model: Path) -> list[str]:
    """`model`'s quantized tensors as llama-quantize's --tensor-type wants them: a pattern that
    matches the one name only (a bare name is searched for, so `output` would match every
    `attn_output`), then its type."""
    import gguf

    return [
        f"^{re.escape(tensor.name)}$={tensor.tensor_type.name.lower()}"
        for tensor in gguf.GGUFReader(model).tensors
        if tensor.tensor_type.name not in _FLOAT_TYPES
    ]


def adapter_to_gguf(
    adapter_dir: Path, base_dir: Path, out_path: Path, build: LlamaCppBuild
) -> Path:
    """The peft adapter `adapter_dir` of the Hugging Face checkpoint `base_dir` as a GGUF LoRA
    at out_path, which appears whole or not at all."""
    converter = _tool(build.source("convert_lora_to_gguf.py"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".gguf-") as scratch:
        partial = Path(scratch) / out_path.name
        command = [sys.executable, str(converter), str(adapter_dir), "--base", str(base_dir)]
        _run([*command, "--outfile", str(partial), "--outtype", ADAPTER_TYPE])
        os.replace(partial, out_path)
    return out_path


def _tool(path: Path) -> Path:
    if not path.exists():
        raise ModelError(
            f"no {path.name} at {path}: run scripts/setup (it builds llama.cpp's tools)"
        )
    return path


def _run(command: list[str]) -> None:
    """The tool, offline; a failure is a ModelError with the end of what it wrote."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        check=False,
    )
    if done.returncode != 0:
        tool = Path(command[1] if command[0] == sys.executable else command[0]).name
        tail = done.stdout.strip()[-ERROR_TAIL_CHARS:]
        raise ModelError(f"{tool} failed (exit {done.returncode}):\n{tail}")
