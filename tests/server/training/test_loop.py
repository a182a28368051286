"""`ghostpen loop` end to end on a tiny Qwen2 (Qwen2.5-Coder's tokenizer, random weights): a
repository's samples exported, a few steps of LoRA, llama.cpp's quantizer, both models scored on
the held-out split by the llama.cpp engine, and the version registered with its lineage. It says
nothing of quality: the benchmark (benchmarks/RESULTS.md) measures the real model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from ghostpen.cli import main
from ghostpen.context.template import Template, load_template
from ghostpen.server.model_store import REGISTRY, models_dir, resolve
from ghostpen.server.settings import EngineSettings, Settings
from ghostpen.server.telemetry.store import Store
from ghostpen.server.training import loop, registry
from ghostpen.server.training.export import Sample, read_samples
from ghostpen.server.training.heldout import Scored
from ghostpen.server.training.loop import LoopConfig, run_loop
from tests.server.training.test_export import git_repo
from tests.tiny_model import build_tiny_qwen2


def test_the_loop_makes_registers_and_serves_a_version(
    settings: Settings, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = models_dir(settings.cache_dir) / REGISTRY[settings.engine.model].filename
    base = build_tiny_qwen2(settings.cache_dir / "test-models" / "tiny-qwen2", tokenizer)
    repo = git_repo(tmp_path / "shop", [f"shop{i}" for i in range(8)])
    name = f"test-loop-{uuid.uuid4().hex[:8]}"
    database = str(tmp_path / "telemetry.db")
    loop_settings = dataclasses.replace(
        settings,
        telemetry=dataclasses.replace(settings.telemetry, database=database),
        context=dataclasses.replace(settings.context, top_k=1),  # each file imports its neighbour
    )
    store = Store.open(database, settings.cache_dir)
    said: list[str] = []
    config = LoopConfig(
        name=name, base=str(base), repos=(repo,), captures=False, template="qwen25-coder-repo-fim",
        repo_samples=60, steps=3, minutes=None, heldout_samples=6, lr_decay=False,
        batch_tokens=2048, rank=4,
    )  # fmt: skip
    folder = registry.version_dir(settings.cache_dir, name)
    try:
        made = run_loop(config, loop_settings, store, said.append)
        manifest = json.loads((folder / "data" / "manifest.json").read_text())
        assert registry.get(store, name) == made
        # held-out samples the comparison does not score pick the tune's kept step
        tuned_run = json.loads((folder / "tune" / "tune.json").read_text())
        assert [step for step, _ in tuned_run["heldout_losses"]] == [0, 3]
        assert tuned_run["lr_decay"] is False  # the loop's recipe reaches the tune
        assert (tuned_run["batch_tokens"], tuned_run["rank"], tuned_run["alpha"]) == (2048, 4, 8)
        assert (made.base, made.kind, made.steps, made.quantization) == (
            str(base),
            "model",
            tuned_run["kept_step"],
            "Q4_K_M",
        )
        heldout = loop.drawn(read_samples(folder / "data" / "heldout.jsonl"), 6, 0)
        validation = read_samples(folder / "data" / "validation.jsonl")
        assert validation and tuned_run["heldout_samples"] == len(validation)
        assert not {s.sample_id for s in heldout} & {s.sample_id for s in validation}
        assert made.data_hash == manifest["hash"] and made.train_tokens > 0
        assert manifest["train_budgets"] == list(loop.TRAIN_BUDGETS)  # the default reaches export
        scores = json.loads(made.scores)
        assert scores["against"] == str(base) and scores["samples"] == 6
        # each as it would be served: the tuned model in its template, the base in the setting's
        assert scores["templates"] == {
            "base": f"{settings.context.template}@v1", "tuned": "qwen25-coder-repo-fim@v1"
        }  # fmt: skip
        assert made.template == "qwen25-coder-repo-fim"
        assert {"similarity", "exact"} <= scores.keys()
        assert resolve(name, settings.cache_dir, "gguf").path == folder / "model.gguf"
        assert (folder / "adapter.gguf").is_file() and (folder / "merged" / "config.json").is_file()
        stages = [line for line in said if line.endswith(" s") and ": done in " in line]
        assert [line.split(":")[0] for line in stages] == [
            "export", "base checkpoint", "tune", "quantize", "evaluate"
        ]  # fmt: skip
        # the base's scores are kept: a second run on the same held-out samples reuses them
        served = load_template(settings.context.template)
        base_gguf = str(folder / "base.gguf")
        kept = loop.kept_scores(loop_settings, served, base_gguf)
        monkeypatch.setattr(loop, "evaluate", lambda *_: pytest.fail("scored the base again"))
        again = loop.scores_once(loop_settings, served, base_gguf, heldout)
        assert [s.sample_id for s in again] == [s.sample_id for s in heldout]
        assert sum(s.similarity for s in again) / 6 == scores["similarity_means"]["base"]
        kept.unlink()
        tuned = loop.kept_scores(loop_settings, load_template(config.template), name)
        tuned.unlink()
        store.close()
        where = ["--set", f"database={database}"]
        assert main([*where, "models", "list"]) == 0
        listed = capsys.readouterr().out
        assert f"{name}\n  model tuned from {base}" in listed
        assert "template qwen25-coder-repo-fim," in listed
    finally:
        shutil.rmtree(folder, ignore_errors=True)


SAMPLE = Sample(
    "0" * 16, "repo", "a.py", "python", "line", 0, "p", "t", "", "", "", "", "shop", "a.py", ()
)


def test_a_bad_recipe_is_refused_before_any_data_is_read(tmp_path: Path, capsys) -> None:
    where = ["--set", f"database={tmp_path / 'telemetry.db'}"]
    argv = [*where, "loop", "--name", "bad", "--repo", str(tmp_path / "none"), "--no-captures"]
    assert main([*argv, "--batch-tokens", "0"]) == 2
    said = capsys.readouterr().err
    assert "ghostpen loop: batch_tokens and rank must be at least 1" in said
    assert "Traceback" not in said
    assert main([*argv, "--lr", "0"]) == 2
    assert "lr must be above 0: 0.0" in capsys.readouterr().err
    assert main([*argv, "--heldout", "1"]) == 2
    assert "heldout_samples must be at least 2" in capsys.readouterr().err
    assert main([*argv, "--train-context-tokens", "-1"]) == 2  # the prefix's default beside it
    assert "training prompt budgets must be at least 0: (256, -1)" in capsys.readouterr().err


def test_the_kept_steps_samples_are_unscored_and_from_unscored_files_first() -> None:
    def sample(number: int, file: str) -> Sample:
        return Sample(
            f"{number:016x}", "repo", file, "python", "line", 0, "p", "t", "", "", "", "",
            "shop", file, (),
        )  # fmt: skip

    samples = [sample(i, ["shop/a.py", "shop/b.py", "shop/c.py"][i % 3]) for i in range(30)]
    scored = loop.drawn([s for s in samples if s.file == "shop/a.py"], 4, 0)
    picked = loop.unscored(samples, scored, 22, 0)
    assert not {s.sample_id for s in scored} & {s.sample_id for s in picked}
    assert {s.file for s in picked[:20]} == {"shop/b.py", "shop/c.py"}  # none of theirs scored
    assert [s.file for s in picked[20:]] == ["shop/a.py"] * 2
    assert picked == loop.unscored(samples, scored, 22, 0)  # seeded


def test_a_larger_draw_holds_the_smaller_one() -> None:
    many = [dataclasses.replace(SAMPLE, sample_id=f"{n:016x}") for n in range(100)]
    assert set(loop.drawn(many, 20, 0)) < set(loop.drawn(many, 40, 0))


def test_a_larger_draw_scores_only_the_samples_it_adds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings.load({"cache_dir": str(tmp_path)})
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    served = load_template(settings.context.template)
    samples = [dataclasses.replace(SAMPLE, sample_id=f"{n:016x}", target=f"t{n}") for n in range(5)]
    asked: list[list[str]] = []

    def evaluate(
        settings: Settings, template: Template, model: str, chosen: list[Sample]
    ) -> list[Scored]:
        asked.append([s.sample_id for s in chosen])
        return [Scored(s.sample_id, s.target, 1.0, 1.0, 10, 5.0) for s in chosen]

    monkeypatch.setattr(loop, "evaluate", evaluate)
    first = loop.scores_once(settings, served, str(model), samples[:3])
    larger = loop.scores_once(settings, served, str(model), [samples[4], *samples[:3]])
    assert asked == [[s.sample_id for s in samples[:3]], [samples[4].sample_id]]
    assert [s.text for s in larger] == ["t4", "t0", "t1", "t2"]  # in the order asked
    assert larger[1:] == first
    assert loop.scores_once(settings, served, str(model), samples[1:2]) == first[1:2]
    assert len(asked) == 2


def test_scores_kept_under_other_serving_code_are_not_reused(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    served = load_template(settings.context.template)
    kept = loop.kept_scores(settings, served, str(model))
    assert loop.kept_scores(settings, served, str(model)) == kept
    monkeypatch.setattr(loop, "serving_code_hash", lambda: "post-processing changed")
    assert loop.kept_scores(settings, served, str(model)) != kept


class _Started(Exception):
    """Raised by the stand-in engine start: what it was started with is the test's answer."""


