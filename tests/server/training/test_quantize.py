"""The flywheel's GGUF, by llama.cpp's own tools: a tiny Qwen2 (Qwen2.5-Coder's tokenizer)
fine-tuned to write one completion, quantized to Q4_K_M, then served by ghostpen's llama.cpp
engine: merged, and as its base with the GGUF adapter applied to the requests that name it (as
the loop scores an adapter, too)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import gguf
import pytest
import pytest_asyncio

from ghostpen.benchmarks.tuned_probe import latencies
from ghostpen.server.engines.base import Engine, EngineRequest
from ghostpen.server.engines.factory import start_in_process
from ghostpen.server.errors import ModelError
from ghostpen.server.llama_cpp_build import LlamaCppBuild
from ghostpen.server.model_store import REGISTRY, models_dir
from ghostpen.server.settings import Settings
from ghostpen.server.training import loop
from ghostpen.server.training.export import Sample, prompt_in
from ghostpen.server.training.quantize import adapter_to_gguf, to_gguf
from ghostpen.server.training.tune import TuneConfig, TuneResult, tune
from tests.server.training.test_tune import END, TEMPLATE, rendered
from tests.tiny_model import build_tiny_qwen2

PROMPT = rendered("def add(a, b):\n    ")
COMPLETION = "return a + b"
OTHER = rendered("class Cart:\n    ")  # a prompt it was not trained on
TIMEOUT_S = 60
REQUEST_IDS = itertools.count()
MOSTLY_Q4_K_M = 15  # general.file_type (llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M)


@pytest.fixture(scope="module")
def tiny_qwen(settings: Settings) -> Path:
    tokenizer = models_dir(settings.cache_dir) / REGISTRY[settings.engine.model].filename
    return build_tiny_qwen2(settings.cache_dir / "test-models" / "tiny-qwen2", tokenizer)


@pytest.fixture(scope="module")
def tuned(
    settings: Settings, tiny_qwen: Path, tmp_path_factory: pytest.TempPathFactory
) -> TuneResult:
    """Taught one completion by heart: what it writes after PROMPT shows the tune arrived."""
    data = tmp_path_factory.mktemp("data") / "samples.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "target": COMPLETION + END}) + "\n")
    out = tmp_path_factory.mktemp("tuned")
    fast = {"steps": 40, "lr": 5e-3, "batch_tokens": 64, "dtype": "fp32"}
    return tune(TuneConfig(data, out, str(tiny_qwen), settings.cache_dir, **fast))


@pytest.fixture(scope="module")
def build(settings: Settings) -> LlamaCppBuild:
    return LlamaCppBuild.at(settings.cache_dir)


@pytest.fixture(scope="module")
def merged_gguf(tuned: TuneResult, build: LlamaCppBuild) -> Path:
    return to_gguf(tuned.merged_dir, tuned.merged_dir.parent / "model-q4_k_m.gguf", build)


@pytest.fixture(scope="module")
def base_gguf(
    tiny_qwen: Path, build: LlamaCppBuild, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return to_gguf(tiny_qwen, tmp_path_factory.mktemp("base") / "base-q4_k_m.gguf", build)


@pytest.fixture(scope="module")
def adapter_gguf(tuned: TuneResult, build: LlamaCppBuild) -> Path:
    out = tuned.adapter_dir.parent / "adapter.gguf"
    return adapter_to_gguf(tuned.adapter_dir, tuned.base_dir, out, build)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def merged_engine(settings: Settings, merged_gguf: Path) -> AsyncIterator[Engine]:
    async with engine_on(settings, merged_gguf) as engine:
        yield engine


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base_engine(
    settings: Settings, base_gguf: Path, adapter_gguf: Path
) -> AsyncIterator[Engine]:
    async with engine_on(settings, base_gguf, f"tuned={adapter_gguf}") as engine:
        yield engine


@contextlib.asynccontextmanager
async def engine_on(settings: Settings, model: Path, adapters: str = "") -> AsyncIterator[Engine]:
    """ghostpen's llama.cpp engine in this process on a GGUF, with adapters by name."""
    small = dataclasses.replace(
        settings.engine,
        model=str(model),
        lora_adapters=adapters,
        context_window=512,
        kv_cache_tokens=1024,
    )
    engine = await start_in_process(small, settings.cache_dir)
    try:
        yield engine
    finally:
        await engine.close()


async def complete(engine: Engine, prompt: str, adapter: str = "") -> str:
    request = EngineRequest(f"q-{next(REQUEST_IDS)}", prompt, 16, adapter=adapter)
    async with asyncio.timeout(TIMEOUT_S):
        return "".join([delta.text async for delta in engine.generate(request)])


