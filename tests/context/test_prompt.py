import dataclasses
import itertools

import pytest

from ghostpen.context.chunker import Chunk, chunk_file
from ghostpen.context.prompt import Document, build_prompt, fitted
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import available_templates, load_template

SETTINGS = ContextSettings()
QWEN = load_template("qwen25-coder-repo-fim")


def numbered_file(lines: int) -> str:
    return "\n".join(f"value_{i} = compute({i})" for i in range(lines))


def test_fim_layout_puts_stable_text_first() -> None:
    other = Chunk.of("util.py", 0, 2, "def compute(x):\n    return x * 2")
    doc = Document("main.py", "python", "a = compute(1)\nb = \nprint(b)\n", cursor=19)
    prompt = build_prompt("demo", doc, [other], QWEN, SETTINGS)
    assert prompt.text == (
        "<|repo_name|>demo\n"
        "<|file_sep|>util.py\ndef compute(x):\n    return x * 2\n"
        "<|file_sep|>main.py\n"
        "<|fim_prefix|>a = compute(1)\nb =<|fim_suffix|>\nprint(b)\n<|fim_middle|>"
    )
    assert prompt.healed == " "  # the typed space: the model writes it with its first token


def test_a_cursor_after_indentation_ends_the_prompt_at_the_newline() -> None:
    doc = Document("main.py", "python", "def f(x):\n    \nprint(f(1))\n", cursor=14)
    prompt = build_prompt("demo", doc, [], QWEN, SETTINGS)
    assert prompt.healed == "    "
    assert "<|fim_prefix|>def f(x):\n<|fim_suffix|>\nprint(f(1))\n<|fim_middle|>" in prompt.text
    kept = build_prompt("demo", doc, [], QWEN, dataclasses.replace(SETTINGS, heal_blanks=False))
    assert kept.healed == "" and "def f(x):\n    <|fim_suffix|>" in kept.text
    typed = Document("main.py", "python", "def f(x):\n    re\n", cursor=16)
    assert build_prompt("demo", typed, [], QWEN, SETTINGS).healed == ""
    # a typed space is left out too: the model writes " x", not "x" after a split token
    spaced = Document("main.py", "python", "def f(x):\n    return \n", cursor=21)
    prompt = build_prompt("demo", spaced, [], QWEN, SETTINGS)
    assert prompt.healed == " " and "    return<|fim_suffix|>" in prompt.text


def test_budgets_are_respected_in_estimated_tokens() -> None:
    settings = dataclasses.replace(
        SETTINGS, prefix_token_budget=100, suffix_token_budget=30, context_token_budget=60
    )
    text = numbered_file(400)
    cursor = text.index("value_300")
    chunks = list(chunk_file("other.py", "python", numbered_file(300), 3).chunks)
    prompt = build_prompt("r", Document("f.py", "python", text, cursor), chunks, QWEN, settings)
    prefix = prompt.text.split("<|fim_prefix|>")[1].split("<|fim_suffix|>")[0]
    suffix = prompt.text.split("<|fim_suffix|>")[1].split("<|fim_middle|>")[0]
    assert settings.tokens(prefix) <= 100
    assert settings.tokens(suffix) <= 30
    assert prompt.context
    assert sum(settings.tokens(r.chunk.text) + 8 for r in prompt.context) <= 60
    assert text[:cursor].endswith(prefix) and text[cursor:].startswith(suffix)


def test_prefix_window_start_is_anchored_so_keystrokes_share_the_prompt_start() -> None:
    settings = dataclasses.replace(SETTINGS, prefix_token_budget=400, prefix_anchor_lines=16)
    text = numbered_file(300) + "\n"
    typed = "".join(f"extra_{i} = compute({i})\n" for i in range(10))
    prompts = [
        build_prompt(
            "r", Document("f.py", "python", text + typed[:n], len(text) + n), [], QWEN, settings
        )
        for n in range(len(typed))
    ]
    starts = [p.prefix_start_line for p in prompts]
    assert all(start % 16 == 0 for start in starts)
    # Ten lines typed move an unanchored window ten times; the anchored one moves at most once.
    assert len(set(starts)) <= 2
    for before, after in itertools.pairwise(prompts):
        if before.prefix_start_line == after.prefix_start_line:
            assert after.text.startswith(before.text[: before.text.index("<|fim_suffix|>")])


