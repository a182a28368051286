"""The flywheel as one command: export → tune → quantize → evaluate → register.

Everything a run makes goes into the version's folder (`models/tuned/<name>/`): data/ (the
export, and validation.jsonl: held-out samples the comparison does not score, whose loss picks
the tune's kept step), tune/ (checkpoints: a second run of the same name goes on from the last
one), the served model.gguf, adapter.gguf and the merged checkpoint. The version is registered
last, with its held-out comparison against its base; it becomes the default only by `ghostpen
models promote`, which weighs that comparison.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ghostpen.context.template import Template, load_template
from ghostpen.server import model_store
from ghostpen.server.errors import ModelError
from ghostpen.server.llama_cpp_build import LlamaCppBuild
from ghostpen.server.settings import Settings
from ghostpen.server.stats import Difference
from ghostpen.server.telemetry.store import Store
from ghostpen.server.training import registry
from ghostpen.server.training.export import (
    ExportConfig,
    Sample,
    export,
    read_samples,
    write_samples,
)
from ghostpen.server.training.heldout import Scored, compare, score
from ghostpen.server.training.quantize import QUANT, adapter_to_gguf, to_gguf
from ghostpen.server.training.tune import (
    BATCH_TOKENS,
    LEARNING_RATE,
    PROMPT_WEIGHT,
    RANK,
    TuneConfig,
    check_recipe,
    tune,
)

# Scored by each model: the paired comparison's size. A lift of 0.02 in edit similarity is
# about 2.4 standard errors on 600 samples (bootstrap by file); on 400 it is not reliably shown.
HELDOUT_SAMPLES = 600
MINUTES = 25.0  # of training: with 600 scored on two CPU cores, the loop's hour
# Training prompts' (prefix, context) tokens: shorter than served (1,280, 512), so that a step
# reads more samples; learning the code in the window is what lifts (benchmarks/RESULTS.md)
TRAIN_BUDGETS = (256, 160)
VALIDATION_SAMPLES = 32  # held out, not scored: their loss picks the tune's kept step
HELDOUT_CONCURRENCY = 4  # completions in flight while scoring
ADAPTER_NAME = "scored"  # what `evaluate` names an adapter it scores


@dataclass(frozen=True)
class LoopConfig:
    name: str  # the version to make
    base: str  # the model to tune: a built-in (converted once, here) or a version
    repos: tuple[Path, ...]  # the team's own code, if any
    captures: bool  # learn from kept completions too
    template: str
    repo_samples: int = 2000
    steps: int | None = None
    minutes: float | None = MINUTES
    heldout_samples: int = HELDOUT_SAMPLES
    lr: float = LEARNING_RATE
    prompt_weight: float = PROMPT_WEIGHT
    lr_decay: bool = True  # the tune's rate falls to zero at its bound
    top_layers: int = 0  # LoRA on these top layers only; 0: all
    batch_tokens: int = BATCH_TOKENS  # tokens an optimizer step reads
    rank: int = RANK  # the adapter's, its alpha twice that
    train_budgets: tuple[int, int] | None = TRAIN_BUDGETS  # None: as served
    seed: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        if self.heldout_samples < 2 or self.repo_samples < 0:
            raise ValueError(
                f"heldout_samples must be at least 2 and repo_samples at least 0: "
                f"{self.heldout_samples}, {self.repo_samples}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be above 0: {self.lr}")
        check_recipe(self.rank, self.batch_tokens, self.top_layers, self.prompt_weight)
        if self.train_budgets is not None and min(self.train_budgets) < 0:
            raise ValueError(f"training prompt budgets must be at least 0: {self.train_budgets}")


def run_loop(
    config: LoopConfig, settings: Settings, store: Store, say: Callable[[str], None]
) -> registry.Version:
    if registry.get(store, config.name) is not None:
        raise ModelError(f"version {config.name!r} is registered already; choose another name")
    folder = registry.version_dir(settings.cache_dir, config.name)

    template = load_template(config.template)
    with _stage("export", say):
        done = folder / "data" / "manifest.json"
        if done.is_file():  # a run that stopped: its checkpoint was trained on this data
            manifest = json.loads(done.read_text())
            say(f"  the data of the run before ({manifest['hash'][:12]})")
        else:
            exported = ExportConfig(
                out=folder / "data",
                template=template,
                context=settings.context,
                repo_samples=config.repo_samples,
                seed=config.seed,
                train_budgets=config.train_budgets,
            )
            manifest = export(exported, store if config.captures else None, config.repos)
        counts = cast(dict[str, int], manifest["counts"])
        say(f"  {counts['train']} training samples, {counts['heldout']} held out")
    if not counts["train"] or not counts["heldout"]:
        raise ModelError("too little data to train and evaluate on: give a --repo, or more")
    every_heldout = read_samples(folder / "data" / "heldout.jsonl")
    heldout = drawn(every_heldout, config.heldout_samples, config.seed)
    validation = unscored(every_heldout, heldout, VALIDATION_SAMPLES, config.seed)
    if validation:
        write_samples(folder / "data" / "validation.jsonl", validation)

    with _stage("base checkpoint", say):
        base_hf = _base_checkpoint(config.base, settings.cache_dir)
    with _stage("tune", say):
        tuned = tune(
            TuneConfig(
                data=folder / "data" / "train.jsonl",
                out=folder / "tune",
                base=str(base_hf),
                cache_dir=settings.cache_dir,
                steps=config.steps,
                minutes=config.minutes,
                lr=config.lr,
                prompt_weight=config.prompt_weight,
                lr_decay=config.lr_decay,
                top_layers=config.top_layers,
                batch_tokens=config.batch_tokens,
                rank=config.rank,
                seed=config.seed,
                heldout=folder / "data" / "validation.jsonl" if validation else None,
            ),
            lambda p: say(f"  {p.describe()}"),
        )
        if tuned.kept_step != tuned.steps:
            say(f"  kept step {tuned.kept_step}, of the lowest held-out loss")
    with _stage("quantize", say):
        build = LlamaCppBuild.at(settings.cache_dir)
        base_gguf = _base_gguf(config.base, base_hf, settings.cache_dir, folder, build)
        model = to_gguf(tuned.merged_dir, folder / model_store.TUNED_GGUF, build, like=base_gguf)
        adapter_to_gguf(tuned.adapter_dir, base_hf, folder / "adapter.gguf", build)
        merged = folder / model_store.TUNED_HF
        if merged.exists():
            shutil.rmtree(merged)
        os.replace(tuned.merged_dir, merged)
    with _stage("evaluate", say):
        base = Contender(
            config.base,
            str(base_gguf),
            load_template(registry.template_of(store, config.base, settings.context.template)),
        )
        scores = measure(settings, base, Contender(config.name, config.name, template), heldout)
        (folder / "heldout-scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        for name in ("similarity", "exact"):
            say(f"  {name}: {Difference(**scores[name]).describe()}")
    version = registry.Version(
        name=config.name,
        kind="model",
        base=config.base,
        path=str(model),
        data_hash=str(manifest["hash"]),
        steps=tuned.kept_step,
        train_tokens=tuned.tokens,
        quantization=QUANT,
        scores=json.dumps(scores),
        created_ms=int(time.time() * 1000),
        note=config.note,
        template=template.name,
    )
    registry.register(store, version)
    say(f"registered {config.name}; `ghostpen models promote {config.name}` makes it the default")
    return version


def drawn(samples: list[Sample], count: int, seed: int) -> list[Sample]:
    """A seeded draw of `count` samples, so that every kind of sample is scored, not the first
    in the file's order. A larger draw holds the smaller one (the start of one seeded order),
    so that its kept scores are reused."""
    order = random.Random(seed).sample(range(len(samples)), len(samples))
    return [samples[i] for i in sorted(order[:count])]


def unscored(samples: list[Sample], scored: list[Sample], count: int, seed: int) -> list[Sample]:
    """A seeded draw of `count` held-out samples that are not scored, from files with none
    scored first: choosing the kept step by their loss does not peek at the comparison."""
    ids, files = {s.sample_id for s in scored}, {s.file for s in scored}
    rest = [s for s in samples if s.sample_id not in ids]
    random.Random(seed).shuffle(rest)
    rest.sort(key=lambda s: s.file in files)  # stable: the shuffle holds within each group
    return rest[:count]


@dataclass(frozen=True)
class Contender:
    """A model as it would be served: by its name, from `model` (what `model_store.resolve`
    knows), in its prompt template."""

    name: str
    model: str
    template: Template


def measure(
    settings: Settings, against: Contender, candidate: Contender, samples: list[Sample]
) -> dict[str, object]:
    """The paired held-out comparison of `candidate` against a model as each is served (a tuned
    model in its template, the base in its own), as the registry keeps it and promotion weighs
    it. Both models' scores are kept, sample by sample (`scores_once`): the next run on the same
    held-out samples reuses the base's, and any comparison can be recomputed."""
    before = scores_once(settings, against.template, against.model, samples)
    after = scores_once(settings, candidate.template, candidate.model, samples)
    return {
        "against": against.name,
        "templates": {
            "base": against.template.template_id,
            "tuned": candidate.template.template_id,
        },
        "samples": len(samples),
        **{
            name: dataclasses.asdict(d)
            for name, d in compare(before, after, [s.file for s in samples]).items()
        },
        "failed": {"base": sum(s.failed for s in before), "tuned": sum(s.failed for s in after)},
        "similarity_means": {"base": _mean(before), "tuned": _mean(after)},
        "latency_ms_p50": {"base": _median(before), "tuned": _median(after)},
    }


