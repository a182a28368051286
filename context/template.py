"""Prompt templates: versioned TOML files whose id and content hash travel with each completion."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Template:
    name: str
    version: int
    content_hash: str  # sha256 of the file, first 12 hex digits: changes with any edit
    fim: bool
    repo_header: str
    context_file: str
    current_file: str
    body: str
    stop: tuple[str, ...]

    @property
    def template_id(self) -> str:
        return f"{self.name}@v{self.version}"


def available_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATE_DIR.glob("*.toml"))


@cache
def load_template(name: str) -> Template:
    path = TEMPLATE_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(
            f"unknown prompt template {name!r}; available: {', '.join(available_templates())}"
        )
    raw = path.read_bytes()
    fields = tomllib.loads(raw.decode("utf-8"))
    if fields["id"] != name:
        raise ValueError(f"template file {path.name} declares id {fields['id']!r}")
    return Template(
        name=name,
        version=int(fields["version"]),
        content_hash=hashlib.sha256(raw).hexdigest()[:12],
        fim=bool(fields["fim"]),
        repo_header=fields["repo_header"],
        context_file=fields["context_file"],
        current_file=fields["current_file"],
        body=fields["body"],
        stop=tuple(fields["stop"]),
    )
