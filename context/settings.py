"""The context pipeline's own settings section (part of the server's `Settings`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ContextSettings:
    # Prefix-only: on the default model (an instruct model, whose FIM its makers rate below the
    # base model's) it beats the FIM template in Python, Go and Rust with CIs above zero, and
    # loses in no language (benchmarks/RESULTS.md, issue 12). A base or tuned model: FIM again.
    template: str = "generic-prefix"
    chunk_max_lines: int = 24
    # Text whose syntax trees are kept, so the files being edited parse incrementally (a tree
    # costs ~20 bytes a character); past it the least recently edited parse whole next time.
    max_tree_chars: int = 32 * 1024 * 1024
    query_lines: int = 12  # lines behind the cursor that rank the other files' chunks
    top_k: int = 8
    # Selective retrieval: a chunk less similar than this to the query is left out, and with no
    # chunk left the prompt has no context to read (0: every chunk within budget counts).
    context_min_similarity: float = 0.0
    context_stickiness: float = 0.1  # similarity bonus that keeps the last prompt's context chunks
    chars_per_token: float = 3.0  # budget estimate; conservative for code
    # 1,280 against 640: +3.3 points of exact match (CI +0.8 to +6.2) over 240 tasks in six
    # languages, for ~240 more tokens on a cold prompt; the prefix is KV-cached between
    # keystrokes (benchmarks/RESULTS.md, issue 12, session 16).
    prefix_token_budget: int = 1280
    suffix_token_budget: int = 48  # re-read on every keystroke (it follows the cursor): keep small
    context_token_budget: int = 512
    prefix_anchor_lines: int = 32  # the prefix window starts on a multiple of this, for cache reuse
    # A cursor after blanks (a line's indentation, or the space typed after `return`): the prompt
    # ends before them and the model writes them itself, which post-processing removes. Ending on
    # blanks splits the tokens the model was trained on ("\n", "   ", " return"; " a"): it wrote
    # the indentation a second time, and after `return ` it wrote `2 * a * b` for `a * b`.
    heal_blanks: bool = True
    # The show gate (gate.py) withholds suggestions unlikely to be kept. Off, its verdict is still
    # recorded on each completion (shadow mode) and the text shown.
    show_gate: bool = True
    # Mean token log-probability below which a suggestion is withheld. At -0.5 a fifth of the
    # suggestions go and none of those a developer would keep, on 139 cross-file tasks in six
    # languages (benchmarks/RESULTS.md, issue 12).
    show_min_confidence: float = -0.5

    def tokens(self, text: str) -> int:
        """Estimated tokens, so budgets need no tokenizer on the per-keystroke path."""
        return int(len(text) / self.chars_per_token) + 1
