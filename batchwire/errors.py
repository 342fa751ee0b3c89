"""Domain errors with a code; `server/status.py` is the one place that maps them to gRPC."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """What went wrong, independent of any transport."""

    INVALID_INPUT = "INVALID_INPUT"
    NOT_FOUND = "NOT_FOUND"
    QUEUE_FULL = "QUEUE_FULL"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    TOO_LARGE = "TOO_LARGE"
    UNAVAILABLE = "UNAVAILABLE"
    UNSUPPORTED = "UNSUPPORTED"
    INTERNAL = "INTERNAL"


class InferenceError(Exception):
    """An error that carries an `ErrorCode` and a message meant for the client.

    Args:
        code: the class of failure; decides the status code a front door answers with.
        message: a precise, human-readable explanation (names the input and what was expected).
        reason: a short machine-readable label for metrics (e.g. `shape`, `datatype` for
            rejected inputs); "" = the code says it all.
    """

    def __init__(self, code: ErrorCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps code, message and reason across pickling (Ray replicas raise these).
        return (type(self), (self.code, self.message, self.reason))

    def __repr__(self) -> str:
        return f"InferenceError({self.code.value}, {self.message!r})"
