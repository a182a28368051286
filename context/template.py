"""Prompt templates: versioned TOML whose id and content hash travel with each completion. The
files here are the built-in ones; more versions are registered in the database
(server/prompts.py), in the same TOML."""

from __future__ import annotations

import hashlib
import json
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEXT_FIELDS = ("repo_header", "context_file", "current_file", "body")
PLACEHOLDERS = {  # what each text may hold; a placeholder outside these is refused
    "repo_header": {"repo"},
    "context_file": {"comment", "path", "text"},
    "current_file": {"comment", "path"},
    "body": {"prefix", "suffix"},
}


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
    """A built-in template, by its name."""
    path = TEMPLATE_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(
            f"unknown prompt template {name!r}; available: {', '.join(available_templates())}"
        )
    raw = path.read_bytes()
    template = parse_template(raw.decode("utf-8"))
    if template.name != name:
        raise ValueError(f"template file {path.name} declares id {template.name!r}")
    return template


def parse_template(text: str) -> Template:
    """A template from its TOML; ValueError naming what is missing or wrong."""
    try:
        fields: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"not TOML: {error}") from None
    missing = [k for k in ("id", "version", "fim", *TEXT_FIELDS, "stop") if k not in fields]
    if missing:
        raise ValueError(f"a template needs {', '.join(missing)}")
    for name in TEXT_FIELDS:
        _check_placeholders(name, fields[name])
    if "{prefix}" not in fields["body"]:
        raise ValueError("body must hold {prefix}")
    stop = fields["stop"]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("stop must be a list of non-empty strings")
    return Template(
        name=str(fields["id"]),
        version=int(fields["version"]),
        content_hash=hashlib.sha256(text.encode("utf-8")).hexdigest()[:12],
        fim=bool(fields["fim"]),
        repo_header=fields["repo_header"],
        context_file=fields["context_file"],
        current_file=fields["current_file"],
        body=fields["body"],
        stop=tuple(stop),
    )


def to_toml(template: Template, changes: Mapping[str, Any] = {}) -> str:
    """The template's TOML (with `changes` to its fields), as `parse_template` reads it."""
    fields: dict[str, Any] = {
        "id": template.name,
        "version": template.version,
        "fim": template.fim,
        **{name: getattr(template, name) for name in TEXT_FIELDS},
        "stop": list(template.stop),
        **changes,
    }
    lines = []
    for key, value in fields.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:  # a JSON string or list of strings is a TOML one
            lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def _check_placeholders(name: str, text: object) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string")
    try:
        used = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    unknown = used - PLACEHOLDERS[name]
    if unknown:
        allowed = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS[name]))
        raise ValueError(f"{name} may hold {allowed}, not {{{sorted(unknown)[0]}}}")
