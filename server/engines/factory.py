"""Pick and start the engine the settings ask for: in a supervised child process by default."""

from __future__ import annotations

import shutil
from pathlib import Path

from ghostpen.server.engines.base import Engine
from ghostpen.server.metrics import Metrics
from ghostpen.server.model_store import resolve
from ghostpen.server.settings import ENGINES, EngineSettings


def choose_engine(requested: str) -> str:
    """`auto` is vLLM where a CUDA GPU is visible, llama.cpp otherwise."""
    if requested not in ENGINES:
        raise ValueError(f"unknown engine {requested!r}; choose one of {', '.join(ENGINES)}")
    if requested != "auto":
        return requested
    return "vllm" if shutil.which("nvidia-smi") and Path("/dev/nvidia0").exists() else "llama.cpp"


async def start_engine(settings: EngineSettings, cache_dir: Path, metrics: Metrics) -> Engine:
    """The engine the server uses; ModelError if it cannot start."""
    if settings.engine == "remote":  # holds no model: nothing to supervise
        from ghostpen.server.engines.remote import RemoteEngine

        return await RemoteEngine.start(settings, metrics)
    if not settings.engine_process:
        return await start_in_process(settings, cache_dir)
    from ghostpen.server.engines.supervisor import SupervisedEngine

    return await SupervisedEngine.start(settings, cache_dir, metrics)


async def start_in_process(settings: EngineSettings, cache_dir: Path) -> Engine:
    """The engine itself, in this process (the engine process calls this)."""
    kind = choose_engine(settings.engine)
    if kind == "vllm":
        from ghostpen.server.engines.vllm import VllmEngine

        model = resolve(settings.model, cache_dir, want="hf")
        return await VllmEngine.start(settings, model.path, model.model_id)
    model = resolve(settings.model, cache_dir, want="gguf")
    if kind == "llama-server":  # the peer our llama.cpp engine is measured against
        from ghostpen.server.engines.llama_server import LlamaServerEngine

        return await LlamaServerEngine.start(settings, model.path, model.model_id, cache_dir)
    from ghostpen.server.engines.llama_cpp import LlamaCppEngine

    return await LlamaCppEngine.start(settings, model.path, model.model_id)
