"""The domain error hierarchy. No HTTP in here: ``app/`` maps each class to a status."""

from __future__ import annotations

from typing import Any


class LedgerError(Exception):
    """Base class: a machine-readable ``code``, a human message and optional details."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class InvalidInput(LedgerError):
    """The request is malformed (bad body, bad name, bad SQL)."""

    code = "invalid_input"


class TypeMismatch(LedgerError):
    """Data does not match the table schema (or cannot be typed at all)."""

    code = "type_mismatch"


class NotFound(LedgerError):
    """An org, super, table or version does not exist."""

    code = "not_found"


class Gone(LedgerError):
    """A table version existed but has been expired (410)."""

    code = "version_expired"


class ConflictError(LedgerError):
    """An expected version was stale. ``current_version`` says what it is now."""

    code = "version_conflict"

    def __init__(self, message: str, *, current_version: int) -> None:
        super().__init__(message, current_version=current_version)
        self.current_version = current_version


class AlreadyExists(LedgerError):
    """Something that must be unique is taken (409)."""

    code = "already_exists"


class IdempotencyMismatch(LedgerError):
    """An Idempotency-Key was reused with a different request."""

    code = "idempotency_key_reused"


class PayloadTooLarge(LedgerError):
    """The request body is larger than the configured limit."""

    code = "payload_too_large"


class QueryTooLarge(PayloadTooLarge):
    """A query needed more memory than its limit (the engine's, or its worker process's
    address space) and was stopped."""

    code = "query_out_of_memory"


class QueryRejected(LedgerError):
    """A query is not allowed (not a single SELECT, touches files or settings)."""

    code = "query_rejected"


class QueryTimeout(LedgerError):
    """A query ran longer than its timeout and was interrupted."""

    code = "query_timeout"


class Unauthorized(LedgerError):
    """No or a wrong credential."""

    code = "unauthorized"


class Unavailable(LedgerError):
    """A backing service (Redis, storage) cannot be reached; retrying later may work."""

    code = "unavailable"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (a library's message can be many lines
    long), or its class name when it has none: for the message of a 4xx or 503."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
