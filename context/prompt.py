"""Build the prompt for one request: the cursor's window, ranked context, a template."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ghostpen.context.chunker import Chunk
from ghostpen.context.languages import line_comment
from ghostpen.context.ranker import (
    Exclusion,
    RankedChunk,
    Ranker,
    query_text,
    rank_chunks,
    score_chunks,
)
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import Template

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_FIT_MARGIN = 0.9  # of the room a fitted prompt is cut to: its parts differ in characters a token


@dataclass(frozen=True)
class Document:
    """The file being edited, at the version the request names."""

    path: str
    language: str
    text: str
    cursor: int  # code-point offset

    @property
    def prefix(self) -> str:
        return self.text[: self.cursor]

    @property
    def suffix(self) -> str:
        return self.text[self.cursor :]


@dataclass(frozen=True)
class Prompt:
    text: str
    template: Template
    context: tuple[RankedChunk, ...]  # in the order the prompt holds them
    prefix_start_line: int
    estimated_tokens: int
    healed: str = ""  # the blanks before the cursor, left out of the prompt (heal_blanks)
    # What `render` made `text` of, besides the context: kept with consented captures
    repo: str = ""
    prefix: str = ""  # the prefix window, without `healed`
    suffix: str = ""  # the suffix window


def build_prompt(
    repo: str,
    document: Document,
    chunks: Sequence[Chunk],
    template: Template,
    settings: ContextSettings,
    previous: Sequence[Chunk] = (),
    rank: Ranker = rank_chunks,
) -> Prompt:
    """Stable text first (repository, context chunks, the prefix window anchored on a fixed line)
    so that consecutive keystrokes share the longest possible prompt prefix.

    `previous`: the context of the session's last prompt, in its order. Those chunks stay unless
    another beats them by `context_stickiness`, and keep their order ahead of newly chosen ones: a
    changed prompt start costs a re-read of everything after it, seconds on a CPU, while near-ties
    in similarity are noise. A new chunk therefore costs a read of itself and the current file only;
    a dropped one leaves the rest in place, for the engine's KV shift.
    `rank`: another retrieval strategy, for evaluations that compare them."""
    prefix, prefix_start = _prefix_window(document.prefix, settings)
    healed = _trailing_blanks(prefix) if settings.heal_blanks else ""
    prefix = prefix[: len(prefix) - len(healed)]
    suffix = _suffix_window(document.suffix, settings)
    cursor_line = document.prefix.count("\n")
    exclusion = Exclusion(document.path, prefix_start, cursor_line + suffix.count("\n") + 1)
    query = query_text(document.prefix, settings.query_lines)
    ranked = rank(query, chunks, exclusion, settings.top_k)
    incumbents = _still_present(previous, chunks, exclusion, ranked)
    if incumbents:
        ranked = sorted(
            [*ranked, *score_chunks(query, incumbents)],
            key=lambda r: r.score + (settings.context_stickiness if r.chunk in previous else 0.0),
            reverse=True,
        )
    chosen = _in_prompt_order(_fill_budget(ranked, settings), previous)
    context = [item.chunk for item in chosen]
    text = render(template, repo, document.path, document.language, context, prefix, suffix)
    return Prompt(
        text,
        template,
        tuple(chosen),
        prefix_start,
        settings.tokens(text),
        healed,
        repo,
        prefix,
        suffix,
    )


def render(
    template: Template,
    repo: str,
    path: str,
    language: str,
    context: Sequence[Chunk],
    prefix: str,
    suffix: str,
) -> str:
    """The prompt text of chosen parts: the one renderer of serving and of training samples
    (server/training/export.py), so that a model learns the very format it is served."""
    comment = line_comment(language)
    parts = [_fill(template.repo_header, repo=repo)]
    for file, text in _sections(context, comment):
        parts.append(_fill(template.context_file, path=file, text=text, comment=comment))
    parts.append(_fill(template.current_file, path=path, comment=comment))
    parts.append(_fill(template.body, prefix=prefix, suffix=suffix))
    return "".join(parts)


def fitted(prompt: Prompt, document: Document, tokens: int, room: int) -> Prompt:
    """The prompt cut to about `room` tokens, where the engine's tokenizer counted `tokens`. The
    budgets are estimates (`chars_per_token`), and text of short tokens (digits, symbols,
    non-Latin scripts) holds more than they expect. The last context chunks go first, then the
    prefix window's oldest lines: the stable start and the text at the cursor stay."""
    chars = int(len(prompt.text) * room / tokens * _FIT_MARGIN)

    def text_of(context: Sequence[RankedChunk], prefix: str) -> str:
        chunks = [item.chunk for item in context]
        path, language = document.path, document.language
        return render(prompt.template, prompt.repo, path, language, chunks, prefix, prompt.suffix)

    context, prefix = list(prompt.context), prompt.prefix
    while context and len(text_of(context, prefix)) > chars:
        context.pop()
    over = len(text_of(context, prefix)) - chars
    start_line = prompt.prefix_start_line
    if over > 0:
        cut = prefix.find("\n", over) + 1 or over  # from a line's start where there is one
        start_line += prefix.count("\n", 0, cut)
        prefix = prefix[cut:]
    text = text_of(context, prefix)
    return replace(
        prompt,
        text=text,
        context=tuple(context),
        prefix_start_line=start_line,
        estimated_tokens=math.ceil(len(text) * tokens / len(prompt.text)),
        prefix=prefix,
    )