def evaluate(
    settings: Settings,
    template: Template,
    model: str,
    samples: list[Sample],
    adapter: Path | None = None,
) -> list[Scored]:
    """`model` (a name `model_store.resolve` knows) on llama.cpp, in this process, scored;
    with `adapter` (a GGUF LoRA of it), as the engine serves a request that names it."""
    from ghostpen.server.engines.factory import start_in_process

    name = ADAPTER_NAME if adapter is not None else ""
    engine_settings = dataclasses.replace(
        settings.engine,
        model=model,
        engine="llama.cpp",
        threads=scoring_threads(settings),
        lora_adapters=f"{name}={adapter}" if name else "",
    )

    async def run() -> list[Scored]:
        engine = await start_in_process(engine_settings, settings.cache_dir)
        try:
            return await score(engine, settings, template, samples, HELDOUT_CONCURRENCY, name)
        finally:
            await engine.close()

    return asyncio.run(run())


def scoring_threads(settings: Settings) -> int:
    """Every core unless `threads` says otherwise: scoring is a batch job with nothing beside
    it, where serving keeps a core free (1.8x faster on 2 cores). A part of what decides the
    scores: llama.cpp sums in another order on another number of threads, and a greedy near-tie
    can go the other way (4 of 150 texts, 1 thread against 2)."""
    return settings.engine.threads or len(os.sched_getaffinity(0))


