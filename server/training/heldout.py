"""A model scored on held-out samples as it would be served: the exported prompt, the serving
post-processing, and the text the developer kept (or the file held) as the answer. Two models
scored on the same samples compare pair by pair, with a bootstrap 95% interval."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rapidfuzz.distance import Levenshtein

from ghostpen.context.prompt import Document, Prompt
from ghostpen.context.template import Template
from ghostpen.server.completion import Completer, Discard, RequestSpec
from ghostpen.server.engines.base import Engine
from ghostpen.server.errors import DeadlinePassed, EngineFailure
from ghostpen.server.settings import Settings
from ghostpen.server.stats import Difference, paired_bootstrap
from ghostpen.server.training.export import Sample, prompt_in
from ghostpen.server.training.tasks import mode_of

DEADLINE_S = 120.0  # one held-out completion; generous: many wait their turn on a CPU


@dataclass(frozen=True)
class Scored:
    sample_id: str
    text: str
    exact: float  # 1.0 when the text is what was kept, blanks around aside
    similarity: float  # normalized Levenshtein similarity to it
    prompt_tokens: int
    total_ms: float
    failed: bool = False  # the deadline passed or the engine failed: scored as no answer


def exact_match(predicted: str, expected: str) -> float:
    return float(predicted.strip() == expected.strip())


def edit_similarity(predicted: str, expected: str) -> float:
    return Levenshtein.normalized_similarity(predicted.strip(), expected.strip())


async def score(
    engine: Engine,
    settings: Settings,
    template: Template,
    samples: Sequence[Sample],
    concurrency: int,
    adapter: str = "",
) -> list[Scored]:
    """Each sample completed by `engine` (with `adapter`, if named), its prompt rendered in
    `template`, in order; the show gate is off, so that every answer counts. A completion that
    fails (its deadline passed, the engine failed) scores as an empty answer."""
    context = dataclasses.replace(settings.context, show_gate=False)
    completer = Completer.from_settings(engine, settings, Discard())
    completer = completer.varied(template=template, context=context)
    slots = asyncio.Semaphore(concurrency)

    async def one(sample: Sample) -> Scored:
        async with slots:
            return await _complete(completer, sample, adapter)

    return list(await asyncio.gather(*(one(s) for s in samples)))


def compare(
    base: Sequence[Scored], tuned: Sequence[Scored], files: Sequence[str]
) -> dict[str, Difference]:
    """tuned - base on the same samples, per score, resampled by file: cuts of one file are
    not independent."""
    if [s.sample_id for s in base] != [s.sample_id for s in tuned]:
        raise ValueError("the two runs scored different samples")
    return {
        score: paired_bootstrap(
            [getattr(s, score) for s in base], [getattr(s, score) for s in tuned], clusters=files
        )
        for score in ("exact", "similarity")
    }


async def _complete(completer: Completer, sample: Sample, adapter: str) -> Scored:
    """As served: the document holds the blanks the prompt left to the model (they set the
    cursor line's indentation, which post-processing cuts blocks by)."""
    before = sample.prefix + sample.healed
    document = Document(sample.file, sample.language, before + sample.suffix, len(before))
    prompt = Prompt(
        prompt_in(sample, completer.template), completer.template, (), 0, 0, sample.healed
    )
    received = time.monotonic()
    mode = mode_of(sample.kind)
    spec = RequestSpec(sample.sample_id, mode, 0, adapter, DEADLINE_S, received)
    job = completer.job(spec, document, prompt)
    answer, outcome, failed = "", None, False
    try:
        async for event in completer.run(job):
            answer += event.text
            outcome = event.outcome or outcome
    except (DeadlinePassed, EngineFailure):
        answer, failed = "", True
    tokens = outcome.prompt_tokens if outcome else 0
    return Scored(
        sample.sample_id,
        answer,
        exact_match(answer, sample.expected),
        edit_similarity(answer, sample.expected),
        tokens,
        (time.monotonic() - received) * 1000,
        failed,
    )
