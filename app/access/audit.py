"""Reading the audit trail straight from the streams, with paging by event id."""

from __future__ import annotations

import heapq
import re
import time
from datetime import datetime
from typing import Any

import msgspec

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
    to_builtins,
)
from events.redis_log import Keys, RedisEventLog, guarded

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


# -- the read audit: one record per query ---------------------------------------------


class ReadRecord(msgspec.Struct, frozen=True):
    """A query: who ran it, on what, and what it returned."""

    time: datetime
    principal: str
    token: str
    org: str
    super: str
    sql: str
    tables: list[str]
    rows: int
    duration_ms: float
    error: str = ""
    request_id: str = ""
    kind: str = "query"
    id: str = ""


_read_decoder = msgspec.json.Decoder(ReadRecord)


def reads_stream(keys: Keys) -> str:
    return keys.audit_stream


async def record_read(client: Any, keys: Keys, record: ReadRecord, retention_s: float) -> None:
    """Append a query record; records older than the retention are trimmed as new
    ones arrive (XADD MINID)."""
    oldest = int((time.time() - retention_s) * 1000)
    fields: Any = {"e": msgspec.json.encode(record)}
    await guarded(client.xadd(reads_stream(keys), fields, minid=f"{oldest}-0", approximate=True))


async def audit_entries(
    client: Any,
    log: RedisEventLog,
    keys: Keys,
    org: str,
    supers: list[str],
    *,
    since: datetime,
    until: datetime,
    principal: str | None,
    table: str | None,
    kind: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], bool]:
    """Queries and table events of an org between ``since`` and ``until``, oldest
    first, filtered; and whether more lie past ``limit``."""
    low, high = int(since.timestamp() * 1000), int(until.timestamp() * 1000)
    out: list[tuple[str, dict[str, Any]]] = []
    if kind in (None, "query"):
        start = f"{low}-0"
        while True:
            entries: Any = await guarded(
                client.xrange(reads_stream(keys), min=start, max=str(high), count=PAGE)
            )
            last = ""
            for raw_id, fields in entries:
                eid = last = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                record = _read_decoder.decode(fields[b"e"] if b"e" in fields else fields["e"])
                if record.org != org or (principal and record.principal != principal):
                    continue
                if table and table not in record.tables:
                    continue
                out.append((eid, msgspec.to_builtins(msgspec.structs.replace(record, id=eid))))
            if len(entries) < PAGE or len(out) > limit:
                break
            start = f"({last}"
    if kind != "query":
        for sup in supers:
            start = f"{low}-0"
            while True:
                events = await log.read_from(org, sup, start, count=PAGE)
                for event in events:
                    if stream_id_tuple(event.id)[0] > high:
                        break
                    if kind not in (None, "event") and type(event).__name__ != kind:
                        continue
                    if principal and event.actor.split("/")[0] != principal:
                        continue
                    if table and event.table != table:
                        continue
                    out.append((event.id, {"kind": "event", **to_builtins(event)}))
                if len(events) < PAGE or stream_id_tuple(events[-1].id)[0] > high:
                    break
                start = f"({events[-1].id}"
    out.sort(key=lambda item: stream_id_tuple(item[0]))
    return [entry for _, entry in out[:limit]], len(out) > limit
