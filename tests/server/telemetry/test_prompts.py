"""Prompt templates as registered versions: an edit of any version becomes the next, immutable,
with its author, note and parent; names resolve to versions; a broken template is refused with
what is wrong; an experiment's arm can serve a registered version."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghostpen.cli import main
from ghostpen.context.prompt import Document, build_prompt
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import load_template, parse_template, to_toml
from ghostpen.server import experiments, prompts
from ghostpen.server.arms import _read
from ghostpen.server.errors import InvalidInput
from ghostpen.server.experiments import Arm
from ghostpen.server.telemetry.store import Store

PREFIX = load_template("generic-prefix")


def edited(body: str = "# {prefix}") -> str:
    return to_toml(PREFIX, {"body": body})


def test_built_in_templates_are_the_first_versions(store: Store) -> None:
    listed = {v.template.template_id: v for v in prompts.listed(store)}
    assert {"generic-prefix@v1", "qwen25-coder-repo-fim@v1"} <= set(listed)
    builtin = listed["generic-prefix@v1"]
    assert builtin.builtin and builtin.template == PREFIX  # the file's own hash
    again = parse_template(builtin.content)
    assert (again.body, again.stop, again.fim) == (PREFIX.body, PREFIX.stop, PREFIX.fim)


def test_an_edit_becomes_the_next_version_with_its_lineage(store: Store) -> None:
    made = prompts.new(store, "generic-prefix", "generic-prefix", edited(), "pm", "hash comment")
    assert made.template_id == "generic-prefix@v2" and made.body == "# {prefix}"
    assert prompts.resolve(store, "generic-prefix") == made  # the name is its latest
    assert prompts.resolve(store, "generic-prefix@v1") == PREFIX  # the built-in stays
    version = prompts.version(store, "generic-prefix@v2")
    assert (version.parent, version.author, version.note) == (
        "generic-prefix@v1",
        "pm",
        "hash comment",
    )
    # a new name starts at v1, whatever version its TOML says
    other = prompts.new(store, "shop", "generic-prefix@v2", edited("{prefix}"), "eng", "")
    assert other.template_id == "shop@v1"
    third = prompts.new(store, "generic-prefix", "shop@v1", edited("## {prefix}"), "pm", "")
    assert third.template_id == "generic-prefix@v3"
    assert prompts.resolve(store, "generic-prefix@v2") == made  # immutable
    change = prompts.diff(store, "generic-prefix@v1", "generic-prefix@v2")
    assert '-body = "{prefix}"' in change and '+body = "# {prefix}"' in change
    # and it builds the prompt it says
    document = Document("a.py", "python", "x = 1\n", 6)
    prompt = build_prompt("shop", document, (), made, ContextSettings())
    assert prompt.text.endswith("# x = 1\n")


@pytest.mark.parametrize(
    ("name", "parent", "content", "message"),
    [
        ("shop", "generic-prefix", "body = ", "not TOML"),
        ("shop", "generic-prefix", 'id = "x"\n', "a template needs version"),
        ("shop", "generic-prefix", edited("{prefix}{cursor}"), "not {cursor}"),
        ("shop", "generic-prefix", edited("{suffix}"), "body must hold {prefix}"),
        ("shop", "generic-prefix", edited("{prefix"), "body"),
        ("shop", "generic-prefix", to_toml(PREFIX, {"stop": [""]}), "non-empty strings"),
        ("shop", "nope", edited(), "no template named 'nope'"),
        ("shop", "generic-prefix@v9", edited(), "there are generic-prefix@v1"),
        ("Shop", "generic-prefix", edited(), "lowercase"),
        ("shop", "generic-prefix", edited("{prefix}" + "x" * 20_000), "the limit is 16384"),
    ],
)
def test_a_broken_template_is_refused_with_what_is_wrong(
    store: Store, name: str, parent: str, content: str, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        prompts.new(store, name, parent, content, "pm", "")
    assert [v for v in prompts.listed(store) if not v.builtin] == []


def test_an_arm_serves_a_registered_version(store: Store) -> None:
    prompts.new(store, "shop", "generic-prefix", edited(), "pm", "")
    arms = (Arm("a", 1), Arm("b", 1, template="shop"))
    experiments.start(store, "hashed", arms, "pm", {})
    running, default, templates = _read(store)
    assert running is not None and running.arms[1].template == "shop@v1"
    assert default is None and templates["shop@v1"].body == "# {prefix}"


def test_the_commands_show_edit_register_and_diff(tmp_path: Path, capsys) -> None:
    database = f"--set=database={tmp_path / 't.db'}"
    assert main([database, "prompts", "show", "generic-prefix"]) == 0
    shown = capsys.readouterr().out
    changed = tmp_path / "edited.toml"
    changed.write_text(shown.replace('body = "{prefix}"', 'body = "# {prefix}"'))
    assert main([database, "prompts", "new", "generic-prefix", "--from", "generic-prefix@v1",
                 "--file", str(changed), "--note", "hashes", "--by", "pm"]) == 0  # fmt: skip
    assert "registered generic-prefix@v2" in capsys.readouterr().out
    assert main([database, "prompts", "list"]) == 0
    assert "generic-prefix@v2" in capsys.readouterr().out
    assert main([database, "prompts", "diff", "generic-prefix@v1", "generic-prefix"]) == 0
    assert '+body = "# {prefix}"' in capsys.readouterr().out
    assert main([database, "prompts", "show", "generic-prefix@v7"]) == 2
    assert "no template 'generic-prefix@v7'" in capsys.readouterr().err