@pytest.mark.parametrize(("threads", "expected"), [(0, len(os.sched_getaffinity(0))), (1, 1)])
def test_scoring_runs_the_engine_on_every_core_unless_threads_is_set(
    monkeypatch: pytest.MonkeyPatch, threads: int, expected: int
) -> None:
    settings = Settings.load({})
    from ghostpen.server.engines import factory

    started = []

    async def start(engine_settings: EngineSettings, cache_dir: Path) -> None:
        started.append(engine_settings.threads)
        raise _Started

    monkeypatch.setattr(factory, "start_in_process", start)
    chosen = dataclasses.replace(
        settings, engine=dataclasses.replace(settings.engine, threads=threads)
    )
    with pytest.raises(_Started):
        loop.evaluate(chosen, load_template(settings.context.template), "any-model", [])
    assert started == [expected]


def test_scores_are_kept_by_the_threads_that_scored_them(tmp_path: Path) -> None:
    settings = Settings.load({"cache_dir": str(tmp_path)})
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    served = load_template(settings.context.template)

    def kept(threads: int) -> Path:
        chosen = dataclasses.replace(settings.engine, threads=threads)
        return loop.kept_scores(dataclasses.replace(settings, engine=chosen), served, str(model))

    cores = len(os.sched_getaffinity(0))
    assert kept(0) == kept(cores)  # the default is every core
    assert kept(cores + 1) != kept(cores)