def test_the_merged_checkpoint_becomes_a_q4_k_m_gguf(merged_gguf: Path) -> None:
    reader = gguf.GGUFReader(merged_gguf)
    assert reader.fields["general.file_type"].contents() == MOSTLY_Q4_K_M
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"  # the converter knew it
    kinds = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_up.weight"] == "Q4_K"
    assert not list(merged_gguf.parent.glob(".gguf-*"))  # nothing left of the way there


def test_a_tuned_gguf_takes_its_bases_tensor_types(
    tuned: TuneResult, tiny_qwen: Path, build: LlamaCppBuild, tmp_path: Path
) -> None:
    # A base quantized otherwise than llama-quantize's own Q4_K_M would: every tensor in Q8_0
    base = to_gguf(tiny_qwen, tmp_path / "base.gguf", build, quant="Q8_0")
    plain = {t.name: t.tensor_type.name for t in gguf.GGUFReader(base).tensors}
    assert plain["blk.0.attn_q.weight"] == plain["blk.1.ffn_up.weight"] == "Q8_0"
    typed = to_gguf(tuned.merged_dir, tmp_path / "tuned.gguf", build, like=base)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(typed).tensors}
    assert kinds == plain  # every tensor, where the plain Q4_K_M makes its own choice (above)
    assert gguf.GGUFReader(typed).fields["general.file_type"].contents() == MOSTLY_Q4_K_M


async def test_the_engine_serves_the_merged_gguf_and_it_writes_what_it_learnt(
    tuned: TuneResult, merged_engine: Engine
) -> None:
    # Random embeddings of std 0.02 behind a final norm it cannot train bound its logits: the
    # loss stops near 6.9 (from 12.1), enough for the completion to be the likeliest tokens.
    assert tuned.loss < 7.5
    assert await complete(merged_engine, PROMPT) == COMPLETION


def test_the_latency_probe_times_both_models_on_every_prompt(
    base_gguf: Path, merged_gguf: Path
) -> None:
    seconds = latencies({"base": base_gguf, "tuned": merged_gguf}, [PROMPT, OTHER], 4)
    assert set(seconds) == {"base", "tuned"}
    assert all(s > 0 for s in seconds.values())


def test_the_loop_scores_an_adapter_on_its_base_as_a_request_naming_it_is_served(
    settings: Settings, base_gguf: Path, adapter_gguf: Path
) -> None:
    sample = Sample(
        sample_id="add", source="repo", file="acme/shop/cart.py", language="python",
        kind="line", time_ms=0, prompt=PROMPT, target=COMPLETION + END,
        prefix="def add(a, b):\n    ", suffix="\n", healed="", expected=COMPLETION,
        repo="acme/shop", path="cart.py", context=(("money.py", 1, 1, "CENTS = 100\n"),),
    )  # fmt: skip
    assert prompt_in(sample, TEMPLATE) == PROMPT  # what the adapter learned to complete
    small = dataclasses.replace(
        settings,
        engine=dataclasses.replace(settings.engine, context_window=512, kv_cache_tokens=1024),
    )
    [applied] = loop.evaluate(small, TEMPLATE, str(base_gguf), [sample], adapter_gguf)
    [plain] = loop.evaluate(small, TEMPLATE, str(base_gguf), [sample])
    assert (applied.text, applied.exact) == (COMPLETION, 1.0)
    assert plain.exact == 0.0


async def test_the_adapter_gguf_changes_only_the_requests_that_name_it(
    base_engine: Engine,
) -> None:
    assert await complete(base_engine, PROMPT, adapter="tuned") == COMPLETION
    assert await complete(base_engine, PROMPT) != COMPLETION
    assert await complete(base_engine, OTHER, "tuned") != await complete(base_engine, OTHER)


def test_the_adapter_gguf_is_a_lora_on_every_tuned_projection(adapter_gguf: Path) -> None:
    reader = gguf.GGUFReader(adapter_gguf)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    names = {tensor.name for tensor in reader.tensors}
    for block in (0, 1):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert {
                f"blk.{block}.{kind}.weight.lora_a",
                f"blk.{block}.{kind}.weight.lora_b",
            } <= names


def test_a_failing_tool_is_a_model_error_with_what_it_said(
    build: LlamaCppBuild, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ModelError, match=r"(?s)convert_hf_to_gguf\.py failed \(exit 1\).*NoSuch"):
        to_gguf(tmp_path, tmp_path / "out.gguf", build)
    assert not (tmp_path / "out.gguf").exists()


def test_missing_tools_say_to_run_the_setup(tmp_path: Path) -> None:
    build = LlamaCppBuild(tmp_path / "nowhere")
    with pytest.raises(ModelError, match=r"no convert_hf_to_gguf\.py at .*run scripts/setup"):
        to_gguf(tmp_path, tmp_path / "out.gguf", build)
    with pytest.raises(ModelError, match=r"no convert_lora_to_gguf\.py at .*run scripts/setup"):
        adapter_to_gguf(tmp_path, tmp_path, tmp_path / "out.gguf", build)