def _fill(pattern: str, **values: str) -> str:
    """One pass, so braces or placeholders inside code are never substituted twice."""
    return _PLACEHOLDER.sub(lambda match: values.get(match.group(1), match.group(0)), pattern)


def _prefix_window(prefix: str, settings: ContextSettings) -> tuple[str, int]:
    """The end of the prefix within budget, starting at an anchored line; and that line."""
    lines = prefix.split("\n")
    budget = settings.prefix_token_budget
    start = len(lines) - 1
    used = settings.tokens(lines[start])
    while start > 0:
        cost = settings.tokens(lines[start - 1])
        if used + cost > budget:
            break
        start -= 1
        used += cost
    anchor = max(1, settings.prefix_anchor_lines)
    anchored = min(math.ceil(start / anchor) * anchor, len(lines) - 1)
    text = "\n".join(lines[anchored:])
    max_chars = int(budget * settings.chars_per_token)
    return (text[-max_chars:] if len(text) > max_chars else text), anchored


def _trailing_blanks(prefix: str) -> str:
    """The spaces and tabs the cursor line ends with: its indentation, or a typed space."""
    line = prefix[prefix.rfind("\n") + 1 :]
    return line[len(line.rstrip(" \t")) :]


def _suffix_window(suffix: str, settings: ContextSettings) -> str:
    max_chars = int(settings.suffix_token_budget * settings.chars_per_token)
    if len(suffix) <= max_chars:
        return suffix
    cut = suffix.rfind("\n", 0, max_chars)
    return suffix[: cut if cut > 0 else max_chars]


def _still_present(
    previous: Sequence[Chunk],
    chunks: Sequence[Chunk],
    exclusion: Exclusion,
    ranked: list[RankedChunk],
) -> list[Chunk]:
    """Previous context chunks that can still be chosen and were not ranked again already."""
    if not previous:
        return []
    available = set(chunks)
    already = {r.chunk for r in ranked}
    return [c for c in previous if c in available and c not in already and not exclusion.covers(c)]


def _fill_budget(ranked: list[RankedChunk], settings: ContextSettings) -> list[RankedChunk]:
    chosen, used = [], 0
    for item in ranked:
        if len(chosen) == settings.top_k:
            break
        if item.score < settings.context_min_similarity:
            continue
        cost = settings.tokens(item.chunk.text) + 8  # the file separator and path
        if used + cost <= settings.context_token_budget:
            chosen.append(item)
            used += cost
    return chosen


def _in_prompt_order(chosen: list[RankedChunk], previous: Sequence[Chunk]) -> list[RankedChunk]:
    """Chunks kept from the last prompt in their order, then new ones in file and line order: the
    same history always renders the same, and a new choice only appends."""
    place = {chunk: i for i, chunk in enumerate(previous)}
    kept = sorted((r for r in chosen if r.chunk in place), key=lambda r: place[r.chunk])
    new = sorted(
        (r for r in chosen if r.chunk not in place),
        key=lambda r: (r.chunk.path, r.chunk.start_line),
    )
    return kept + new


def _sections(context: Sequence[Chunk], comment: str) -> list[tuple[str, str]]:
    """Consecutive chunks of one file share a file section. Where lines between two of them are
    left out, a `...` comment says so: the model would otherwise read them as adjacent code."""
    sections: list[tuple[str, list[Chunk]]] = []
    for chunk in context:
        if sections and sections[-1][0] == chunk.path:
            sections[-1][1].append(chunk)
        else:
            sections.append((chunk.path, [chunk]))
    return [(path, _joined(chunks, comment)) for path, chunks in sections]


def _joined(chunks: list[Chunk], comment: str) -> str:
    text = chunks[0].text
    for before, chunk in itertools.pairwise(chunks):
        gap = chunk.start_line != before.end_line
        text += (f"\n{comment} ...\n" if gap else "\n") + chunk.text
    return text
