"""The model registry: lineage recorded, versions served by name, and promotion only with a
held-out comparison whose interval excludes zero, unless forced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ghostpen.cli import _promoted, main
from ghostpen.server import model_store
from ghostpen.server.errors import ModelError
from ghostpen.server.settings import Settings
from ghostpen.server.telemetry.store import Store
from ghostpen.server.training import registry

BUILT_IN = "qwen2.5-coder-0.5b-instruct-q4_k_m"


def scores(low: float, high: float, exact_high: float = 0.1) -> str:
    return json.dumps(
        {
            "against": BUILT_IN,
            "samples": 100,
            "similarity": {"mean": (low + high) / 2, "low": low, "high": high, "tasks": 100},
            "exact": {"mean": 0.0, "low": -0.1, "high": exact_high, "tasks": 100},
        }
    )


def version(
    name: str, similarity: tuple[float, float], exact_high: float = 0.1, template: str = ""
) -> registry.Version:
    return registry.Version(
        name, "model", BUILT_IN, f"/m/{name}/model.gguf", "d" * 64, 120, 1_000_000, "Q4_K_M",
        scores(*similarity, exact_high), 1_790_000_000_000, "first", template,
    )  # fmt: skip


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Settings, list[str]]:
    database = str(tmp_path / "telemetry.db")
    store = Store.open(database, tmp_path)
    registry.register(store, version("better", (0.01, 0.05), template="qwen25-coder-repo-fim"))
    registry.register(store, version("unsure", (-0.01, 0.05)))
    registry.register(store, version("worse-exact", (0.01, 0.05), exact_high=-0.01))
    store.close()
    where = ["--set", f"database={database}", "--set", f"cache_dir={tmp_path}"]
    return Settings.load({"database": database, "cache_dir": str(tmp_path)}, environ={}), where


def test_the_registry_keeps_lineage_and_refuses_a_second_of_a_name(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "t.db"), tmp_path)
    registry.register(store, version("shop-1", (0.01, 0.05)))
    assert registry.get(store, "shop-1") == version("shop-1", (0.01, 0.05))
    with pytest.raises(ModelError, match="registered already"):
        registry.register(store, version("shop-1", (0.01, 0.05)))
    with pytest.raises(ModelError, match="a version name"):
        registry.register(store, version("Bad Name", (0.01, 0.05)))
    with pytest.raises(ModelError, match="not a built-in"):
        registry.version_dir(tmp_path, BUILT_IN)
    assert [v.name for v in registry.versions(store)] == ["shop-1"]
    store.close()


def test_promotion_needs_evidence_unless_forced(setup, capsys) -> None:
    settings, where = setup
    assert main([*where, "models", "promote", "unsure", "--by", "pm"]) == 1
    assert "not shown better" in capsys.readouterr().err
    assert main([*where, "models", "promote", "worse-exact", "--by", "pm"]) == 1
    assert "exact match is worse" in capsys.readouterr().err
    assert main([*where, "models", "promote", "better", "--by", "pm"]) == 0
    store = Store.open(settings.telemetry.database, settings.cache_dir)
    [promotion] = registry.promotions(store)
    assert (promotion.name, promotion.by_user, promotion.forced) == ("better", "pm", False)
    assert json.loads(promotion.evidence)["similarity"]["low"] == 0.01
    assert registry.default(store) == "better"
    store.close()
    served = _promoted(settings)  # what `ghostpen serve` serves now: in the version's template
    assert (served.engine.model, served.context.template) == ("better", "qwen25-coder-repo-fim")
    explicit = Settings.load({**dict(a.split("=", 1) for a in where[1::2]), "model": "x.gguf"})
    assert explicit.engine.model == "x.gguf"


def test_a_forced_promotion_is_recorded_as_forced(setup, capsys) -> None:
    settings, where = setup
    assert main([*where, "models", "promote", "unsure", "--force", "--by", "lead"]) == 0
    assert "forced" in capsys.readouterr().out
    store = Store.open(settings.telemetry.database, settings.cache_dir)
    assert registry.promotions(store)[-1].forced
    store.close()
    main([*where, "models", "list"])
    listed = capsys.readouterr().out
    assert "unsure  (default)" in listed and "better\n" in listed
    assert "held out vs qwen2.5-coder-0.5b-instruct-q4_k_m (100 samples)" in listed
    assert "template qwen25-coder-repo-fim," in listed and "template generic-prefix," in listed
    store = Store.open(settings.telemetry.database, settings.cache_dir)
    assert _promoted(settings).context.template == "generic-prefix"  # unsure: the setting's
    store.close()


def test_a_version_is_served_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "tuned" / "shop-1"
    (folder / model_store.TUNED_HF).mkdir(parents=True)
    (folder / model_store.TUNED_GGUF).write_bytes(b"GGUF")
    resolved = model_store.resolve("shop-1", tmp_path, want="gguf")
    assert (resolved.model_id, resolved.path) == ("shop-1", folder / "model.gguf")
    assert model_store.resolve("shop-1", tmp_path, want="hf").path == folder / "merged"
    with pytest.raises(ModelError, match="neither a registry name"):
        model_store.resolve("shop-2", tmp_path, want="gguf")