def scores_once(
    settings: Settings, template: Template, model: str, samples: list[Sample]
) -> list[Scored]:
    """`evaluate`, kept sample by sample under the cache (`kept_scores`): a weekly flywheel
    scores the same base on much the same held-out split, and a larger draw of it (the seeded
    draw of more samples starts with the smaller one) scores only the samples it adds."""
    path = kept_scores(settings, template, model)
    kept = _read_kept(path)
    keys = [_sample_key(sample) for sample in samples]
    missing = {key: sample for key, sample in zip(keys, samples, strict=True) if key not in kept}
    if missing:
        scored = evaluate(settings, template, model, list(missing.values()))
        kept |= dict(zip(missing, scored, strict=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        lines = (json.dumps({"key": key, **dataclasses.asdict(a)}) for key, a in kept.items())
        partial.write_text("".join(line + "\n" for line in lines))
        os.replace(partial, path)
    return [kept[key] for key in keys]


def kept_scores(settings: Settings, template: Template, model: str) -> Path:
    """Where `model`'s scores are kept, named by what decides them but the sample: the model
    file, the template, the serving settings (threads as scoring runs them) and code."""
    served = model_store.resolve(model, settings.cache_dir, want="gguf").path.resolve()
    facts = served.stat()
    decides = [
        str(served), facts.st_size, facts.st_mtime_ns, template.template_id,
        template.content_hash, repr(settings.context),
        repr(dataclasses.replace(settings.engine, model="", threads=scoring_threads(settings))),
        serving_code_hash(),
    ]  # fmt: skip
    key = hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()
    return settings.cache_dir / "heldout-scores" / f"{key}.jsonl"


def _sample_key(sample: Sample) -> str:
    """All of the sample: what its prompt is rendered from, and what it is scored against."""
    text = json.dumps(dataclasses.asdict(sample), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_kept(path: Path) -> dict[str, Scored]:
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return {row.pop("key"): Scored(**row) for row in rows}


@functools.cache
def serving_code_hash() -> str:
    """Of the code between a prompt and a scored answer: the context package (prompt,
    post-processing, gate), the completer and the scorer. Scores kept from before a change
    to it (a new post-processing filter) are not the current code's."""
    from ghostpen import context
    from ghostpen.server import completion
    from ghostpen.server.training import heldout

    files = sorted(Path(context.__file__).parent.glob("*.py"))
    files += [Path(module.__file__) for module in (completion, heldout) if module.__file__]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _base_gguf(
    base: str, base_hf: Path, cache_dir: Path, folder: Path, build: LlamaCppBuild
) -> Path:
    """What the base is served as; a base known only as a checkpoint is quantized as the
    tuned model is, so that both are compared as they would be served."""
    try:
        return model_store.resolve(base, cache_dir, want="gguf").path
    except ModelError:
        return to_gguf(base_hf, folder / "base.gguf", build)


def _base_checkpoint(base: str, cache_dir: Path) -> Path:
    """The Hugging Face checkpoint of `base`; a built-in's is converted from its GGUF once."""
    try:
        return model_store.resolve(base, cache_dir, want="hf").path
    except ModelError:
        if base not in model_store.REGISTRY:
            raise
    gguf = model_store.fetch(base, cache_dir)
    return model_store.convert(gguf, model_store.converted_dir(cache_dir, base))


@contextmanager
def _stage(name: str, say: Callable[[str], None]) -> Iterator[None]:
    """Says when a stage starts and how long it took."""
    started = time.monotonic()
    say(f"{name}...")
    yield
    say(f"{name}: done in {time.monotonic() - started:.0f} s")


def _mean(scored: list[Scored]) -> float:
    return sum(s.similarity for s in scored) / len(scored) if scored else 0.0


def _median(scored: list[Scored]) -> float:
    times = sorted(s.total_ms for s in scored)
    return times[len(times) // 2] if times else 0.0
