"""The ``EventLog`` port: what the rest of Ledgerlake needs from an event store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from events.model import Event, EventBase

NEW_TABLE = -1
"""``expected_version`` for a table that must not exist yet."""


class Appended(msgspec.Struct, frozen=True):
    """The outcome of an append. ``replayed`` is true when an Idempotency-Key matched a
    previous append and nothing new was written."""

    version: int
    event_ids: tuple[str, ...]
    result: bytes = b""
    replayed: bool = False


class Idempotency(msgspec.Struct, frozen=True):
    """An Idempotency-Key, the fingerprint of the request it guards, and the result to
    return to a retry (stored atomically with the append)."""

    key: str
    fingerprint: str
    result: bytes = b""
    ttl_s: int | None = None


class StoredResult(msgspec.Struct, frozen=True):
    """What an earlier append with an Idempotency-Key recorded."""

    fingerprint: str
    version: int
    event_ids: tuple[str, ...]
    result: bytes


class EventLog(Protocol):
    """An ordered, append-only log with one stream per super table."""

    async def append(
        self,
        org: str,
        super_: str,
        table: str,
        events: Sequence[EventBase],
        *,
        expected_version: int,
        idempotency: Idempotency | None = None,
    ) -> Appended:
        """Append ``events`` for one table atomically if its version is ``expected_version``.

        Each event bumps the table version by one; the events must carry the versions
        they produce. Raises:
            ConflictError: the table version is not ``expected_version``.
            IdempotencyMismatch: the key was used before for a different request.
            Unavailable: the log cannot be reached.
        """
        ...

    async def stored_result(self, org: str, super_: str, key: str) -> StoredResult | None:
        """The result recorded for an Idempotency-Key, if any."""
        ...

    async def ensure_super(
        self, org: str, super_: str, org_event: EventBase, super_event: EventBase
    ) -> None:
        """Record the org and super in the registry stream unless they are there already."""
        ...

    async def read(
        self, org: str, super_: str, *, after: str = "0-0", count: int = 1000
    ) -> list[Event]:
        """Events of one super with ids strictly greater than ``after``, oldest first."""
        ...

    async def read_registry(self, *, after: str = "0-0", count: int = 1000) -> list[Event]:
        """Registry events (orgs and supers) strictly after ``after``."""
        ...