def test_chunks_overlapping_the_prompt_window_are_not_repeated_as_context() -> None:
    text = numbered_file(20)
    doc = Document("f.py", "python", text, text.index("value_18"))
    chunks = chunk_file("f.py", "python", text, 8).chunks
    prompt = build_prompt("r", doc, chunks, QWEN, SETTINGS)
    assert prompt.context == ()  # the whole file fits in the window already


def test_braces_and_placeholders_in_code_are_kept_verbatim() -> None:
    other = Chunk.of("t.py", 0, 1, "fmt = '{prefix} {path} {}'")
    doc = Document("m.py", "python", "x = '{suffix}'\nfmt = '{", 23)
    prompt = build_prompt("r", doc, [other], QWEN, SETTINGS)
    assert "fmt = '{prefix} {path} {}'" in prompt.text
    assert "<|fim_prefix|>x = '{suffix}'\nfmt = '{<|fim_suffix|>" in prompt.text


def test_generic_template_has_no_fim_tokens_and_labels_context() -> None:
    template = load_template("generic-prefix")
    other = Chunk.of("lib.rs", 0, 1, "fn helper() {}")
    doc = Document("main.rs", "rust", "fn main() {\n    hel\n}\n", 19)
    prompt = build_prompt("r", doc, [other], template, SETTINGS)
    assert (
        prompt.text == "// Path: lib.rs\nfn helper() {}\n\n// Path: main.rs\nfn main() {\n    hel"
    )
    assert not template.fim


def test_template_ids_and_hashes_are_stable_and_distinct() -> None:
    names = available_templates()
    assert {"qwen25-coder-repo-fim", "generic-prefix"} <= set(names)
    loaded = [load_template(name) for name in names]
    assert len({t.content_hash for t in loaded}) == len(loaded)
    assert QWEN.template_id == "qwen25-coder-repo-fim@v1"
    assert len(QWEN.content_hash) == 12
    load_template.cache_clear()
    assert load_template("qwen25-coder-repo-fim").content_hash == QWEN.content_hash


def test_unknown_template_names_the_ones_there_are() -> None:
    with pytest.raises(ValueError, match="generic-prefix"):
        load_template("nope")


def test_last_context_stays_unless_clearly_beaten() -> None:
    settings = dataclasses.replace(SETTINGS, top_k=1, context_stickiness=0.2)
    held = Chunk.of("a.py", 0, 1, "def load_user(user_id): return db.get(user_id)")
    close = Chunk.of("b.py", 0, 1, "def load_users(user_id): return db.get(user_id)")
    text = "def load_users(user_id):"
    doc = Document("m.py", "python", text, len(text))
    fresh = build_prompt("r", doc, [held, close], QWEN, settings)
    assert [r.chunk for r in fresh.context] == [close]
    sticky = build_prompt("r", doc, [held, close], QWEN, settings, previous=[held])
    assert [r.chunk for r in sticky.context] == [held]
    unrelated = Chunk.of("c.py", 0, 1, "SELECT 1")
    beaten = build_prompt("r", doc, [unrelated, close], QWEN, settings, previous=[unrelated])
    assert [r.chunk for r in beaten.context] == [close]


