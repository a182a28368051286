"""Which language a file is in, and the tree-sitter grammar for it when we ship one."""

from __future__ import annotations

import threading
from functools import cache
from pathlib import PurePosixPath

import tree_sitter

_EXTENSIONS = {
    ".py": "python",
    ".pyi": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".tsx": "tsx",
    ".go": "go",
    ".rs": "rust",
    ".java": "java",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".rb": "ruby",
    ".lua": "lua",
    ".sh": "shell",
    ".md": "markdown",
}

# Editors name some languages differently from us.
_ALIASES = {
    "typescriptreact": "tsx",
    "javascriptreact": "javascript",
    "py": "python",
    "golang": "go",
    "rs": "rust",
}


def language_of(path: str, declared: str = "") -> str:
    """The declared language when given, else one guessed from the extension ("" if unknown)."""
    if declared:
        lowered = declared.lower()
        return _ALIASES.get(lowered, lowered)
    return _EXTENSIONS.get(PurePosixPath(path).suffix.lower(), "")


def _grammar(language: str) -> object | None:
    if language == "python":
        import tree_sitter_python as grammar

        return grammar.language()
    if language == "javascript":
        import tree_sitter_javascript as grammar

        return grammar.language()
    if language in ("typescript", "tsx"):
        import tree_sitter_typescript as grammar

        return grammar.language_tsx() if language == "tsx" else grammar.language_typescript()
    if language == "go":
        import tree_sitter_go as grammar

        return grammar.language()
    if language == "rust":
        import tree_sitter_rust as grammar

        return grammar.language()
    if language == "java":
        import tree_sitter_java as grammar

        return grammar.language()
    return None


GRAMMARS = frozenset({"python", "javascript", "typescript", "tsx", "go", "rust", "java"})


def parser_for(language: str) -> tree_sitter.Parser | None:
    """This thread's parser for the language (a parser is not safe to share between threads),
    or None where we have no grammar (line windows are used then). A language is a client's
    string: only those with a grammar reach the cache."""
    if language not in GRAMMARS:
        return None
    parsers = _local.__dict__.setdefault("parsers", {})
    if language not in parsers:
        parsers[language] = tree_sitter.Parser(_language(language))
    return parsers[language]


_local = threading.local()


@cache
def _language(language: str) -> tree_sitter.Language:
    grammar = _grammar(language)
    assert grammar is not None, f"GRAMMARS names {language!r} but _grammar has none"
    return tree_sitter.Language(grammar)


_HASH_COMMENT = {"python", "ruby", "shell", "perl", "r", "yaml", "toml", "dockerfile", "makefile"}


def line_comment(language: str) -> str:
    """How a line comment starts, for templates that label context with a comment."""
    if language in _HASH_COMMENT:
        return "#"
    if language in {"lua", "sql", "haskell"}:
        return "--"
    return "//"
