import pytest

from ghostpen.context.postprocess import CursorSurroundings, Finish, Mode, Truncator, resolve_mode

STOP = ("<|endoftext|>", "<|file_sep|>")


def run(prefix: str, suffix: str, mode: Mode, pieces: list[str]) -> tuple[str, Finish, list[str]]:
    truncator = Truncator(CursorSurroundings.around(prefix, suffix, mode, STOP))
    shown = []
    for piece in pieces:
        shown.append(truncator.feed(piece))
        if truncator.finish is not None:
            break
    rest, finish = truncator.close(Finish.STOP)
    shown.append(rest)
    return "".join(shown), finish, shown


def stream(text: str) -> list[str]:
    return [text[i : i + 3] for i in range(0, len(text), 3)]


@pytest.mark.parametrize(
    ("prefix", "suffix", "mode", "generated", "expected", "finish"),
    [
        # single line: stops at the end of the line
        ("x = ", "\n", Mode.SINGLE_LINE, "compute(1)\ny = 2\n", "compute(1)", Finish.LINE_END),
        # the model repeats what follows the cursor on the line: trimmed
        ("print(", ")\n", Mode.SINGLE_LINE, "total)", "total", Finish.SUFFIX_OVERLAP),
        # a stop string of the template ends it
        ("x = ", "", Mode.MULTI_LINE, "1<|endoftext|>junk", "1", Finish.STOP),
        # multi-line: a dedent below the cursor line ends the block
        (
            "def f(x):\n    ",
            "\n",
            Mode.MULTI_LINE,
            "y = x + 1\n    return y\n\ndef g():\n    pass\n",
            "y = x + 1\n    return y",
            Finish.BLOCK_END,
        ),
        # on a line of only indentation: the enclosing block, a nested block and what follows
        (
            "def f(n):\n    ",
            "\n",
            Mode.MULTI_LINE,
            "if n == 0:\n        return []\n    return [n]\n\ndef g():\n    pass\n",
            "if n == 0:\n        return []\n    return [n]",
            Finish.BLOCK_END,
        ),
        (
            "function f(n) {\n  ",
            "\n}\n",
            Mode.MULTI_LINE,
            "if (n) {\n    return 1;\n  }\n  return 0;\n}\n\nfunction g() {}\n",
            "if (n) {\n    return 1;\n  }\n  return 0;",
            Finish.BLOCK_END,
        ),
        # multi-line after a block opener: the body, then back at the opener's level ends it
        (
            "    if ready:",
            "\n",
            Mode.MULTI_LINE,
            "\n        go()\n        stop()\n    else:\n        wait()\n",
            "\n        go()\n        stop()",
            Finish.BLOCK_END,
        ),
        # a closing brace at the block's level is kept as its last line
        (
            "function f() {",
            "\n",
            Mode.MULTI_LINE,
            "\n  return 1;\n}\n\nfunction g() {}\n",
            "\n  return 1;\n}",
            Finish.BLOCK_END,
        ),
        # the model starts writing the line that already follows the cursor
        (
            "def f():\n    ",
            "\n    return result\n",
            Mode.MULTI_LINE,
            "result = compute()\n    return result\n",
            "result = compute()",
            Finish.SUFFIX_OVERLAP,
        ),
        # the model loops on a line of its own: it ends before the line comes again
        (
            "    finally:\n        ",
            "\n",
            Mode.MULTI_LINE,
            "os.remove(name)\n        shutil.rmtree(folder)\n        shutil.rmtree(folder)\n",
            "os.remove(name)\n        shutil.rmtree(folder)",
            Finish.REPETITION,
        ),
        # ... or on two lines
        (
            "def forward(self, text):\n    ",
            "\n",
            Mode.MULTI_LINE,
            "# the name is invalid\n    return 'test'\n"
            "    # the name is invalid\n    return 'test'\n",
            "# the name is invalid\n    return 'test'",
            Finish.REPETITION,
        ),
        # short lines repeat in real code; a longer one at another indentation is another line
        (
            "def f(items):\n    ",
            "\n",
            Mode.MULTI_LINE,
            "for item in items:\n        if item:\n            pass\n        else:\n"
            "            pass\n            for item in items:\n\nx = 1\n",
            "for item in items:\n        if item:\n            pass\n        else:\n"
            "            pass\n            for item in items:",
            Finish.BLOCK_END,
        ),
        # a line at the level of a `return` would never run: the block ended there
        (
            "    def check(self, input):\n        ",
            "\n",
            Mode.MULTI_LINE,
            "return input.upper()\n        # this will raise\n        return 'test'\n",
            "return input.upper()",
            Finish.BLOCK_END,
        ),
        # ... the rest of its statement, deeper or a closing bracket, is kept
        (
            "function view() {\n  ",
            "\n}\n",
            Mode.MULTI_LINE,
            "return (\n    <div />\n  );\n  render();\n",
            "return (\n    <div />\n  );",
            Finish.BLOCK_END,
        ),
        # ... and once that block has ended, its level is live again (`elif`)
        (
            "def sign(n):\n    ",
            "\n",
            Mode.MULTI_LINE,
            "if n < 0:\n        return -1\n    elif n > 0:\n        n = 1\n"
            "        return n\n    raise ValueError(n)\n\nx = 1\n",
            "if n < 0:\n        return -1\n    elif n > 0:\n        n = 1\n"
            "        return n\n    raise ValueError(n)",
            Finish.BLOCK_END,
        ),
        # the model simply ends
        ("x = ", "\n", Mode.SINGLE_LINE, "42", "42", Finish.STOP),
    ],
)
def test_truncation(prefix, suffix, mode, generated, expected, finish) -> None:
    for pieces in ([generated], stream(generated), list(generated)):
        text, reason, _ = run(prefix, suffix, mode, pieces)
        assert (text, reason) == (expected, finish)


