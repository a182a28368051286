"""Where a tuned version's held-out result comes from, each part on its own, on the samples its
loop scored:
- `adapter`: its LoRA applied to the exact base GGUF at a scale (no merge, no requantization;
  a scale below 1 interpolates between base and tune), against the base and the merged,
  quantized model the loop scored;
- `loss`: the target's teacher-forced loss per token, the base against the kept adapter: whether
  the tune learned what the completions are, before greedy decoding and post-processing;
- `latency`: what serving the tuned GGUF costs against the base's, per token: each held-out
  prompt read and then a fixed number of tokens written, the two models taking turns.

    python -m ghostpen.benchmarks.tuned_probe adapter agents-4 --scale 0.5
    python -m ghostpen.benchmarks.tuned_probe loss agents-4
    python -m ghostpen.benchmarks.tuned_probe latency mix-2 --limit 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ghostpen.context.template import load_template
from ghostpen.server import model_store
from ghostpen.server.llama_cpp_build import LlamaCppBuild
from ghostpen.server.settings import Settings
from ghostpen.server.training import registry
from ghostpen.server.training.export import Sample, read_samples, write_samples
from ghostpen.server.training.heldout import compare
from ghostpen.server.training.loop import drawn, evaluate, scores_once
from ghostpen.server.training.quantize import adapter_to_gguf
from ghostpen.server.training.tasks import KINDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("adapter", "loss", "latency"))
    parser.add_argument("name", help="a version `ghostpen loop` made")
    parser.add_argument("--scale", type=float, default=1.0, help="of the adapter (adapter)")
    parser.add_argument("--limit", type=int, default=0, help="the first N scored samples only")
    parser.add_argument("--tokens", type=int, default=32, help="after each prompt (latency)")
    parser.add_argument("--seed", type=int, default=0, help="the loop's, which drew the samples")
    args = parser.parse_args(argv)
    settings = Settings.load({})
    folder = registry.version_dir(settings.cache_dir, args.name)
    scores = json.loads((folder / "heldout-scores.json").read_text())
    samples = drawn(read_samples(folder / "data" / "heldout.jsonl"), scores["samples"], args.seed)
    samples = samples[: args.limit or None]
    base_hf = model_store.resolve(scores["against"], settings.cache_dir, want="hf").path
    print(f"{args.name}: {len(samples)} held-out samples of {len({s.file for s in samples})} files")
    if args.probe == "loss":
        for group, loss in target_losses(folder / "tune" / "adapter", base_hf, samples).items():
            print(f"  {group}: target loss base {loss[0]:.4f}, tuned {loss[1]:.4f}")
        return 0
    if args.probe == "latency":
        base_gguf = model_store.resolve(scores["against"], settings.cache_dir, want="gguf").path
        models = {"base": base_gguf, "tuned": folder / "model.gguf"}
        seconds = latencies(models, [s.prompt for s in samples], args.tokens)
        print(
            f"  {args.tokens} tokens after each prompt: base {seconds['base']:.2f} s, tuned "
            f"{seconds['tuned']:.2f} s, tuned / base {seconds['tuned'] / seconds['base']:.3f}"
        )
        return 0
    base_template, template = (
        load_template(scores["templates"][k].partition("@")[0]) for k in ("base", "tuned")
    )  # each as its comparison named it: id@version
    before = scores_once(settings, base_template, scores["against"], samples)
    merged = scores_once(settings, template, args.name, samples)
    with tempfile.TemporaryDirectory() as scratch:
        build = LlamaCppBuild.at(settings.cache_dir)
        adapter = scaled_adapter(folder / "tune" / "adapter", args.scale, base_hf, build, scratch)
        applied = evaluate(settings, template, scores["against"], samples, adapter)
    files = [s.file for s in samples]
    for label, after in ((f"adapter at {args.scale:g}", applied), ("merged", merged)):
        for metric, difference in compare(before, after, files).items():
            print(f"  {label} - base, {metric}: {difference.describe()}")
    return 0


def scaled_adapter(
    adapter: Path, scale: float, base_hf: Path, build: LlamaCppBuild, scratch: str
) -> Path:
    """The peft adapter as a GGUF LoRA whose update is `scale` times its own (lora_alpha
    scaled: the update is alpha / rank times B·A)."""
    copy = Path(scratch) / "adapter"
    shutil.copytree(adapter, copy)
    config_path = copy / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] *= scale
    config_path.write_text(json.dumps(config))
    return adapter_to_gguf(copy, base_hf, Path(scratch) / "adapter.gguf", build)


def target_losses(
    adapter: Path, base_hf: Path, samples: list[Sample]
) -> dict[str, tuple[float, float]]:
    """(base, tuned) teacher-forced loss per target token, over all samples and by kind."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ghostpen.server.training.dataset import read_dataset
    from ghostpen.server.training.tune import MAX_SEQ_TOKENS, heldout_loss, native_bf16

    tokenizer = AutoTokenizer.from_pretrained(base_hf)
    dtype = torch.bfloat16 if native_bf16() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_hf, dtype=dtype)
    tuned = PeftModel.from_pretrained(model, adapter)
    groups = {"all": samples} | {k: [s for s in samples if s.kind == k] for k in KINDS}
    losses = {}
    with tempfile.TemporaryDirectory() as scratch:
        for group, chosen in groups.items():
            if not chosen:
                continue
            path = Path(scratch) / f"{group}.jsonl"
            write_samples(path, chosen)
            dataset = read_dataset(path, tokenizer, MAX_SEQ_TOKENS)
            with tuned.disable_adapter():
                base = heldout_loss(tuned, dataset, 0.0, "cpu", MAX_SEQ_TOKENS)
            losses[group] = (base, heldout_loss(tuned, dataset, 0.0, "cpu", MAX_SEQ_TOKENS))
    return losses


def latencies(models: dict[str, Path], prompts: list[str], tokens: int) -> dict[str, float]:
    """Seconds each model takes to read every prompt and write `tokens` greedy tokens after it,
    never stopping early: a per-token cost, where a served completion's time also depends on
    when the model ends it. The models take turns prompt by prompt, so a drift in the machine's
    speed falls on both. llama.cpp on every core: run it alone."""
    from llama_cpp import Llama

    threads = len(os.sched_getaffinity(0))
    window = 2048
    engines = {
        name: Llama(str(path), n_ctx=window, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
        for name, path in models.items()
    }  # fmt: skip
    seconds = dict.fromkeys(models, 0.0)
    for prompt in prompts:
        for name, engine in engines.items():
            ids = engine.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            started = time.perf_counter()
            engine.reset()
            engine.eval(ids[-(window - tokens) :])
            for _ in range(tokens):
                engine.eval([engine.sample(temp=0.0)])
            seconds[name] += time.perf_counter() - started
    return seconds


if __name__ == "__main__":
    raise SystemExit(main())
