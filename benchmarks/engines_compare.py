"""Our llama.cpp engine against our vLLM engine: same model, same prompts, one run, as ratios.

The prompts are built by the real context pipeline at random points of real files (12 recently
touched stdlib modules). Each prompt is run twice in a row: cold (nothing cached) and warm (the
same prompt again, as the next keystroke mostly is). Generation is greedy and runs to
--max-tokens or the end-of-text token; the model is Qwen2.5-Coder-0.5B, Q4_K_M for llama.cpp and
its bf16 de-quantization (`ghostpen models convert`) for vLLM.

    python -m ghostpen.benchmarks.engines_compare --prompts 16
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import time
from pathlib import Path

from ghostpen.benchmarks.corpus import percentiles, stdlib_files
from ghostpen.context.chunker import IncrementalChunker
from ghostpen.context.prompt import Document, build_prompt
from ghostpen.context.template import load_template
from ghostpen.server.engines.base import Engine, EngineRequest
from ghostpen.server.engines.factory import start_in_process
from ghostpen.server.settings import Settings
from ghostpen.server.workspace import FileChange, Workspace


def build_prompts(settings: Settings, count: int, seed: int) -> list[str]:
    files = stdlib_files(300, 1300, settings.limits.max_files)
    workspace = Workspace(settings.limits)
    chunker = IncrementalChunker(settings.context.chunk_max_lines, settings.context.max_tree_chars)
    for path in files:
        workspace.apply(FileChange(path.name, "", 1, text=path.read_text(encoding="utf-8")))
    for held in workspace.unchunked():
        held.set_chunks(chunker.chunk("bench", held.path, held.language, held.text))
    template = load_template(settings.context.template)
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        held = workspace.get(rng.choice(files).name, 1)
        line_starts = [i + 1 for i, c in enumerate(held.text) if c == "\n"]
        start = rng.choice(line_starts[len(line_starts) // 4 :])
        end = held.text.find("\n", start)
        cursor = start + (end - start) // 2
        document = Document(held.path, held.language, held.text, cursor)
        prompts.append(
            build_prompt("stdlib", document, workspace.chunks(), template, settings.context).text
        )
    return prompts


async def measure(engine: Engine, prompts: list[str], max_tokens: int) -> dict[str, object]:
    async def once(request_id: str, prompt: str) -> dict[str, float]:
        start = time.perf_counter()
        first, tokens, cached = 0.0, 0, 0
        async for delta in engine.generate(EngineRequest(request_id, prompt, max_tokens)):
            if delta.completion_tokens and not first:
                first = time.perf_counter()
            tokens, cached = delta.completion_tokens, delta.cached_tokens
        done = time.perf_counter()
        decode = (tokens - 1) / (done - first) if tokens > 1 and done > first else 0.0
        return {
            "ttft_ms": (first - start) * 1000,
            "total_ms": (done - start) * 1000,
            "tokens": tokens,
            "decode_tokens_per_s": decode,
            "cached_tokens": cached,
        }

    await once("warmup", "def warm_up():")
    cold, warm = [], []
    for index, prompt in enumerate(prompts):
        cold.append(await once(f"cold-{index}", prompt))
        warm.append(await once(f"warm-{index}", prompt))
    return {
        "cold_ttft_ms": percentiles([r["ttft_ms"] for r in cold]),
        "warm_ttft_ms": percentiles([r["ttft_ms"] for r in warm]),
        "cold_total_ms": percentiles([r["total_ms"] for r in cold]),
        "decode_tokens_per_s": percentiles([r["decode_tokens_per_s"] for r in cold + warm]),
        "tokens_per_completion": sum(r["tokens"] for r in cold) / len(cold),
        "warm_cached_tokens": sum(r["cached_tokens"] for r in warm) / len(warm),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    settings = Settings.load({"kv_cache_gib": "2", "enforce_eager": "true"})
    prompts = build_prompts(settings, args.prompts, args.seed)
    results: dict[str, object] = {"prompts": len(prompts), "max_tokens": args.max_tokens}
    for name in ("llama.cpp", "vllm"):
        engine_settings = dataclasses.replace(settings.engine, engine=name)
        started = time.perf_counter()
        engine = await start_in_process(engine_settings, settings.cache_dir)
        startup_s = time.perf_counter() - started
        results[name] = {"startup_s": startup_s, **await measure(engine, prompts, args.max_tokens)}
        await engine.close()
    llama, vllm = results["llama.cpp"], results["vllm"]
    results["ratio_vllm_over_llama"] = {
        "cold_ttft_p50": vllm["cold_ttft_ms"]["p50"] / llama["cold_ttft_ms"]["p50"],
        "warm_ttft_p50": vllm["warm_ttft_ms"]["p50"] / llama["warm_ttft_ms"]["p50"],
        "cold_total_p50": vllm["cold_total_ms"]["p50"] / llama["cold_total_ms"]["p50"],
        "decode_tokens_per_s_p50": vllm["decode_tokens_per_s"]["p50"]
        / llama["decode_tokens_per_s"]["p50"],
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/engines_compare.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
