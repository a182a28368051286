"""The model registry: every version the flywheel made, with its lineage, and which one is the
default. Records live in the telemetry database (SQLite or PostgreSQL); the files of a version in
`models/tuned/<name>/` of the cache, where `model_store.resolve` serves them by name.

A version is promoted to the default only with evidence: a paired comparison against the current
default on held-out samples whose 95% interval excludes zero, unless forced. `ghostpen serve`
serves the default when no model is set.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path

from ghostpen.server.errors import ModelError
from ghostpen.server.model_store import REGISTRY, models_dir
from ghostpen.server.telemetry.store import Store

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
KINDS = ("model", "adapter")  # a merged, quantized model; or a LoRA on its base


@dataclass(frozen=True)
class Version:
    name: str
    kind: str
    base: str  # the model it was tuned from: a built-in or another version
    path: str  # the GGUF that llama.cpp serves (the model, or the adapter)
    data_hash: str  # the training data's manifest hash (server/training/export.py)
    steps: int
    train_tokens: int
    quantization: str  # Q4_K_M, f16 (an adapter)...
    scores: str  # JSON: the held-out comparison against its base, as `heldout.compare` gives
    created_ms: int
    note: str = ""
    template: str = ""  # the prompt template it was tuned in and is served in; "": the setting's


_COLUMNS = [f.name for f in fields(Version)]


@dataclass(frozen=True)
class Promotion:
    promoted_ms: int
    name: str
    by_user: str
    forced: bool
    evidence: str  # JSON: the comparison it was promoted on


def version_dir(cache_dir: Path, name: str) -> Path:
    """Where a version's files go, before it is registered."""
    check_name(name)
    return models_dir(cache_dir) / "tuned" / name


def check_name(name: str) -> None:
    if not NAME.fullmatch(name) or name in REGISTRY:
        raise ModelError(
            f"a version name is 1-64 of a-z, 0-9, '.', '_', '-' and not a built-in model: {name!r}"
        )


def register(store: Store, version: Version) -> None:
    check_name(version.name)
    if version.kind not in KINDS:
        raise ModelError(f"a version is one of {', '.join(KINDS)}: {version.kind!r}")
    if get(store, version.name) is not None:
        raise ModelError(f"version {version.name!r} is registered already; choose another name")
    marks = ", ".join("?" * len(_COLUMNS))
    values = [getattr(version, column) for column in _COLUMNS]
    store.execute(f"INSERT INTO model_versions ({', '.join(_COLUMNS)}) VALUES ({marks})", values)


def get(store: Store, name: str) -> Version | None:
    rows = store.query(f"SELECT {', '.join(_COLUMNS)} FROM model_versions WHERE name = ?", (name,))
    return Version(*rows[0]) if rows else None


def versions(store: Store) -> list[Version]:
    rows = store.query(f"SELECT {', '.join(_COLUMNS)} FROM model_versions ORDER BY created_ms")
    return [Version(*row) for row in rows]


def template_of(store: Store, model: str, setting: str) -> str:
    """The template `model` is served in: the one a version was tuned in, else `setting`."""
    version = get(store, model)
    return version.template if version is not None and version.template else setting


def promote(store: Store, name: str, by_user: str, forced: bool, evidence: dict) -> Promotion:
    """Record `name` as the default. The caller has weighed the evidence (`decide`)."""
    if name not in REGISTRY and get(store, name) is None:
        raise ModelError(f"no model or version named {name!r}; see `ghostpen models list`")
    promotion = Promotion(int(time.time() * 1000), name, by_user, forced, json.dumps(evidence))
    store.execute(
        "INSERT INTO model_promotions (promoted_ms, name, by_user, forced, evidence) "
        "VALUES (?, ?, ?, ?, ?)",
        (promotion.promoted_ms, name, by_user, int(forced), promotion.evidence),
    )
    return promotion


def promotions(store: Store) -> list[Promotion]:
    rows = store.query(
        "SELECT promoted_ms, name, by_user, forced, evidence FROM model_promotions "
        "ORDER BY promoted_ms"
    )
    return [Promotion(when, name, by, bool(forced), why) for when, name, by, forced, why in rows]


def default(store: Store) -> str | None:
    """The last version promoted, if any."""
    history = promotions(store)
    return history[-1].name if history else None


def decide(comparison: dict[str, dict[str, float]]) -> str:
    """ "" when the comparison shows the candidate better (its edit-similarity interval above
    zero, exact match not shown worse); else why not."""
    similarity, exact = comparison["similarity"], comparison["exact"]
    if similarity["low"] <= 0:
        return (
            f"edit similarity {similarity['mean']:+.3f} (95% CI {similarity['low']:+.3f} to "
            f"{similarity['high']:+.3f}) is not shown better"
        )
    if exact["high"] < 0:
        return f"exact match is worse: {exact['mean']:+.3f} (95% CI up to {exact['high']:+.3f})"
    return ""
