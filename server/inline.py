"""The stateless Complete call: the document and its context files arrive with each request, and
the context files are read in the context process, off the event loop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ghostpen.context.languages import language_of
from ghostpen.context.prompt import Document
from ghostpen.server.completion import Completer, CompletionJob, RequestSpec
from ghostpen.server.context_process import ContextProcess, InlineFile
from ghostpen.server.errors import DeadlinePassed
from ghostpen.server.identity import Identity


@dataclass(frozen=True)
class InlineRequest:
    spec: RequestSpec
    repo: str
    document: InlineFile
    cursor: int  # code points into document.text
    context: tuple[InlineFile, ...]


class InlineCompletions:
    def __init__(self, completer: Completer, context: ContextProcess) -> None:
        self._completer = completer
        self._context = context

    async def job(self, request: InlineRequest, owner: Identity) -> CompletionJob:
        """DeadlinePassed, before any context file is read, if the request's time is spent;
        or if it runs out while they are."""
        spec = request.spec
        left = spec.received + spec.deadline_s - time.monotonic()
        if left <= 0:
            raise DeadlinePassed(
                f"the deadline passed {-left * 1000:.0f} ms before the context was read; "
                "it was dropped"
            )
        file = request.document
        document = Document(
            file.path, language_of(file.path, file.language), file.text, request.cursor
        )
        if not request.context:  # nothing to chunk: not worth a trip to the context process
            prompt = self._completer.prompt(request.repo, document, ())
        else:
            try:
                async with asyncio.timeout(left):
                    prompt = await self._context.prompt(
                        request.repo, document, request.context, spec.received + spec.deadline_s
                    )
            except TimeoutError:
                raise DeadlinePassed(
                    f"the deadline passed while {len(request.context)} context files were read; "
                    "it was dropped"
                ) from None
        return self._completer.job(spec, document, prompt, owner)
