"""Pick and start the engine the settings ask for."""

from __future__ import annotations

import shutil
from pathlib import Path

from server.engines.base import Engine
from server.model_store import resolve
from server.settings import EngineSettings

ENGINES = ("auto", "llama.cpp", "vllm")


def choose_engine(requested: str) -> str:
    """`auto` is vLLM where a CUDA GPU is visible, llama.cpp otherwise."""
    if requested not in ENGINES:
        raise ValueError(f"unknown engine {requested!r}; choose one of {', '.join(ENGINES)}")
    if requested != "auto":
        return requested
    return "vllm" if shutil.which("nvidia-smi") and Path("/dev/nvidia0").exists() else "llama.cpp"


async def start_engine(settings: EngineSettings, cache_dir: Path) -> Engine:
    kind = choose_engine(settings.engine)
    if kind == "vllm":
        from server.engines.vllm import VllmEngine

        model = resolve(settings.model, cache_dir, want="hf")
        return await VllmEngine.start(settings, model.path, model.model_id)
    from server.engines.llama_cpp import LlamaCppEngine

    model = resolve(settings.model, cache_dir, want="gguf")
    return await LlamaCppEngine.start(settings, model.path, model.model_id)
