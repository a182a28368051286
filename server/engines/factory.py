"""Pick and start the engine the settings ask for: in a supervised child process by default."""

from __future__ import annotations

import shutil
from pathlib import Path

from server.engines.base import Engine
from server.metrics import Metrics
from server.model_store import resolve
from server.settings import EngineSettings

ENGINES = ("auto", "llama.cpp", "vllm", "llama-server")


def choose_engine(requested: str) -> str:
    """`auto` is vLLM where a CUDA GPU is visible, llama.cpp otherwise."""
    if requested not in ENGINES:
        raise ValueError(f"unknown engine {requested!r}; choose one of {', '.join(ENGINES)}")
    if requested != "auto":
        return requested
    return "vllm" if shutil.which("nvidia-smi") and Path("/dev/nvidia0").exists() else "llama.cpp"


async def start_engine(settings: EngineSettings, cache_dir: Path, metrics: Metrics) -> Engine:
    """The engine the server uses; ModelError if it cannot start."""
    if not settings.engine_process:
        return await start_in_process(settings, cache_dir)
    from server.engines.supervisor import SupervisedEngine

    return await SupervisedEngine.start(settings, cache_dir, metrics)


async def start_in_process(settings: EngineSettings, cache_dir: Path) -> Engine:
    """The engine itself, in this process (the engine process calls this)."""
    kind = choose_engine(settings.engine)
    if kind == "vllm":
        from server.engines.vllm import VllmEngine

        model = resolve(settings.model, cache_dir, want="hf")
        return await VllmEngine.start(settings, model.path, model.model_id)
    model = resolve(settings.model, cache_dir, want="gguf")
    if kind == "llama-server":  # the peer our llama.cpp engine is measured against
        from server.engines.llama_server import LlamaServerEngine

        return await LlamaServerEngine.start(settings, model.path, model.model_id, cache_dir)
    from server.engines.llama_cpp import LlamaCppEngine

    return await LlamaCppEngine.start(settings, model.path, model.model_id)
