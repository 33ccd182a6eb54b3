"""Reading the audit trail straight from the streams, with paging by event id."""

from __future__ import annotations

import heapq
import re

from events.errors import InvalidInput
from events.model import (
    Event,
    RowsAppended,
    RowsDeleted,
    RowsUpserted,
    SchemaEvolved,
    TableCreated,
    TableDropped,
    TableOverwritten,
    TableRestored,
    stream_id_tuple,
)
from events.redis_log import RedisEventLog

_ID = re.compile(r"^\d+(-\d+)?(@[a-z0-9_]*)?$")
PAGE = 1000
MAX_PAGES = 20  # scanned per request when filtering; the cursor continues from there


def check_cursor(after: str) -> str:
    if not _ID.match(after):
        raise InvalidInput(
            f"'after' must be an event id like 1700000000000-0, not {after!r}",
            code="invalid_cursor",
        )
    stream_id, sep, source = after.partition("@")
    stream_id = stream_id if "-" in stream_id else f"{stream_id}-0"
    return f"{stream_id}{sep}{source}"


async def scan_super(
    log: RedisEventLog, org: str, sup: str, *, after: str, limit: int, table: str | None
) -> tuple[list[Event], str | None]:
    """Up to ``limit`` events of a super after ``after`` (of one table, if given).

    Returns the events and the cursor to continue from (None at the end of the stream).
    """
    found: list[Event] = []
    cursor = after.partition("@")[0]  # an org-wide cursor names a stream: not needed here
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


REGISTRY_SOURCE = ""  # sorts before every super name


async def scan_org(
    log: RedisEventLog, org: str, supers: list[str], *, after: str, limit: int
) -> tuple[list[Event], str | None]:
    """Registry and super events of an org, merged in (id, stream) order.

    Ids are unique only within one stream (two supers can both have ``17-0``), so the
    cursor is ``<id>@<super>`` (``<id>@`` for the registry): a page resumes exactly
    after the last event it returned, whatever stream it came from. A bare ``<id>``
    resumes after that id in every stream."""
    cursor_id, sep, cursor_src = after.partition("@")
    if not sep:
        cursor_src = "\uffff"  # past every stream name: exclusive everywhere
    sources: list[list[tuple[tuple[int, int], str, Event]]] = []
    more = False
    cap: tuple[int, int] | None = None  # how far the registry page reached
    for src in [REGISTRY_SOURCE, *sorted(supers)]:
        # Same id, later stream: still ahead of the cursor, so read it inclusively.
        start = cursor_id if src > cursor_src else f"({cursor_id}"
        if src == REGISTRY_SOURCE:
            page = await log.read_registry_from(start, count=PAGE)
            events = [e for e in page if e.org == org]
            if len(page) == PAGE:
                # The registry holds every org's events: past this page there may be
                # more of ours, so nothing later than it may be returned yet.
                more = True
                cap = stream_id_tuple(page[-1].id)
                registry_last = page[-1].id
        else:
            events = await log.read_from(org, src, start, count=limit)
            more |= len(events) == limit
        sources.append([(stream_id_tuple(e.id), src, e) for e in events])
    merged = list(heapq.merge(*sources, key=lambda item: (item[0], item[1])))
    if cap is not None:
        merged = [item for item in merged if item[0] <= cap]
    merged = merged[:limit]
    if merged and (len(merged) == limit or more):
        _, src, last = merged[-1]
        return [e for _, _, e in merged], f"{last.id}@{src}"
    if cap is not None:  # a page of other orgs' registry events: continue after it
        return [e for _, _, e in merged], f"{registry_last}@{REGISTRY_SOURCE}"
    return [e for _, _, e in merged], None


def history_fields(event: Event) -> tuple[int, int, list[str]]:
    """Rows added, rows removed and columns added by a table event."""
    if isinstance(event, RowsAppended):
        return event.rows, 0, []
    if isinstance(event, TableOverwritten | TableRestored):
        return event.rows, event.rows_removed, []
    if isinstance(event, RowsUpserted):
        # An updated row is one row removed and one added.
        return event.inserted + event.updated, event.rows_removed, []
    if isinstance(event, RowsDeleted):
        return 0, event.rows_removed, []
    if isinstance(event, TableDropped):
        return 0, event.rows, []
    if isinstance(event, TableCreated):
        return 0, 0, [f.name for f in event.columns]
    if isinstance(event, SchemaEvolved):
        return 0, 0, list(event.added)
    return 0, 0, []
