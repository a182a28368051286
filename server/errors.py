"""Errors a request can end with, split by whether the caller can recover.

GhostpenError
├── RecoverableError      the caller can fix the request, resend its state, or retry later
│   ├── InvalidInput        malformed field, bad UTF-8, bad edit range, unparsable message
│   ├── LimitExceeded       a named setting's limit was passed
│   ├── UnknownFile         the session does not hold the file: send its full text
│   ├── UnknownRequest      cancel or event for a request or completion this server does not know
│   ├── StaleVersion        the request names another version than the session holds
│   ├── CursorOutOfRange    the cursor is outside the file
│   ├── DeadlinePassed      the request's deadline passed before it was served
│   ├── DuplicateRequest    a request id already in flight
│   ├── EngineUnavailable   the engine process died or is restarting: retry
│   ├── StoreUnavailable    the telemetry database refused a read or write: retry
│   ├── ShuttingDown        the server is draining: retry on another replica or after restart
│   ├── Unauthenticated     no token, or one the server does not know
│   └── PermissionDenied    the caller may not touch what it named (another user's completion)
└── FatalError            retrying the same request fails the same way; ours to fix
    ├── EngineFailure       the inference engine failed
    └── InternalError       a bug of ours, logged with its traceback

ModelError is separate: it stops the server from starting (a model file missing or not matching),
or the flywheel from reading or writing one. TrainingError, also separate, stops a fine-tune: its
data is malformed, or its output directory holds another run's checkpoint.
The gRPC status of each is in one table at the edge (`server/wire.py`); nothing here knows gRPC.
"""

from __future__ import annotations


class GhostpenError(Exception):
    """A request failed in a way the caller can be told about."""


class RecoverableError(GhostpenError):
    """The caller can act: correct the request, resend a file, or retry."""


class FatalError(GhostpenError):
    """The server failed; the same request would fail again."""


class InvalidInput(RecoverableError):
    pass


class LimitExceeded(RecoverableError):
    pass


class PromptTooLong(LimitExceeded):
    """The engine's tokenizer counts more prompt tokens than its window holds. The prompt's
    budgets are estimates (`chars_per_token`), so the completer fits the prompt to the count
    and sends it once more."""

    def __init__(self, tokens: int, window: int) -> None:
        super().__init__(tokens, window)  # the arguments, so that it pickles across processes
        self.tokens, self.window = tokens, window

    def __str__(self) -> str:
        return (
            f"the prompt has {self.tokens} tokens; one sequence holds prompt and completion "
            f"in context_window={self.window} tokens"
        )


class UnknownFile(RecoverableError):
    pass


class UnknownRequest(RecoverableError):
    pass


class StaleVersion(RecoverableError):
    pass


class CursorOutOfRange(RecoverableError):
    pass


class DeadlinePassed(RecoverableError):
    pass


class DuplicateRequest(RecoverableError):
    pass


class EngineUnavailable(RecoverableError):
    pass


class StoreUnavailable(RecoverableError):
    pass


class ShuttingDown(RecoverableError):
    pass


class Unauthenticated(RecoverableError):
    pass


class PermissionDenied(RecoverableError):
    pass


class EngineFailure(FatalError):
    pass


class InternalError(FatalError):
    pass


class ModelError(Exception):
    """The model cannot be served: missing, unverified, or of an unknown kind."""


class TrainingError(Exception):
    """A fine-tune cannot start or go on (server/training/tune.py)."""


def over_limit(what: str, setting: str, limit: int) -> str:
    """The one wording of a passed limit: what was sent, and the setting that bounds it."""
    return f"{what}; the limit is {setting}={limit}"
