"""The fine-tune's samples: the JSONL export read, tokenized as the engine tokenizes a prompt,
fitted to a length, and dealt into optimizer steps by tokens.

A line is an object with at least "prompt" (the full prompt as the serving template renders it,
special tokens written as text) and "target" (what the model should write after it; in a FIM
template, ending with its end token as text). An optional "prefix" (the prompt's window of the
file being edited, as the export writes it) marks the prompt's own code: the team's code before
the cursor, which the tune may also learn from (tune.PROMPT_WEIGHT). Other keys are ignored. The
prompt is tokenized with the tokenizer's own additions (a BOS where it has one) and special-token
texts parsed, as llama.cpp does for a request; the target on its own, so the boundary falls
where generation starts.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ghostpen.server.errors import TrainingError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sample:
    ids: tuple[int, ...]  # the prompt's tokens, then the target's
    prompt_tokens: int  # the target is ids[prompt_tokens:]
    code: tuple[int, int]  # ids[code[0]:code[1]]: the prompt's window of the file's own code

    @property
    def target_tokens(self) -> int:
        return len(self.ids) - self.prompt_tokens


@dataclass(frozen=True)
class Dataset:
    samples: tuple[Sample, ...]
    sha256: str  # of the file: a checkpoint resumes only on the data it was trained on
    dropped: int  # no target, no prompt, or a target too long for max_seq_tokens
    cut: int  # kept with the start of the prompt cut off to fit


def read_dataset(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_tokens: int) -> Dataset:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TrainingError(f"{path}: not UTF-8: {error}") from error
    # split on newlines only: str.splitlines also breaks at U+2028, which JSON may hold raw
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    records = [_fields(line, path, number) for number, line in lines]
    prompts = tokenizer(
        [prompt for prompt, _, _ in records], add_special_tokens=True, return_offsets_mapping=True
    )
    targets = tokenizer([target for _, target, _ in records], add_special_tokens=False)
    samples: list[Sample] = []
    dropped = cut = 0
    for (prompt, _, prefix), prompt_ids, offsets, target_ids in zip(
        records, prompts["input_ids"], prompts["offset_mapping"], targets["input_ids"], strict=True
    ):
        start = _code_start(prompt, prefix)
        code = (_first_token_from(offsets, start), _first_token_from(offsets, start + len(prefix)))
        sample = fit(prompt_ids, target_ids, max_seq_tokens, code)
        if sample is None:
            dropped += 1
            continue
        cut += sample.prompt_tokens < len(prompt_ids)
        samples.append(sample)
    if not samples:
        raise TrainingError(
            f"{path} holds no sample that fits (dropped {dropped}; max_seq_tokens={max_seq_tokens})"
        )
    return Dataset(tuple(samples), hashlib.sha256(raw).hexdigest(), dropped, cut)


def fit(
    prompt_ids: list[int], target_ids: list[int], max_seq_tokens: int, code: tuple[int, int]
) -> Sample | None:
    """The sample in at most max_seq_tokens, its prompt cut from the left (the far context goes
    first, as the prompt builder would drop it); None when the target with one token of prompt
    before it does not fit."""
    if not target_ids or not prompt_ids or len(target_ids) + 1 > max_seq_tokens:
        return None
    cut = max(0, len(prompt_ids) + len(target_ids) - max_seq_tokens)
    kept = prompt_ids[cut:]
    start, end = (min(len(kept), max(0, at - cut)) for at in code)
    return Sample(tuple(kept + target_ids), len(kept), (start, end))


def plan_step(
    dataset: Dataset, seed: int, position: int, batch_tokens: int, micro_batch_tokens: int
) -> tuple[list[list[int]], int]:
    """The micro-batches (lists of sample indices, padded to their longest at most
    micro_batch_tokens) of the optimizer step that starts at `position` (samples dealt so far),
    and the position after it. A function of its arguments only, so a resumed run deals exactly
    what the interrupted one would have."""
    order = _order(len(dataset.samples), seed, position)
    micro_batches: list[list[int]] = [[]]
    longest = tokens = 0
    while tokens < batch_tokens:
        index = next(order)
        length = len(dataset.samples[index].ids)
        batch = micro_batches[-1]
        if batch and (len(batch) + 1) * max(longest, length) > micro_batch_tokens:
            micro_batches.append([])
            longest = 0
        micro_batches[-1].append(index)
        longest = max(longest, length)
        tokens += length
        position += 1
    return micro_batches, position


def _order(count: int, seed: int, position: int) -> Iterator[int]:
    """Sample indices from `position` on: each pass over the data in its own seeded shuffle."""
    epoch, offset = divmod(position, count)
    while True:
        indices = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(indices)
        yield from indices[offset:]
        epoch, offset = epoch + 1, 0


def _code_start(prompt: str, prefix: str) -> int:
    """Where the prefix window starts in the prompt (its last occurrence: the file being edited
    comes after its context); the prompt's end when there is no prefix to learn from."""
    start = prompt.rfind(prefix) if prefix else -1
    return start if start >= 0 else len(prompt)


def _first_token_from(offsets: list[tuple[int, int]], char: int) -> int:
    """The first token that starts at or after `char`: a token straddling it belongs to the
    template's text before."""
    return next(
        (i for i, (begin, end) in enumerate(offsets) if begin >= char and end > begin), len(offsets)
    )


def _fields(line: str, path: Path, number: int) -> tuple[str, str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TrainingError(f"{path}:{number}: not JSON: {error}") from error
    if not isinstance(record, dict) or not all(
        isinstance(record.get(key), str) for key in ("prompt", "target")
    ):
        raise TrainingError(f"{path}:{number}: wants an object with string prompt and target")
    prefix = record.get("prefix", "")
    if not isinstance(prefix, str):
        raise TrainingError(f"{path}:{number}: prefix, where given, must be a string")
    return record["prompt"], record["target"], prefix
