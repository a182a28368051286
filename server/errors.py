"""Errors a request can end with, and the one table that maps them to gRPC status codes.

GhostpenError
├── InvalidInput        INVALID_ARGUMENT    malformed field, bad UTF-8, bad edit range
├── LimitExceeded       RESOURCE_EXHAUSTED  a named setting's limit was passed
├── UnknownFile         NOT_FOUND           the session does not hold the file
├── UnknownRequest      NOT_FOUND           cancel for a request id not in flight
├── StaleVersion        FAILED_PRECONDITION the request names another version than the session holds
├── CursorOutOfRange    OUT_OF_RANGE        the cursor is outside the file
├── DeadlinePassed      DEADLINE_EXCEEDED   the request's deadline passed before it was served
├── DuplicateRequest    ALREADY_EXISTS      a request id already in flight
├── EngineFailure       INTERNAL            the inference engine failed
├── EngineUnavailable   UNAVAILABLE         the engine process died or is restarting: retry
└── InternalError       INTERNAL            a bug of ours, logged with its traceback

ModelError is separate: it stops the server from starting (a model file missing or not matching).
"""

from __future__ import annotations

import grpc


class GhostpenError(Exception):
    """A request failed in a way the caller can be told about."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(GhostpenError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(GhostpenError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnknownFile(GhostpenError):
    status = grpc.StatusCode.NOT_FOUND


class UnknownRequest(GhostpenError):
    status = grpc.StatusCode.NOT_FOUND


class StaleVersion(GhostpenError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class CursorOutOfRange(GhostpenError):
    status = grpc.StatusCode.OUT_OF_RANGE


class DeadlinePassed(GhostpenError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class DuplicateRequest(GhostpenError):
    status = grpc.StatusCode.ALREADY_EXISTS


class EngineFailure(GhostpenError):
    status = grpc.StatusCode.INTERNAL


class EngineUnavailable(GhostpenError):
    status = grpc.StatusCode.UNAVAILABLE


class InternalError(GhostpenError):
    status = grpc.StatusCode.INTERNAL


class ModelError(Exception):
    """The model cannot be served: missing, unverified, or of an unknown kind."""
