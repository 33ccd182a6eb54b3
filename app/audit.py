"""Reading the audit trail straight from the streams, with paging by event id."""

from __future__ import annotations

import heapq
import re

from events.errors import InvalidInput
from events.model import (
    Event,
    RowsAppended,
    SchemaEvolved,
    TableCreated,
    TableOverwritten,
    stream_id_tuple,
)
from events.redis_log import RedisEventLog

_ID = re.compile(r"^\d+(-\d+)?$")
PAGE = 1000
MAX_PAGES = 20  # scanned per request when filtering; the cursor continues from there


def check_cursor(after: str) -> str:
    if not _ID.match(after):
        raise InvalidInput(
            f"'after' must be an event id like 1700000000000-0, not {after!r}",
            code="invalid_cursor",
        )
    return after if "-" in after else f"{after}-0"


async def scan_super(
    log: RedisEventLog, org: str, sup: str, *, after: str, limit: int, table: str | None
) -> tuple[list[Event], str | None]:
    """Up to ``limit`` events of a super after ``after`` (of one table, if given).

    Returns the events and the cursor to continue from (None at the end of the stream).
    """
    found: list[Event] = []
    cursor = after
    for _ in range(MAX_PAGES):
        page = await log.read(org, sup, after=cursor, count=PAGE)
        for event in page:
            cursor = event.id
            if table is None or event.table == table:
                found.append(event)
                if len(found) == limit:
                    return found, cursor
        if len(page) < PAGE:
            return found, None
    return found, cursor


async def scan_org(
    log: RedisEventLog, org: str, supers: list[str], *, after: str, limit: int
) -> tuple[list[Event], str | None]:
    """Registry and super events of an org, merged in id order."""
    sources: list[list[Event]] = []
    more = False
    for sup in supers:
        events = await log.read(org, sup, after=after, count=limit)
        more |= len(events) == limit
        sources.append(events)
    registry = await log.read_registry(after=after, count=PAGE)
    more |= len(registry) == PAGE
    sources.append([e for e in registry if e.org == org])
    merged = list(heapq.merge(*sources, key=lambda e: stream_id_tuple(e.id)))[:limit]
    if len(merged) == limit or (more and merged):
        return merged, merged[-1].id if merged else None
    return merged, None


def history_fields(event: Event) -> tuple[int, int, list[str]]:
    """Rows added, rows removed and columns added by a table event."""
    if isinstance(event, RowsAppended):
        return event.rows, 0, []
    if isinstance(event, TableOverwritten):
        return event.rows, event.rows_removed, []
    if isinstance(event, TableCreated):
        return 0, 0, [f.name for f in event.columns]
    if isinstance(event, SchemaEvolved):
        return 0, 0, list(event.added)
    return 0, 0, []