def test_a_newly_chosen_chunk_goes_after_the_kept_ones_so_the_prompt_start_stays() -> None:
    settings = dataclasses.replace(SETTINGS, top_k=3, context_stickiness=0.0)
    kept = [
        Chunk.of("b.py", 0, 1, "def save_user(user): return db.put(user)"),
        Chunk.of("c.py", 0, 1, "def load_user(user_id): return db.get(user_id)"),
    ]
    gone = Chunk.of("d.py", 0, 1, "def load_users(ids): return [db.get(i) for i in ids]")
    new = Chunk.of("a.py", 0, 1, "def load_user_ids(user_id): return db.get(user_id)")
    text = "def load_user(user_id):\n    return db.get(user_id)\n"
    doc = Document("m.py", "python", text, len(text))
    before = build_prompt("r", doc, [*kept, gone], QWEN, settings)
    assert [r.chunk for r in before.context] == [*kept, gone]  # fresh: file and line order
    after = build_prompt(
        "r", doc, [new, *kept], QWEN, settings, previous=[r.chunk for r in before.context]
    )
    # a.py sorts first, yet goes last: the text of the kept chunks stays where it was.
    assert [r.chunk for r in after.context] == [*kept, new]
    start = before.text[: before.text.index("<|file_sep|>d.py")]
    assert after.text.startswith(start)
    assert after.text.index("a.py") > after.text.index("c.py")


def test_consecutive_chunks_of_one_file_share_a_section() -> None:
    settings = dataclasses.replace(SETTINGS, top_k=3)
    first = Chunk.of("u.py", 0, 1, "def load_user(user_id): return db.get(user_id)")
    second = Chunk.of("u.py", 5, 6, "def load_users(ids): return [load_user(i) for i in ids]")
    text = "def load_user(user_id):\n"
    doc = Document("m.py", "python", text, len(text))
    prompt = build_prompt("r", doc, [second, first], QWEN, settings)
    assert prompt.text.count("<|file_sep|>u.py") == 1
    assert prompt.text.index("db.get(user_id)") < prompt.text.index("load_user(i)")
    # lines 1-4 are not in the prompt: the section says so between the two
    assert "db.get(user_id)\n# ...\ndef load_users" in prompt.text
    adjacent = Chunk.of("u.py", 1, 2, "def save_user(user): db.put(user)")
    prompt = build_prompt("r", doc, [adjacent, first], QWEN, settings)
    assert "db.get(user_id)\ndef save_user" in prompt.text


def test_selective_retrieval_leaves_out_chunks_too_unlike_the_query() -> None:
    alike = Chunk.of("u.py", 0, 1, "total = sum(price for price in prices)")
    unlike = Chunk.of("v.py", 0, 1, "class Config: pass")
    doc = Document("m.py", "python", "total = sum(price for price in ", 31)
    everything = build_prompt("r", doc, [alike, unlike], QWEN, SETTINGS)
    assert {r.chunk for r in everything.context} == {alike, unlike}
    selective = dataclasses.replace(SETTINGS, context_min_similarity=0.5)
    prompt = build_prompt("r", doc, [alike, unlike], QWEN, selective)
    assert [r.chunk for r in prompt.context] == [alike] and "v.py" not in prompt.text
    nothing = build_prompt("r", doc, [unlike], QWEN, selective)
    assert nothing.context == () and nothing.text.count("<|file_sep|>") == 1  # its own file


def test_a_prompt_the_engine_counts_too_long_loses_its_last_chunks_then_its_oldest_lines() -> None:
    text = numbered_file(400)
    cursor = text.index("value_300")
    document = Document("f.py", "python", text, cursor)
    chunks = list(chunk_file("other.py", "python", numbered_file(300), 3).chunks)
    prompt = build_prompt("r", document, chunks, QWEN, SETTINGS)
    assert len(prompt.context) > 2
    # counted at twice its estimate, half of it must go: first context, then the oldest lines
    tokens = 2 * prompt.estimated_tokens
    few = fitted(prompt, document, tokens, tokens - 40)
    assert few.prefix == prompt.prefix and 0 < len(few.context) < len(prompt.context)
    assert few.context == prompt.context[: len(few.context)]  # the stable start stays
    half = fitted(prompt, document, tokens, tokens // 2)
    assert len(half.text) <= 0.9 * len(prompt.text) / 2 and half.context == ()
    assert prompt.prefix.endswith(half.prefix) and half.prefix.startswith("value_")
    dropped = prompt.prefix[: -len(half.prefix)].count("\n")
    assert half.prefix_start_line == prompt.prefix_start_line + dropped
    assert half.text.endswith(prompt.text[-200:])  # the cursor's text and the suffix
