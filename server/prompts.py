"""Prompt templates as registered versions: immutable, each with its author, note and parent.

The files in context/templates/ are the built-in versions; a new version (an edit of any
version, under its name or a new one) is registered in the telemetry database, in the same TOML,
numbered after the last version of its name. A template is named `name@vN`, or `name` for its
latest version. The server, the evaluation and experiments' arms resolve names here.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass

from ghostpen.context.template import (
    Template,
    available_templates,
    load_template,
    parse_template,
    to_toml,
)
from ghostpen.server.errors import InvalidInput
from ghostpen.server.telemetry.store import Store

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
REFERENCE = re.compile(r"(?P<name>[a-z0-9][a-z0-9._-]{0,63})(?:@v(?P<version>[0-9]+))?")
MAX_TEMPLATE_CHARS = 16_384


@dataclass(frozen=True)
class PromptVersion:
    template: Template
    content: str  # its TOML
    parent: str  # the template_id it was made from; "" for a built-in
    author: str
    note: str
    created_ms: int  # 0 for a built-in

    @property
    def builtin(self) -> bool:
        return not self.created_ms


def resolve(store: Store, reference: str) -> Template:
    return version(store, reference).template


def version(store: Store, reference: str) -> PromptVersion:
    """`name@vN`, or `name` for its latest; InvalidInput naming what exists."""
    match = REFERENCE.fullmatch(reference)
    if match is None:
        raise InvalidInput(f"{reference!r} is not a template name (name or name@vN)")
    name, wanted = match["name"], match["version"]
    versions = [v for v in listed(store) if v.template.name == name]
    if not versions:
        raise InvalidInput(f"no template named {name!r}; see `ghostpen prompts list`")
    if wanted is None:
        return versions[-1]
    found = next((v for v in versions if v.template.version == int(wanted)), None)
    if found is None:
        have = ", ".join(v.template.template_id for v in versions)
        raise InvalidInput(f"no template {reference!r} (there are {have})")
    return found


def listed(store: Store) -> list[PromptVersion]:
    """Every version, built-in first, by name and version."""
    builtin = [
        PromptVersion(load_template(n), to_toml(load_template(n)), "", "", "built-in", 0)
        for n in available_templates()
    ]
    rows = store.query(
        "SELECT content, parent, author, note, created_ms FROM prompt_versions "
        "ORDER BY name, version"
    )
    registered = [
        PromptVersion(parse_template(content), content, parent, author, note, created_ms)
        for content, parent, author, note, created_ms in rows
    ]
    return sorted(builtin + registered, key=lambda v: (v.template.name, v.template.version))


def new(store: Store, name: str, parent: str, content: str, author: str, note: str) -> Template:
    """Register `content` (TOML, as `ghostpen prompts show` prints it) as the next version of
    `name`, made from `parent`. Its id and version are set here."""
    if not NAME.fullmatch(name):
        raise InvalidInput(f"template name {name!r}: lowercase letters, digits, . _ -")
    draft = checked(content)
    origin = resolve(store, parent)
    existing = [v.template.version for v in listed(store) if v.template.name == name]
    numbered = to_toml(draft, {"id": name, "version": max(existing, default=0) + 1})
    template = parse_template(numbered)
    store.execute(  # two making one version at once: the second fails on the primary key
        "INSERT INTO prompt_versions (name, version, content, content_hash, parent, author, "
        "note, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (name, template.version, numbered, template.content_hash, origin.template_id,
         author, note, int(time.time() * 1000)),
    )  # fmt: skip
    return template


def checked(content: str) -> Template:
    """A draft template (TOML), parsed; InvalidInput saying what is wrong with it."""
    if len(content) > MAX_TEMPLATE_CHARS:
        raise InvalidInput(
            f"the template has {len(content)} characters; the limit is {MAX_TEMPLATE_CHARS}"
        )
    try:
        return parse_template(content)
    except ValueError as error:
        raise InvalidInput(f"the template: {error}") from None


def diff(store: Store, before: str, after: str) -> str:
    """A unified diff of two versions' TOML."""
    a, b = version(store, before), version(store, after)
    return "".join(
        difflib.unified_diff(
            a.content.splitlines(keepends=True),
            b.content.splitlines(keepends=True),
            a.template.template_id,
            b.template.template_id,
        )
    )