def test_streamed_text_is_never_taken_back() -> None:
    generated = "y = x + 1\n    return y\n\ndef g():\n    pass\n"
    _, _, shown = run("def f(x):\n    ", "\n", Mode.MULTI_LINE, list(generated))
    assert "".join(shown) == "y = x + 1\n    return y"
    assert any(shown[:-1]), "something was released before the end"


def test_a_loop_is_cut_before_any_of_its_repeat_is_shown() -> None:
    generated = "a = load(path)\n    b = load(path)\n    a = load(path)\n    b = load(path)\n"
    _, reason, shown = run("def f(path):\n    ", "\n", Mode.MULTI_LINE, list(generated))
    assert reason is Finish.REPETITION
    assert "".join(shown) == "a = load(path)\n    b = load(path)"


def test_truncator_ignores_text_after_a_cut() -> None:
    truncator = Truncator(CursorSurroundings.around("x = ", "", Mode.SINGLE_LINE, STOP))
    truncator.feed("1\n")
    assert truncator.finish is Finish.LINE_END
    assert truncator.feed("more") == ""


@pytest.mark.parametrize(
    ("line_prefix", "line_suffix", "expected"),
    [
        ("", "", Mode.MULTI_LINE),
        ("    ", "", Mode.MULTI_LINE),
        ("def f(x):", "", Mode.MULTI_LINE),
        ("if (x) {", "", Mode.MULTI_LINE),
        ("x = comp", "", Mode.SINGLE_LINE),
        ("", ")", Mode.SINGLE_LINE),
    ],
)
def test_auto_mode(line_prefix: str, line_suffix: str, expected: Mode) -> None:
    assert resolve_mode(Mode.AUTO, line_prefix, line_suffix) is expected
    assert resolve_mode(Mode.SINGLE_LINE, line_prefix, line_suffix) is Mode.SINGLE_LINE


def test_only_a_possible_stop_string_start_is_held_back() -> None:
    truncator = Truncator(CursorSurroundings.around("x = ", "\n", Mode.SINGLE_LINE, STOP))
    assert truncator.feed("compute(") == "compute("
    assert truncator.feed("1)<|end") == "1)"
    assert truncator.feed("oftext|>") == ""
    assert truncator.close(Finish.STOP) == ("", Finish.STOP)


@pytest.mark.parametrize(
    ("language", "prefix", "generated", "expected"),
    [
        # the call the cursor is in closes; indentation alone sees nothing end here
        ("python", "total = compute(", "a, b)\nprint(total)\n", "a, b)"),
        # the statement ends with its line, not at the inner closing brace
        (
            "javascript",
            "const ids = items.map((item) => {",
            "\n  return item.id;\n}).filter(Boolean);\nconsole.log(ids);\n",
            "\n  return item.id;\n}).filter(Boolean);",
        ),
        (
            "rust",
            "fn area(w: u32, h: u32) -> u32 {",
            "\n    w * h\n}\nfn main() {}\n",
            "\n    w * h\n}",
        ),
    ],
)
def test_syntax_block_end(language: str, prefix: str, generated: str, expected: str) -> None:
    cursor = CursorSurroundings.around(prefix, "\n", Mode.MULTI_LINE, STOP, language)
    for pieces in ([generated], list(generated)):
        truncator = Truncator(cursor)
        shown = [truncator.feed(piece) for piece in pieces]
        rest, finish = truncator.close(Finish.STOP)
        assert ("".join(shown) + rest, finish) == (expected, Finish.BLOCK_END)


def test_no_syntax_cut_while_the_block_goes_on() -> None:
    prefix = "def f(x):\n    y = 1\n    "
    cursor = CursorSurroundings.around(prefix, "\n", Mode.MULTI_LINE, STOP, "python")
    truncator = Truncator(cursor)
    shown = truncator.feed("z = y + x\n    w = z * 2\n    return w\n")
    rest, finish = truncator.close(Finish.STOP)
    assert (shown + rest, finish) == ("z = y + x\n    w = z * 2\n    return w", Finish.STOP)


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("    y = x\n    z = 1\n", "y = x\n    z = 1"),  # the indentation, written again
        ("        y = x\n", "    y = x"),  # deeper than the cursor: the rest stays
        ("  y = x\n", "y = x"),  # shallower: no more than the model wrote goes
        ("y = x\n", "y = x"),  # none at all
    ],
)
def test_the_indentation_the_prompt_left_out_is_removed_once(generated, expected) -> None:
    for pieces in ([generated], stream(generated), list(generated)):
        cursor = CursorSurroundings.around("def f(x):\n    ", "\n", Mode.MULTI_LINE, STOP)
        truncator = Truncator(cursor, healed="    ")
        shown = [truncator.feed(piece) for piece in pieces]
        rest, _ = truncator.close(Finish.STOP)
        assert "".join(shown) + rest == expected
