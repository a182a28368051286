"""The offline model registry: verification refuses anything but the pinned file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ghostpen.server import model_store
from ghostpen.server.errors import ModelError
from ghostpen.server.model_store import (
    REGISTRY,
    RegistryModel,
    models_dir,
    resolve,
    sha256_of,
    verify,
)
from ghostpen.server.settings import Settings

DEFAULT = REGISTRY["qwen2.5-coder-0.5b-instruct-q4_k_m"]


def test_the_fetched_default_model_verifies(settings: Settings) -> None:
    path = models_dir(settings.cache_dir) / DEFAULT.filename
    verify(DEFAULT, path)
    resolved = resolve(DEFAULT.name, settings.cache_dir, want="gguf")
    assert (resolved.path, resolved.kind, resolved.model_id) == (path, "gguf", DEFAULT.name)


def test_a_file_of_the_right_size_but_wrong_content_is_refused(tmp_path: Path) -> None:
    model = RegistryModel("m", "m.gguf", "0" * 64, 1000, (), "test")
    path = tmp_path / "m.gguf"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(ModelError, match="refusing to serve it"):
        verify(model, path)
    path.write_bytes(b"\0" * 999)
    with pytest.raises(ModelError, match="expected 1000"):
        verify(model, path)
    path.unlink()
    with pytest.raises(ModelError, match="ghostpen models fetch m"):
        verify(model, path)


def test_a_verified_file_is_not_hashed_again_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = b"weights" * 100
    model = RegistryModel("m", "m.gguf", hashlib.sha256(content).hexdigest(), 700, (), "test")
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    os.utime(path, (1e9, 1e9))  # written long ago; a file written just now is hashed every time
    hashed = []
    monkeypatch.setattr(model_store, "sha256_of", lambda p: hashed.append(p) or sha256_of(p))
    verify(model, path)
    verify(model, path)
    assert hashed == [path]  # the second start trusts the record
    path.write_bytes(b"X" * 700)  # same size, other bytes, a new modification time
    with pytest.raises(ModelError, match="refusing to serve it"):
        verify(model, path)
    assert len(hashed) == 2


def test_resolve_explains_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="ghostpen models convert"):
        resolve(DEFAULT.name, tmp_path, want="hf")
    with pytest.raises(ModelError, match="neither a registry name"):
        resolve(str(tmp_path / "missing.bin"), tmp_path, want="gguf")
    gguf = tmp_path / "local.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf), tmp_path, want="gguf").model_id == "local"
    with pytest.raises(ModelError, match="engine reads hf"):
        resolve(str(gguf), tmp_path, want="hf")


def test_serve_refuses_a_tampered_default_model(tmp_path: Path) -> None:
    target = models_dir(tmp_path) / DEFAULT.filename
    target.parent.mkdir(parents=True)
    with target.open("wb") as handle:  # sparse: the right size, the wrong bytes
        handle.truncate(DEFAULT.size)
    result = subprocess.run(
        [sys.executable, "-m", "ghostpen", "serve", "--engine", "llama.cpp", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GHOSTPEN_HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "refusing to serve it" in result.stderr
